#!/usr/bin/env python
"""Thin entry point: `python scripts/probe_policy.py --checkpoint DIR --data FILE [--demos N] [--mask KEY]
[--gripper-dim D] [--json FILE]` (see `--help`): offline probes of a trained policy on demonstrations
(`vla-ft probe`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vla_ft.cli import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_command("probe", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
