"""What scanning a trajectory source found: its demos' low-dim data and how to read its images.

Both readers fill these: :func:`vla_ft.data.reader.scan_file` for HDF5 files and
:func:`vla_ft.data.lerobot.scan_lerobot` for LeRobotDataset v3 roots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Demo:
    """One demonstration's low-dim data (images stay in the file or an image cache)."""

    name: str
    actions: np.ndarray  # (T, A) float32
    state: np.ndarray  # (T, S) float32
    instruction: str
    task: str
    # (T, K, 2, 2) float32: image (x, y) of the named object and the destination per camera, from
    # data/demo_i/targets/<image key> (our collector writes them); None when the demo has none
    targets: np.ndarray | None = None

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])


@dataclass
class FileScan:
    """What :func:`~vla_ft.data.reader.scan_file` learned about one HDF5 file or LeRobot root."""

    path: str
    layout: str
    image_keys: tuple[str, ...]
    state_keys: tuple[str, ...]
    state_dims: tuple[int, ...]  # dims of each state key
    image_hw: tuple[int, int] | None  # stored (H, W), same for every camera and demo
    demos: list[Demo]
    masks: dict[str, list[str]] = field(default_factory=dict)  # filter key -> demo names
    skipped: list[str] = field(default_factory=list)  # demos dropped (bad_demos=skip)
    # LeRobotDataset v3 roots only (vla_ft.data.lerobot): the image decoder and meta/stats.json
    frames: Any = None  # LeRobotFrames; None: images are HDF5 datasets of the file
    stats: dict[str, dict[str, np.ndarray]] | None = None  # {"action"/"state": {stat: (D,)}}

    @property
    def has_targets(self) -> bool:
        """Every demo carries grounding targets for every camera (``targets/<image key>``)."""
        return all(d.targets is not None for d in self.demos)

    def frame_bytes(self) -> int:
        """RAM one frame of all cameras takes (stored size)."""
        return 0 if self.image_hw is None else len(self.image_keys) * self.image_hw[0] * self.image_hw[1] * 3
