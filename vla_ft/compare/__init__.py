"""Full fine-tuning vs LoRA vs from scratch on one task: what ``scripts/compare.py`` runs.

Modules: :mod:`~vla_ft.compare.rows` (row names and configs), :mod:`~vla_ft.compare.run` (each row's
job in a subprocess, then the report) and :mod:`~vla_ft.compare.report` (comparison.md / .png).

The full-parameter fine-tuning guides compare, on one task, the pretrained model without tuning,
LoRA r=8 and r=16, and full fine-tuning (train time, memory, accuracy, trainable parameters).
This package reproduces that comparison on a robot task with success rate in simulation as the
metric. Rows (``--rows``; names are parsed, so other ranks and weights work too):

* ``base``: ``model.pretrained`` evaluated as is (zero-shot, no training; scripts/evaluate.py);
* ``lora_r<R>``: LoRA rank R on the base (``model.lora.r=R``, backbone frozen, heads trained);
* ``full``: full-parameter fine-tuning of the base;
* ``scratch``: the same architecture from random weights (``model.pretrained=null``);
* ``bc_cnn``: the plain CNN behaviour-cloning baseline (``model.preset=bc-cnn``, ~1.7M parameters, no
  transformer; vla_ft/models/bc_cnn.py) from scratch with its own recipe (:data:`BC_CNN_RECIPE`: lr
  1e-3 flat, batch 64, EMA 0.995, the L1 action loss alone) and the config's steps, data and
  augmentation: the reference point a VLA has to beat on this data;
* ``full_w_task_<W>``: full fine-tuning with task-loss weight ``loss.w_task=W`` (ablation);
* ``<row>_lr<M>``: any training row with its learning rate times M (``train.lr`` and with it every
  ``train.module_lr`` group, which are multipliers of it), e.g. ``lora_r16_lr10``: LoRA is commonly
  run at a higher rate than full fine-tuning, and a comparison at one shared rate says nothing
  about LoRA at its own.

Every row is the normal job (scripts/finetune.py or scripts/evaluate.py) in its own subprocess,
with its own config file written under ``<out>/configs/``: same data file (collected once, up
front), same step budget, same evaluation episodes and seeds. A crashed row is marked failed with
its error and the run exits non-zero after writing the report. Without a base
(``model.pretrained: null``) the rows that need one are reported as ``n/a (no base)``. A row whose
config equals an earlier row's (e.g. ``full_w_task_0.1`` when the config's ``loss.w_task`` is 0.1)
is not trained twice: it is reported as the same run.

Measured per row: wall time of training and of the final evaluation (from the run's
``summary.json`` / ``eval.json``), peak memory (CPU: the peak RSS of the job's process, see
:func:`~vla_ft.compare.run.run_child`; CUDA: ``torch.cuda.max_memory_allocated`` reported by the run), trainable parameters (count and share of
all parameters the run trained, adapters included), success with its 95% Wilson interval and the
last validation loss. Outputs: ``comparison.md``, ``comparison.json``, ``comparison.png``.
"""
