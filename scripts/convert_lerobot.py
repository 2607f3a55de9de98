#!/usr/bin/env python
"""Convert a LeRobotDataset v3 root to one HDF5 file in our robomimic-compatible layout.

    python scripts/convert_lerobot.py ROOT OUT.hdf5
    python scripts/convert_lerobot.py lerobot/pusht data/pusht.hdf5      # a hub id (cached or online)
    python scripts/convert_lerobot.py ROOT OUT.hdf5 --image-map observation.images.top=agentview_image

Cameras become obs/<name>_image (or what --image-map says), observation.state becomes obs/state,
the episode's task string becomes the demo's language_instruction. Training reads the v3 root
directly too (data.paths=[ROOT]); convert only when you want an HDF5 file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vla_ft.config import DataConfig  # noqa: E402
from vla_ft.data.lerobot import convert_to_hdf5  # noqa: E402
from vla_ft.errors import VLAFTError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="LeRobotDataset v3 root directory (or hub id)")
    p.add_argument("out", help="output .hdf5 file")
    p.add_argument(
        "--image-map",
        nargs="*",
        default=[],
        metavar="FEATURE=KEY",
        help="camera feature -> image key (default observation.images.<name> -> <name>_image)",
    )
    p.add_argument("--state-keys", nargs="*", default=None, help="state features (default observation.state)")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="episodes held out in mask/valid")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        image_map = dict(item.split("=", 1) for item in a.image_map)
    except ValueError:
        p.error("--image-map takes FEATURE=KEY pairs")
    t0 = time.perf_counter()
    try:
        cfg = DataConfig(paths=[a.root], lerobot_image_map=image_map, state_keys=a.state_keys)
        out = convert_to_hdf5(a.root, a.out, cfg, a.valid_fraction, a.seed)
    except VLAFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
