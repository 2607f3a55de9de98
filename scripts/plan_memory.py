#!/usr/bin/env python
"""Predict peak GPU memory per rank of a full fine-tuning run, before anything is allocated.

    python scripts/plan_memory.py --cfg pick_place.yaml model.preset=smolvlm-500m train.batch_size=16
    python scripts/plan_memory.py --cfg pick_place.yaml model.preset=small \\
        model.language=docs/examples/llama2-7b data.image_size=224 train.batch_size=16 --gpu-gb 80
    python scripts/plan_memory.py --cfg pick_place.yaml model.preset=smolvlm-500m \\
        --world-size 8 --parallel fsdp --json runs/plan.json

The model is built on the meta device: presets, our checkpoints (their config.json) and HF
backbones given by directory or hub id (only config.json is read) work without weights. Prints
weights, gradients, optimizer state, activations (with and without activation checkpointing) and
the peak per rank, whether it fits ``--gpu-gb`` and what to change if not; ``--json`` writes it all.
The method and its calibration: vla_ft/train/memory.py, docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vla_ft.config import load_config  # noqa: E402
from vla_ft.errors import VLAFTError  # noqa: E402
from vla_ft.train.memory import format_report, report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    try:
        cfg = load_config(args.cfg, overrides)
        if args.world_size < 1:
            p.error("--world-size must be 1 or more")
        precision = args.precision or ("bf16" if cfg.train.precision == "auto" else cfg.train.precision)
        result = report(cfg, args.world_size, precision, args.gpu_gb, args.headroom_gb)
    except VLAFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
