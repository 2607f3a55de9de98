"""Full-parameter training: optimizer groups, schedules, precision, checkpoints, the loop.

Submodules are imported where used (``vla_ft.train.finetune.run_finetune`` is the entry point).
"""
