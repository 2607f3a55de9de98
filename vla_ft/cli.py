"""Command-line entry points: ``vla-ft finetune|evaluate|collect|pretrain|compare --cfg NAME [key=value ...]``.

The scripts in scripts/ call :func:`main` with their sub-command. This module only parses arguments,
loads the config and calls the library; user errors (:class:`VLAFTError`) print one line to stderr
and exit with status 2, any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from vla_ft.config import Config, load_config
from vla_ft.errors import PREEMPTED_EXIT, Preempted, VLAFTError

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
    from vla_ft.compare import DEFAULT_ROWS, ROW_NAMES_HELP

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
    from vla_ft.compare import run_compare

    rows = args.rows.split(",")
    return run_compare(
        cfg, args.out, rows, args.steps, args.episodes, argv=["python", "scripts/compare.py", *argv]
    )


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "finetune": _finetune,
    "evaluate": _evaluate,
    "collect": _collect,
    "compare": _compare,
    "pretrain": _pretrain,
}


def run_command(command: str, argv: Sequence[str]) -> int:
    """Run one sub-command; user errors become one line on stderr and exit status 2.

    A run stopped by SIGTERM/SIGINT after saving exits with status 75 (``PREEMPTED_EXIT``; rank 0
    says where the checkpoint is); a second Ctrl-C aborts with status 130.
    """
    try:
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
        print(f"usage: vla-ft {{{names}}} --cfg NAME [key=value ...]", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0 if argv else 2
    return run_command(argv[0], argv[1:])


def config_for(argv: Sequence[str]) -> Config:
    """Parse ``--cfg NAME key=value ...`` into a Config (used by benchmark scripts)."""
    p = _parser("vla-ft", "")
    args, _ = p.parse_known_args(argv)
    return load_config(args.cfg, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
