#!/usr/bin/env python
"""Thin entry point: `python scripts/bench_quality.py --cfg NAME [key=value ...] [--seeds 3] [--episodes 300]
[--eval-seed 200000] [--out DIR] [--target-mean PCT] [--target-min PCT] [--generalization
[--target-heldout PCT] [--target-paraphrase PCT]]` (see `--help`): the config's main job trained once per
training seed, each run scored on fresh episodes (and on held-out goal combinations and paraphrases)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vla_ft.bench_quality import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
