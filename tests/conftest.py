"""Shared test set-up: headless rendering, offline hubs, marker handling."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Importing triton (torch._dynamo imports it; torchao and torch.compile do) after a MuJoCo EGL
# context existed in the same process segfaults (docs/traps.md). Tests render in-process (envs/,
# robosuite) and later ones compile or use torchao, in whatever order pytest picks: load it first.
import torch._dynamo  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
