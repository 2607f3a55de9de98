"""The bc-cnn baseline in the real training loop: it learns, its checkpoints load and resume
exactly, and options it cannot honour stop the run before any data loads."""

from __future__ import annotations

import pytest
import torch

from vla_ft.config_checks import check_config
from vla_ft.errors import ConfigError
from vla_ft.models import VLAPolicy
from vla_ft.models.bc_cnn import BCCNNPolicy
from vla_ft.train.finetune import run_finetune
from vla_ft.train.logging import read_metrics

# the baseline's recipe on the tiny reach file (pick_place.yaml's task terms include grounding)
BC = {"model.preset": "bc-cnn", "loss.task_terms": "{task_id: 1.0, progress: 1.0}", "train.module_lr": "{}"}


def _losses(run_dir, split: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == split}


def test_training_lowers_the_loss_and_the_checkpoint_predicts(tiny_cfg):
    extra = {"train.steps": 40, "train.lr": 1e-3, "train.batch_size": 16, "train.ema": 0.995}
    extra |= {"data.augment.enabled": "false", "train.val_every": 20, "train.save_every": 20}
    result = run_finetune(tiny_cfg(**BC, **extra))
    losses = _losses(result.run_dir)
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(36, 41)) / 5
    assert last < 0.7 * first, (first, last)
    best = VLAPolicy.from_pretrained(result.run_dir / "best")
    assert isinstance(best, BCCNNPolicy) and best.normalizer is not None
    obs = {
        "agentview_image": torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(),
        "wrist_image": torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(),
        "ee_pos": torch.zeros(3).numpy(),
        "gripper_qpos": torch.zeros(2).numpy(),
    }
    assert best.select_action(obs, "reach the red square").shape == (4,)


def test_resume_with_ema_continues_exactly(resume_check):
    common = {**BC, "train.steps": 6, "train.save_every": 3, "train.val_every": 0, "train.ema": 0.995}
    resume_check(**common, **{"train.deterministic": "true"})


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"loss.task_terms": "{task_id: 1.0, grounding: 10.0}"}, "loss.task_terms.grounding needs keypoint"),
        ({"model.gradient_checkpointing": "true"}, "set model.gradient_checkpointing=false"),
        ({"model.lora.r": 8}, "model.lora.r=8 does not apply to a bc-cnn policy"),
    ],
)
def test_unsupported_options_stop_the_run_before_training(tiny_cfg, tmp_path, override, pattern):
    cfg = tiny_cfg(**{**BC, **override})
    with pytest.raises(ConfigError, match=pattern):
        check_config(cfg)  # needs no data
    with pytest.raises(ConfigError, match=pattern):
        run_finetune(cfg)
    assert not (tmp_path / "runs" / "t").exists()
