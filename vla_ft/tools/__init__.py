"""Tools around training runs, each a sub-command of the CLI (vla_ft/cli.py): the GPU memory
planner (``vla-ft plan-memory``, :mod:`vla_ft.tools.plan_memory`) and the offline probe of a trained
policy on demonstrations (``vla-ft probe``, :mod:`vla_ft.tools.probe`)."""
