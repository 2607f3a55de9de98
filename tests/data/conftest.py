"""Hand-built trajectory files in the published robomimic and LIBERO layouts and in ours.

Values are recognizable so tests can check which frames a sample picked:
action[t] = [1000 * demo + t, t, 0.5, ...], state key k at t = [100 * demo + t + k, ...],
image pixel (camera c, frame t of demo d) = (7 * d + t + 50 * c) % 256.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

# layout -> (image keys, {state key: dim}, action dim)
LAYOUTS = {
    "ours": (["agentview_image", "wrist_image"], {"ee_pos": 3, "gripper_qpos": 2}, 4),
    "robomimic": (
        ["agentview_image", "robot0_eye_in_hand_image"],
        {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2},
        7,
    ),
    "libero": (
        ["agentview_rgb", "eye_in_hand_rgb"],
        {"ee_pos": 3, "ee_ori": 3, "gripper_states": 2, "joint_states": 7},
        7,
    ),
}


def frame_value(demo: int, t: int, cam: int) -> int:
    return (7 * demo + t + 50 * cam) % 256


def demo_arrays(layout: str, d: int, length: int, hw: tuple[int, int]) -> dict[str, np.ndarray]:
    image_keys, state_keys, a_dim = LAYOUTS[layout]
    t = np.arange(length)
    out: dict[str, np.ndarray] = {}
    for c, key in enumerate(image_keys):
        vals = np.array([frame_value(d, i, c) for i in t], dtype=np.uint8)
        out[f"obs/{key}"] = np.broadcast_to(vals[:, None, None, None], (length, *hw, 3)).copy()
    for k, (key, dim) in enumerate(state_keys.items()):
        base = (100 * d + t + k).astype(np.float32)[:, None]
        out[f"obs/{key}"] = base + np.arange(dim, dtype=np.float32)[None] * 0.1
    act = np.full((length, a_dim), 0.5, np.float32)
    act[:, 0], act[:, 1] = 1000 * d + t, t
    out["actions"] = act
    return out


def write_file(
    path: Path,
    layout: str = "ours",
    lengths: tuple[int, ...] = (6, 9, 5, 7, 8),
    hw: tuple[int, int] = (12, 12),
    language: str = "demo",  # demo | problem_info | none
    tasks: list[str] | None = None,
    mask_valid: list[int] | None = None,
    mutate=None,
) -> Path:
    """Write a small trajectory file; ``mutate(name, arrays)`` may edit a demo's arrays first."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": layout})
        if language == "problem_info":
            info = {"problem_name": "libero_test", "language_instruction": "open the top drawer"}
            data.attrs["problem_info"] = json.dumps(info)
        for d, length in enumerate(lengths):
            name = f"demo_{d}"
            grp = data.create_group(name)
            arrays = demo_arrays(layout, d, length, hw)
            if mutate is not None:
                mutate(name, arrays)
            for key, arr in arrays.items():
                grp.create_dataset(key, data=arr)
            grp.attrs["num_samples"] = length
            if language == "demo":
                task = tasks[d] if tasks else "pick"
                grp.attrs["language_instruction"] = f"put the {task} cube in the bowl"
                grp.attrs["task"] = task
        data.attrs["total"] = int(sum(lengths))
        if mask_valid is not None:
            valid = [f"demo_{i}".encode() for i in mask_valid]
            train = [f"demo_{i}".encode() for i in range(len(lengths)) if i not in mask_valid]
            f.create_dataset("mask/valid", data=np.array(valid, dtype="S"))
            f.create_dataset("mask/train", data=np.array(train, dtype="S"))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


@pytest.fixture
def ours_file(tmp_path):
    return write_file(
        tmp_path / "ours.hdf5", "ours", tasks=["red", "blue", "red", "green", "blue"], mask_valid=[1]
    )


@pytest.fixture
def robomimic_file(tmp_path):
    return write_file(tmp_path / "robomimic.hdf5", "robomimic", language="none", mask_valid=[0, 3])


@pytest.fixture
def libero_file(tmp_path):
    return write_file(tmp_path / "libero.hdf5", "libero", language="problem_info")


@pytest.fixture
def write_h5():
    """The file builder (tests import no helpers from conftest)."""
    return write_file


@pytest.fixture
def pixel():
    """frame_value(demo, t, cam): the pixel value written for that frame."""
    return frame_value
