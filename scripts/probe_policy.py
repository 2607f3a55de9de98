#!/usr/bin/env python
"""Probe a trained policy on demonstrations, offline: does it find the goal from the first frame,
does it use the instruction, does it look at the named object, does it switch the gripper itself?

    python scripts/probe_policy.py --checkpoint runs/<run>/best --data data/pick_place.hdf5
    python scripts/probe_policy.py --checkpoint checkpoints/base/tiny-suite --data data/suite.hdf5 \\
        --mask valid --demos 200 --json runs/probe.json

Prints up to four tables (vla_ft/eval/probe.py explains them): the first predicted action against
the label per time step of the demo (causal confusion shows as no correlation at step 0 and a high
one later); the error with each demo's own instruction against another demo's (a policy that
ignores the language scores the same with both); for policies with keypoint heat maps, their peaks
on the first frame against the file's grounding labels; and the predicted gripper sign around each
switch of the demo's gripper command (a policy that opens only one step after the demo does copies
the fingers and never releases closed loop). Probe held-out demos to judge generalization.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vla_ft.errors import VLAFTError  # noqa: E402
from vla_ft.eval.probe import format_probe, probe_policy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    import torch

    from vla_ft.models import VLAPolicy

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        policy = VLAPolicy.from_pretrained(args.checkpoint).eval()
        result = probe_policy(
            policy, args.data, demos=args.demos, mask=args.mask, gripper_dim=args.gripper_dim
        )
    except VLAFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# Probe of {args.checkpoint} on {result.demos} demos of {args.data}\n")
    print(format_probe(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps({"checkpoint": args.checkpoint, "data": args.data, **result.to_dict()}, indent=1)
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
