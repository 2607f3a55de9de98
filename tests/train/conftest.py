"""A small, learnable trajectory file written with the project's writer, and tiny train configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vla_ft.config import load_config
from vla_ft.data.writer import DemoWriter

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def write_reach_file(path: Path, demos: int = 8, steps: int = 16, size: int = 32, seed: int = 0) -> Path:
    """Demos of a point moving to a colored target: the action is a function of state and image.

    The square's image position is stored as the grounding targets (row 0; no destination), so the
    configs' `grounding` loss term trains on this file too."""
    rng = np.random.default_rng(seed)
    with DemoWriter(path, {"env_name": "synthetic_reach"}, {"language_instruction": "reach"}) as w:
        for d in range(demos):
            color = list(COLORS)[d % 2]
            goal = rng.uniform(-0.5, 0.5, size=3).astype(np.float32)
            pos = np.zeros(3, np.float32)
            imgs, wrist, ee, grip, acts = [], [], [], [], []
            px = int((goal[0] + 0.5) * (size - 8))
            py = int((goal[1] + 0.5) * (size - 8))
            uv = np.full((steps, 2, 2), np.nan, np.float32)
            uv[:, 0] = [(px + 4) / size * 2 - 1, (py + 4) / size * 2 - 1]  # square centre, x right, y down
            uv_wrist = uv.copy()
            uv_wrist[:, 0, 1] *= -1  # the wrist image is the agentview image upside down
            for t in range(steps):
                img = np.full((size, size, 3), 40, np.uint8)
                img[py : py + 8, px : px + 8] = COLORS[color]
                act = np.clip((goal - pos) * 4.0, -1, 1).astype(np.float32)
                g = 1.0 if t > steps // 2 else -1.0
                imgs.append(img)
                wrist.append(img[::-1].copy())
                ee.append(pos.copy())
                grip.append(np.array([0.04, 0.04], np.float32) * (g < 0))
                acts.append(np.concatenate([act, [g]]).astype(np.float32))
                pos = pos + act * 0.1
            w.add_demo(
                {
                    "agentview_image": np.stack(imgs),
                    "wrist_image": np.stack(wrist),
                    "ee_pos": np.stack(ee),
                    "gripper_qpos": np.stack(grip),
                },
                np.stack(acts),
                np.zeros(steps, np.float32),
                np.eye(1, steps, steps - 1, dtype=np.uint8)[0],
                np.zeros((steps, 2)),
                {"language_instruction": f"reach the {color} square", "task": f"reach_{color}"},
                {"agentview_image": uv, "wrist_image": uv_wrist},
            )
        w.close(valid_fraction=0.25, seed=seed)
    return path


@pytest.fixture(scope="session")
def reach_file(tmp_path_factory) -> Path:
    return write_reach_file(tmp_path_factory.mktemp("data") / "reach.hdf5")


def tiny_overrides(data_path: Path, out_dir: Path, **extra) -> list[str]:
    values = {
        "data.paths": f"[{data_path}]",
        "data.collect_if_missing": "false",
        "model.pretrained": "null",
        "model.preset": "tiny",
        "train.steps": 12,
        "train.batch_size": 8,
        "train.warmup_steps": 2,
        "train.val_every": 6,
        "train.save_every": 6,
        "train.out_dir": str(out_dir),
        "train.run_name": "t",
        "train.threads": 1,
        "eval.episodes": 0,
        "log.wandb": "disabled",
        "log.progress": "false",
        "log.every": 1,
        "log.plots": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(name="tiny_overrides", scope="session")
def tiny_overrides_fixture():
    """The override list builder: tiny_overrides(data_path, out_dir, **extra)."""
    return tiny_overrides


@pytest.fixture
def tiny_cfg(reach_file, tmp_path):
    def make(**extra):
        return load_config("pick_place.yaml", tiny_overrides(reach_file, tmp_path / "runs", **extra))

    return make


@pytest.fixture
def resume_check(tiny_cfg):
    """``resume_check(**common)``: train 6 steps straight, then again resumed from the step-3
    checkpoint (``train.resume`` given as the checkpoint path): steps 4-6 must log the same losses and
    ``last`` hold the same (EMA) weights. ``common`` must save every 3 steps and train
    deterministically."""
    return lambda **common: _assert_resume_matches_uninterrupted(tiny_cfg, **common)


def _assert_resume_matches_uninterrupted(tiny_cfg, **common) -> None:
    import torch

    from vla_ft.models import VLAPolicy
    from vla_ft.train.finetune import run_finetune
    from vla_ft.train.logging import read_metrics

    def losses(run_dir: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}

    full = run_finetune(tiny_cfg(**common, **{"train.run_name": "a"}))
    ckpt = full.run_dir / "checkpoints" / "step_0000003"
    resumed = run_finetune(tiny_cfg(**common, **{"train.run_name": "b", "train.resume": str(ckpt)}))
    a, b = losses(full.run_dir), losses(resumed.run_dir)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7)
    ema_a = VLAPolicy.from_pretrained(full.run_dir / "last").state_dict()
    ema_b = VLAPolicy.from_pretrained(resumed.run_dir / "last").state_dict()
    for name, value in ema_a.items():
        torch.testing.assert_close(ema_b[name], value, msg=name)
