"""Command-line entry points: ``vla-ft finetune|evaluate|collect|pretrain|compare --cfg NAME [key=value ...]``,
``vla-ft plan-memory --cfg NAME [key=value ...] [--gpu-gb G ...]`` and ``vla-ft probe --checkpoint DIR --data FILE``.

The scripts in scripts/ call :func:`run_command` with their sub-command. This module only parses
arguments, loads the config and calls the library; user errors (:class:`VLAFTError`) print one line
to stderr and exit with status 2, any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from vla_ft.config import load_config
from vla_ft.errors import PREEMPTED_EXIT, Preempted, VLAFTError, suite_errors

OVERRIDES_HELP = (
    "dotted overrides applied after the YAML, e.g. train.lr=3e-5 model.pretrained=path/or/hub-id "
    "data.paths=[a.hdf5,b.hdf5]; an unknown key is an error naming the closest valid one"
)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--cfg",
        required=True,
        help="config YAML: a path, or a bare name looked up in configs/ (e.g. pick_place.yaml)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    return p


def _train_command(prog: str, description: str) -> Callable[[Sequence[str]], int]:
    """finetune and pretrain: the same full-parameter loop, driven by the config."""

    def command(argv: Sequence[str]) -> int:
        args = _parser(prog, description).parse_intermixed_args(argv)
        cfg = load_config(args.cfg, args.overrides)
        from vla_ft.train.finetune import run_finetune

        run_finetune(cfg)
        return 0

    return command


_finetune = _train_command(
    "finetune", "Full-parameter fine-tuning of a pretrained VLA, with periodic sim evaluation."
)
_pretrain = _train_command(
    "pretrain", "Train a base VLA from scratch on a multi-task demo suite (same loop as finetune)."
)


def _evaluate(argv: Sequence[str]) -> int:
    p = _parser("evaluate", "Roll a policy out in simulation and report success rates.")
    p.add_argument("--ckpt", help="checkpoint directory (e.g. runs/<run>/best)")
    p.add_argument(
        "--policy",
        choices=["checkpoint", "expert", "random"],
        default="checkpoint",
        help="score a checkpoint (default), the scripted expert (the ceiling) or uniform random actions",
    )
    args = p.parse_intermixed_args(argv)
    cfg = load_config(args.cfg, args.overrides)
    if args.policy == "checkpoint" and not args.ckpt:
        p.error("--ckpt DIR is required unless --policy expert|random")
    from vla_ft.eval.run import run_evaluate

    run_evaluate(cfg, ckpt=args.ckpt, policy=args.policy)
    return 0


def _collect(argv: Sequence[str]) -> int:
    p = _parser("collect", "Collect scripted-expert demonstrations in MuJoCo into a robomimic/LIBERO HDF5.")
    args = p.parse_intermixed_args(argv)
    cfg = load_config(args.cfg, args.overrides)
    from vla_ft.data.collect import run_collect

    run_collect(cfg)
    return 0


def _compare(argv: Sequence[str]) -> int:
    from vla_ft.compare.rows import DEFAULT_ROWS, ROW_NAMES_HELP

    p = _parser(
        "compare",
        "Full fine-tuning vs LoRA vs from scratch (and a task-loss ablation) on one task, each row the "
        "normal job in its own subprocess; writes comparison.md/.json/.png. Exit 1 if a row failed.",
    )
    p.add_argument(
        "--out", help="output directory, new or empty (default: <train.out_dir>/compare-<name>-<time>)"
    )
    p.add_argument(
        "--rows",
        default=",".join(DEFAULT_ROWS),
        help=f"comma-separated rows (default: %(default)s); names: {ROW_NAMES_HELP}",
    )
    p.add_argument("--steps", type=int, help="train.steps for every training row (default: the config's)")
    p.add_argument("--episodes", type=int, help="eval.episodes for every row (default: the config's)")
    args = p.parse_intermixed_args(argv)
    cfg = load_config(args.cfg, args.overrides)
    from vla_ft.compare.run import run_compare

    rows = args.rows.split(",")
    return run_compare(
        cfg, args.out, rows, args.steps, args.episodes, argv=["python", "scripts/compare.py", *argv]
    )


PLAN_MEMORY_HELP = """Predict peak GPU memory per rank of a full fine-tuning run, before anything is allocated.

    vla-ft plan-memory --cfg pick_place.yaml model.preset=smolvlm-500m train.batch_size=16
    vla-ft plan-memory --cfg pick_place.yaml model.preset=small \\
        model.language=docs/examples/llama2-7b data.image_size=224 train.batch_size=16 --gpu-gb 80
    vla-ft plan-memory --cfg pick_place.yaml model.preset=smolvlm-500m \\
        --world-size 8 --parallel fsdp --json runs/plan.json

The model is built on the meta device: presets, our checkpoints (their config.json) and HF
backbones given by directory or hub id (only config.json is read) work without weights. Prints
weights, gradients, optimizer state, activations (with and without activation checkpointing) and
the peak per rank, whether it fits ``--gpu-gb`` and what to change if not; ``--json`` writes it all.
The method and its calibration: vla_ft/tools/plan_memory.py, docs/scale.md.
"""


def _plan_memory(argv: Sequence[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub backbone's config.json from the cache only
    p = argparse.ArgumentParser(
        prog="plan-memory", description=PLAN_MEMORY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cfg", required=True, help="run config (a path or a name in configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--world-size", type=int, default=1, help="ranks (train.batch_size is the global batch)")
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"], help="overrides train.parallel")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: train.precision, with auto = bf16 (CUDA)")  # fmt: skip
    p.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory to fit in (GiB)")
    p.add_argument("--headroom-gb", type=float, default=2.0, help="left free for the CUDA context etc.")
    p.add_argument("--json", help="also write the report as JSON here")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"train.parallel={args.parallel}"] if args.parallel else [])
    cfg = load_config(args.cfg, overrides)
    if args.world_size < 1:
        p.error("--world-size must be 1 or more")
    precision = args.precision or ("bf16" if cfg.train.precision == "auto" else cfg.train.precision)
    from vla_ft.tools.plan_memory import print_plan

    print_plan(cfg, args.world_size, precision, args.gpu_gb, args.headroom_gb, args.json)
    return 0


PROBE_HELP = """Probe a trained policy on demonstrations, offline: does it find the goal from the first frame,
does it use the instruction, does it look at the named object, does it switch the gripper itself?

    vla-ft probe --checkpoint runs/<run>/best --data data/pick_place.hdf5
    vla-ft probe --checkpoint checkpoints/base/tiny-suite --data data/suite.hdf5 \\
        --mask valid --demos 200 --json runs/probe.json

Prints up to four tables (vla_ft/tools/probe.py explains them): the first predicted action against
the label per time step of the demo (causal confusion shows as no correlation at step 0 and a high
one later); the error with each demo's own instruction against another demo's (a policy that
ignores the language scores the same with both); for policies with keypoint heat maps, their peaks
on the first frame against the file's grounding labels; and the predicted gripper sign around each
switch of the demo's gripper command (a policy that opens only one step after the demo does copies
the fingers and never releases closed loop). Probe held-out demos to judge generalization.
"""


def _probe(argv: Sequence[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(
        prog="probe", description=PROBE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (save_pretrained)")
    p.add_argument("--data", required=True, help="an HDF5 trajectory file with the policy's keys")
    p.add_argument("--demos", type=int, default=100, help="demos to probe, in file order")
    p.add_argument("--mask", help="probe only this filter key's demos (e.g. valid: the held-out ones)")
    p.add_argument("--json", help="also write the numbers as JSON here")
    p.add_argument(
        "--gripper-dim",
        type=int,
        default=-1,
        help="action dimension of the gripper command (default: -1, the last)",
    )
    args = p.parse_args(argv)
    if args.demos < 1:
        p.error("--demos must be 1 or more")
    from vla_ft.tools.probe import run_probe

    run_probe(args.checkpoint, args.data, args.demos, args.mask, args.gripper_dim, args.json)
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "finetune": _finetune,
    "evaluate": _evaluate,
    "collect": _collect,
    "compare": _compare,
    "pretrain": _pretrain,
    "plan-memory": _plan_memory,
    "probe": _probe,
}


def run_command(command: str, argv: Sequence[str]) -> int:
    """Run one sub-command; user errors become one line on stderr and exit status 2.

    A run stopped by SIGTERM/SIGINT after saving exits with status 75 (``PREEMPTED_EXIT``; rank 0
    says where the checkpoint is); a second Ctrl-C aborts with status 130.
    """
    try:
        with suite_errors():  # a task-suite error no inner call site converted is still one line
            return COMMANDS[command](argv)
    except VLAFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"preempted: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT
    except KeyboardInterrupt:
        print("aborted by Ctrl-C: nothing was saved since the last checkpoint", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = "|".join(COMMANDS)
        print(f"usage: vla-ft {{{names}}} [arguments] (vla-ft COMMAND --help lists them)", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0 if argv else 2
    return run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
