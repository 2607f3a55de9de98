"""Shared builders for the model tests: a DatasetInfo-like object, batches, observations.

Imported by name (pytest puts this directory on sys.path; the name is unique across tests/)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from vla_ft import constants as C
from vla_ft.data.normalize import Normalizer

IMAGE_KEYS = ["agentview_image", "wrist_image"]
STATE_KEYS = ["ee_pos", "gripper_qpos"]


def make_info(
    action_dim: int = 4,
    tasks: tuple[str, ...] = ("pick_place", "stack"),
    chunk: int = 4,
    size: int = 32,
    history: int = 1,
):
    """A DatasetInfo stand-in with a min_max normalizer whose action range is [-3, 5] per dim."""
    rng = np.random.default_rng(0)
    actions = np.concatenate(
        [np.full((1, action_dim), -3.0), np.full((1, action_dim), 5.0), rng.uniform(-3, 5, (50, action_dim))]
    )
    norm = Normalizer.from_arrays("min_max", actions, rng.normal(size=(52, 5)))
    return SimpleNamespace(
        action_dim=action_dim,
        state_dim=5,
        image_keys=list(IMAGE_KEYS),
        state_keys=list(STATE_KEYS),
        image_size=(size, size),
        history=history,
        chunk=chunk,
        task_names=list(tasks),
        normalizer=norm,
    )


def make_batch(info, b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = info.image_size
    mask = torch.ones(b, 12, dtype=torch.long)
    mask[0, 7:] = 0  # one shorter (right-padded) instruction
    return {
        C.IMAGES: torch.randint(
            0, 256, (b, info.history, len(info.image_keys), 3, h, w), generator=g, dtype=torch.uint8
        ),
        C.STATE: torch.randn(b, info.history, info.state_dim, generator=g),
        C.INSTR_IDS: torch.randint(3, 259, (b, 12), generator=g) * mask,
        C.INSTR_MASK: mask,
        C.ACTION: torch.rand(b, info.chunk, info.action_dim, generator=g) * 2 - 1,
        C.ACTION_IS_PAD: torch.zeros(b, info.chunk, dtype=torch.bool),
        C.TASK_ID: torch.arange(b) % len(info.task_names),
        C.PROGRESS: torch.rand(b, generator=g),
    }


def make_obs(info, n: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """An env-like observation (HWC uint8 images at 64 px, float32 state); leading N when n is given."""
    rng = np.random.default_rng(seed)
    lead = () if n is None else (n,)
    obs = {k: rng.integers(0, 256, (*lead, 64, 64, 3), dtype=np.uint8) for k in info.image_keys}
    obs["ee_pos"] = rng.normal(size=(*lead, 3)).astype(np.float32)
    obs["gripper_qpos"] = rng.normal(size=(*lead, 2)).astype(np.float32)
    return obs


def simple_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss touching every output (the real one lives in vla_ft.losses)."""
    loss = (out[C.OUT_ACTION] - batch[C.ACTION]).abs().mean()
    if C.OUT_ACTION_LOGITS in out:
        loss = loss + out[C.OUT_ACTION_LOGITS].logsumexp(-1).mean() * 0.01
    loss = loss + torch.nn.functional.cross_entropy(out[C.OUT_TASK_LOGITS], batch[C.TASK_ID])
    if C.OUT_WAYPOINT in out:
        loss = loss + out[C.OUT_WAYPOINT].pow(2).mean() * 0.1
    return loss + (out[C.OUT_PROGRESS] - batch[C.PROGRESS]).pow(2).mean()
