#!/usr/bin/env python
"""Thin entry point: `python scripts/evaluate.py --cfg NAME [key=value ...]` (see `--help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vla_ft.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("evaluate", sys.argv[1:]))
