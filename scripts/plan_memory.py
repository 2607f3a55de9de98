#!/usr/bin/env python
"""Thin entry point: `python scripts/plan_memory.py --cfg NAME [key=value ...] [--world-size N]
[--parallel P] [--precision P] [--gpu-gb G] [--headroom-gb H] [--json FILE]` (see `--help`): peak GPU
memory per rank of a full fine-tuning run, predicted before anything is allocated (`vla-ft plan-memory`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vla_ft.cli import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_command("plan-memory", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
