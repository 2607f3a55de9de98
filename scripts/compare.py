#!/usr/bin/env python
"""Thin entry point: `python scripts/compare.py --cfg NAME [key=value ...] [--out DIR] [--rows ...]
[--steps N] [--episodes N]` (see `--help`): full fine-tuning vs LoRA vs from scratch on one task."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vla_ft.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("compare", sys.argv[1:]))
