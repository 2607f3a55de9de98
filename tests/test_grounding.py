"""The `grounding` task term end to end: labels from the simulator, stored by the collector, read by
the dataset, moved by augmentation, predicted by the keypoint heat maps and scored by the loss."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from vla_ft import constants as K
from vla_ft.config import LossConfig, load_config
from vla_ft.errors import ConfigError

# imported before any test renders: timm pulls in triton, and importing triton after an in-process
# EGL renderer segfaults (docs/traps.md); this file alone used to crash at the grid test
from vla_ft.models.vision import SpatialSoftmax
from vla_ft.task_terms import grounding_targets


def _pixel(uv: np.ndarray, size: int) -> tuple[int, int]:
    """(row, col) of the pixel whose area holds image point uv = (x, y) in [-1, 1]."""
    col, row = np.floor((np.asarray(uv) + 1.0) / 2.0 * size).astype(int)
    return int(row), int(col)


def test_target_uv_lands_on_the_named_objects_in_both_cameras():
    import envs
    from envs.scene import COLORS

    env = envs.make("pick_place", image_size=96)
    hits, checked = 0, 0
    try:
        for seed in range(8):
            obs, _ = env.reset(seed=seed)
            uv = env.target_uv()
            assert set(uv) == {"agentview_image", "wrist_image"}
            layout, goal = env.sim.layout, env.goal
            for key, points in uv.items():
                assert points.shape == (2, 2) and points.dtype == np.float32
                for j, slot in enumerate((goal.src_slot, goal.dst_slot)):
                    if not (np.abs(points[j]) < 0.95).all():
                        continue  # out of this camera's view
                    r, c = _pixel(points[j], 96)
                    patch = obs[key][r - 2 : r + 3, c - 2 : c + 3].reshape(-1, 3).astype(float)
                    want = np.array(COLORS[layout.color_of(slot)]) * 255
                    # the object's own color within 2 px of the projected centre (shading varies)
                    hits += bool((np.abs(patch - want).max(-1) < 60).any())
                    checked += 1
    finally:
        env.close()
    # agentview sees both objects of every layout; the hand, which starts anywhere over the table,
    # may hide one now and then (seed 0: it stands right over the red cube)
    assert checked >= 16 and hits >= 0.85 * checked, (hits, checked)


def test_target_uv_reach_has_no_destination_and_behind_camera_is_nan():
    import envs
    from envs.rendering import project

    env = envs.make("reach", render=False)
    env.reset(seed=1)
    uv = env.target_uv()
    assert np.isfinite(uv["agentview_image"][0]).all() and np.isnan(uv["agentview_image"][1]).all()
    cam = env.sim.data.cam_xpos[0].copy()  # agentview camera position; a point 1 m behind it
    behind = project(env.sim.model, env.sim.data, "agentview", cam[None] + np.array([[1.0, 0.0, 0.3]]))
    assert np.isnan(behind).all()
    env.close()


def test_collector_stores_targets_per_frame(tmp_path):
    import envs
    from vla_ft.data.collect import episode_seed, run_collect

    cfg = load_config(
        "base.yaml",
        [
            "collect.tasks=[stack]",
            "collect.episodes=2",
            "collect.workers=1",
            f"collect.output={tmp_path / 'd.hdf5'}",
        ],
    )
    run_collect(cfg)
    env = envs.make("stack", image_size=cfg.env.image_size)
    with h5py.File(tmp_path / "d.hdf5", "r") as f:
        for i in range(2):
            grp = f[f"data/demo_{i}"]
            T = len(grp["actions"])
            assert set(grp["targets"]) == {"agentview_image", "wrist_image"}
            env.reset(seed=int(grp.attrs["seed"]))
            for key in ("agentview_image", "wrist_image"):
                arr = grp[f"targets/{key}"][()]
                assert arr.shape == (T, 2, 2)
                np.testing.assert_allclose(arr[0], env.target_uv()[key], atol=1e-6)
            # stack names two cubes; the carried one moves in the image, the lower one does not
            agent = grp["targets/agentview_image"][()]
            assert np.abs(agent[-1, 0] - agent[0, 0]).max() > 0.05
            np.testing.assert_allclose(agent[-1, 1], agent[0, 1], atol=0.02)
        assert int(f["data/demo_0"].attrs["seed"]) == episode_seed(cfg.collect.seed, "stack", 0)
    env.close()


def test_grounding_targets_and_keypoint_grid_share_cell_centres():
    h, w = 4, 8
    uv = torch.tensor([[-1 + 3 / w, -1 + 1 / h]])  # centre of cell (row 0, col 1)
    t = grounding_targets(uv, h, w)
    assert t.shape == (1, h * w) and int(t.argmax()) == 1
    assert torch.allclose(t.sum(-1), torch.ones(1))
    ss = SpatialSoftmax(channels=3, keypoints=1, out_dim=4)
    with torch.no_grad():
        ss.heatmaps.weight.zero_()
        ss.heatmaps.bias.zero_()
        ss.heatmaps.weight[0, 0] = 100.0
    feats = torch.zeros(1, 3, h, w)
    feats[0, 0, 2, 5] = 1.0  # a sharp heat map at row 2, col 5
    tokens, heat = ss(feats)
    assert heat.shape == (1, 1, h, w) and int(heat.flatten().argmax()) == 2 * w + 5
    # the keypoint of that heat map is the centre of cell (2, 5): what grounding_targets puts there
    logits = heat.flatten(2)
    point = logits.softmax(-1) @ torch.stack(
        torch.meshgrid(
            torch.linspace(-1 + 1 / w, 1 - 1 / w, w), torch.linspace(-1 + 1 / h, 1 - 1 / h, h), indexing="xy"
        ),
        -1,
    ).reshape(-1, 2)
    assert torch.allclose(point[0, 0], torch.tensor([-1 + 11 / w, -1 + 5 / h]), atol=1e-4)


def test_grounding_loss_by_hand():
    from vla_ft.losses import ActionTaskLoss
    from vla_ft.task_terms import TASK_TERMS

    b, k, q, h, w = 2, 2, 3, 4, 4
    heat = torch.randn(b, k, q, h, w)
    uv = torch.full((b, k, 2, 2), float("nan"))
    uv[0, 0, 0] = torch.tensor([0.1, -0.2])
    uv[1, 1, 1] = torch.tensor([0.5, 0.5])
    uv[1, 0, 0] = torch.tensor([1.5, 0.0])  # out of view: ignored
    loss = TASK_TERMS["grounding"]({K.OUT_HEATMAP: heat}, {K.TARGET_UV: uv}, 0.0)
    t0 = grounding_targets(uv[0, 0, 0], h, w)
    t1 = grounding_targets(uv[1, 1, 1], h, w)
    ce0 = -(t0 * heat[0, 0, 0].flatten().log_softmax(-1)).sum()
    ce1 = -(t1 * heat[1, 1, 1].flatten().log_softmax(-1)).sum()
    assert torch.allclose(loss, (ce0 + ce1) / 2)
    # heat maps 2.. are free keypoints: changing them changes nothing
    heat2 = heat.clone()
    heat2[:, :, 2] = 0
    assert torch.allclose(TASK_TERMS["grounding"]({K.OUT_HEATMAP: heat2}, {K.TARGET_UV: uv}, 0.0), loss)
    # a heat map equal to the target's log-probabilities reaches the minimum, the target's entropy
    best = heat.clone()
    best[0, 0, 0] = t0.log().view(h, w)
    best[1, 1, 1] = t1.log().view(h, w)
    ent = (-(t0 * t0.log()).sum() - (t1 * t1.log()).sum()) / 2
    assert torch.allclose(TASK_TERMS["grounding"]({K.OUT_HEATMAP: best}, {K.TARGET_UV: uv}, 0.0), ent)
    assert loss > ent
    # in the combined loss, weighted by w_task * weight and logged
    crit = ActionTaskLoss(LossConfig(w_task=0.5, task_terms={"grounding": 2.0}), action_dim=4)
    outputs = {K.OUT_ACTION: torch.zeros(b, 3, 4), K.OUT_HEATMAP: heat}
    batch = {
        K.ACTION: torch.zeros(b, 3, 4),
        K.ACTION_IS_PAD: torch.zeros(b, 3, dtype=torch.bool),
        K.TARGET_UV: uv,
    }
    total, metrics = crit(outputs, batch)
    assert torch.allclose(metrics["loss/task_grounding"], loss)
    assert math.isclose(float(total), float(loss), rel_tol=1e-5)  # 0.5 * 2.0 * loss, action loss 0


def test_grounding_loss_errors_name_the_fix():
    from vla_ft.task_terms import TASK_TERMS

    heat = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ConfigError, match="re-collect the files, or remove 'grounding'"):
        TASK_TERMS["grounding"]({K.OUT_HEATMAP: heat}, {}, 0.0)
    with pytest.raises(ConfigError, match="keypoints >= 2"):
        TASK_TERMS["grounding"]({}, {K.TARGET_UV: torch.zeros(1, 1, 2, 2)}, 0.0)
