"""The main job with a flow-matching head: a LeRobot SmolVLA checkpoint (full-parameter fine-tuning,
exact resume, checkpoints that are LeRobot SmolVLA directories) and our tiny preset with `flow`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vla_ft.models.smolvla_io import load_lerobot_smolvla
from vla_ft.train.finetune import run_finetune
from vla_ft.train.logging import read_metrics

CKPT = Path(__file__).resolve().parents[1] / "fixtures" / "lerobot" / "smolvla_tiny"
SMOLVLA = {
    "model.pretrained": str(CKPT),
    "model.action_head": "flow",
    "data.chunk": 8,
    "loss.task_terms": "{}",
    "train.steps": 6,
    "train.save_every": 3,
    "train.val_every": 3,
    "train.deterministic": "true",
}


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


def test_smolvla_fine_tunes_resumes_exactly_and_saves_lerobot_checkpoints(tiny_cfg):
    full = run_finetune(tiny_cfg(**SMOLVLA))
    expected = _losses(full.run_dir)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    last = (full.run_dir / "last").resolve()
    model, proc = load_lerobot_smolvla(last)  # LeRobot's layout, our data's features
    assert proc.camera_keys == ["observation.images.agentview_image", "observation.images.wrist_image"]
    assert proc.state_dim == 5 and proc.action_dim == 4
    stats = json.loads((last / "normalization.json").read_text())["stats"]["action"]["mean"]
    assert proc.unnorm_stats["action.mean"].tolist() == pytest.approx(stats, rel=1e-6)  # float32

    step3 = full.run_dir / "checkpoints" / "step_0000003"
    resumed = run_finetune(tiny_cfg(**SMOLVLA, **{"train.run_name": "resumed", "train.resume": str(step3)}))
    got = _losses(resumed.run_dir)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):  # flow noise and times come from the restored RNG: bit-for-bit
        assert got[step] == expected[step], step


def test_a_preset_with_the_flow_head_learns(tiny_cfg):
    extra = {"train.steps": 60, "train.lr": 2e-3, "train.batch_size": 16, "data.augment.enabled": "false"}
    extra |= {"model.action_head": "flow", "loss.task_terms": "{task_id: 1.0, progress: 1.0}"}
    result = run_finetune(tiny_cfg(**extra, **{"train.val_every": 0, "train.save_every": 60}))
    action = {r["step"]: r["loss/action"] for r in read_metrics(result.run_dir) if r["split"] == "train"}
    first = sum(action[s] for s in range(1, 11)) / 10
    last = sum(action[s] for s in range(51, 61)) / 10
    assert last < 0.8 * first, (first, last)  # the velocity error of the flow head falls
