"""A tiny saved policy for the property tests (random weights, the tiny preset's shapes)."""

from __future__ import annotations

from pathlib import Path

from vla_ft.config import ModelConfig
from vla_ft.models import ModelDims, build_policy


def tiny_checkpoint(out: Path) -> Path:
    dims = ModelDims(action_dim=4, state_dim=5, image_keys=["agentview_image"], image_size=(32, 32))
    policy = build_policy(ModelConfig(preset="tiny"), dims)
    policy.save_pretrained(out)
    return out
