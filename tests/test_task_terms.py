"""The task-term registry: what each term needs from the data and the policy (said once before
training), and how the loss computes the configured terms through it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vla_ft import constants as K
from vla_ft.config import LossConfig, load_config
from vla_ft.config.schema import TASK_TERM_NAMES
from vla_ft.errors import ConfigError
from vla_ft.losses import ActionTaskLoss
from vla_ft.task_terms import TASK_TERMS, TermCapabilities, task_term_problems

HEADS = frozenset((K.OUT_TASK_LOGITS, K.OUT_PROGRESS, K.OUT_WAYPOINT))


def _cfg(terms: str):
    return load_config("pick_place.yaml", [f"loss.task_terms={terms}"])


def _info(waypoint_key="ee_pos", without_targets=()):
    return SimpleNamespace(
        waypoint_key=waypoint_key,
        state_keys=["ee_pos", "gripper_qpos"],
        files_without_targets=list(without_targets),
        image_keys=["agentview_image"],
    )


class HeadlessPolicy:
    """Declares the capabilities of a policy without task heads (as SmolVLA)."""

    task_outputs = frozenset()
    heatmap_count = 0


def _policy(heatmaps: int):
    outputs = HEADS | ({K.OUT_HEATMAP} if heatmaps else set())
    return SimpleNamespace(task_outputs=frozenset(outputs), heatmap_count=heatmaps)


def test_every_term_names_its_labels_and_output():
    assert list(TASK_TERMS) == ["task_id", "progress", "waypoint", "grounding"]
    assert tuple(TASK_TERMS) == TASK_TERM_NAMES  # what loss.task_terms accepts at config load
    assert {t.labels for t in TASK_TERMS.values()} <= set(K.INPUT_KEYS)
    assert {t.output for t in TASK_TERMS.values()} == HEADS | {K.OUT_HEATMAP}
    assert isinstance(_policy(8), TermCapabilities) and not isinstance(object(), TermCapabilities)


def test_data_problems_of_terms_with_weight():
    cfg = _cfg("{task_id: 1.0, waypoint: 5.0, grounding: 10.0}")
    assert task_term_problems(cfg, info=_info()) == []
    found = task_term_problems(cfg, info=_info(waypoint_key=None, without_targets=["a.hdf5"]))
    assert len(found) == 2
    assert found[0].startswith(
        "loss.task_terms.waypoint needs an end-effector position in the data, but none"
    )
    assert "['ee_pos', 'gripper_qpos'] is one (data.waypoint_key=" in found[0]
    assert found[1].startswith(
        "loss.task_terms.grounding needs the image positions of the instruction's objects"
    )
    assert "but a.hdf5 has none for cameras ['agentview_image']; re-collect it" in found[1]
    # weight 0: only logged, nothing required
    quiet = _cfg("{waypoint: 0.0, grounding: 0.0}")
    assert task_term_problems(quiet, info=_info(None, ["a.hdf5"]), policy=HeadlessPolicy()) == []


def test_policy_problems_of_terms_with_weight():
    cfg = _cfg("{task_id: 1.0, progress: 1.0, grounding: 10.0}")
    assert task_term_problems(cfg, policy=_policy(8)) == []
    (few,) = task_term_problems(cfg, policy=_policy(1))
    assert few.startswith(
        "loss.task_terms.grounding needs a backbone with at least 2 spatial-softmax keypoints"
    )
    assert "this model has 1: use the tiny preset or set model.extra.keypoints >= 2" in few
    headless = task_term_problems(cfg, policy=HeadlessPolicy())
    assert headless[0] == (
        "loss.task_terms ['task_id', 'progress']: this model (HeadlessPolicy) has no heads for them; "
        "set loss.task_terms={} (its action loss trains alone)"
    )
    assert "this model has 0" in headless[1]


def test_a_weight_0_term_without_labels_is_skipped_and_one_with_weight_is_an_error():
    batch = {K.ACTION: torch.zeros(2, 3, 4), K.ACTION_IS_PAD: torch.zeros(2, 3, dtype=torch.bool)}
    outputs = {K.OUT_ACTION: torch.zeros(2, 3, 4), K.OUT_WAYPOINT: torch.zeros(2, 3)}
    for name in ("waypoint", "grounding"):
        _, metrics = ActionTaskLoss(LossConfig(task_terms={name: 0.0}), 4)(outputs, batch)
        assert f"loss/task_{name}" not in metrics
    with pytest.raises(ConfigError, match="waypoint.*data.waypoint_key"):
        ActionTaskLoss(LossConfig(task_terms={"waypoint": 1.0}), 4)(outputs, batch)
    # labels present but no prediction: the term's own message, not a KeyError
    with pytest.raises(ConfigError, match="'progress' but the model outputs no progress estimate"):
        ActionTaskLoss(LossConfig(task_terms={"progress": 0.0}), 4)(
            outputs, {**batch, K.PROGRESS: torch.zeros(2)}
        )
