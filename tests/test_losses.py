import pytest
import torch

from vla_ft import constants as K
from vla_ft.config import LossConfig
from vla_ft.errors import ConfigError
from vla_ft.losses import ActionTaskLoss, bin_centers, discretize


def _batch(B=3, H=4, A=4, NT=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    is_pad = torch.zeros(B, H, dtype=torch.bool)
    is_pad[0, 2:] = True
    batch = {
        K.ACTION: torch.randn(B, H, A, generator=g),
        K.ACTION_IS_PAD: is_pad,
        K.TASK_ID: torch.tensor([0, 1, 1][:B]),
        K.PROGRESS: torch.rand(B, generator=g),
    }
    out = {
        K.OUT_ACTION: torch.randn(B, H, A, generator=g),
        K.OUT_TASK_LOGITS: torch.randn(B, NT, generator=g),
        K.OUT_PROGRESS: torch.rand(B, generator=g),
    }
    return out, batch


def test_combined_loss_matches_hand_computation():
    out, batch = _batch()
    cfg = LossConfig(w_action=1.0, w_task=0.5, action="l1", task_terms={"task_id": 1.0, "progress": 2.0})
    loss, m = ActionTaskLoss(cfg, action_dim=4)(out, batch)
    valid = ~batch[K.ACTION_IS_PAD]
    l1 = (out[K.OUT_ACTION] - batch[K.ACTION]).abs()[valid].mean()
    ce = torch.nn.functional.cross_entropy(out[K.OUT_TASK_LOGITS], batch[K.TASK_ID])
    mse = ((out[K.OUT_PROGRESS] - batch[K.PROGRESS]) ** 2).mean()
    expected = l1 + 0.5 * (ce + 2.0 * mse)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(m["loss/action"], l1)
    torch.testing.assert_close(m["loss/task_task_id"], ce)
    torch.testing.assert_close(m["loss/task_progress"], mse)
    per_dim = (out[K.OUT_ACTION] - batch[K.ACTION]).abs()[valid].mean(0)
    for i in range(4):
        torch.testing.assert_close(m[f"action_err/dim{i}"], per_dim[i])


def test_padding_is_ignored():
    out, batch = _batch()
    cfg = LossConfig(w_task=0.0)
    base, _ = ActionTaskLoss(cfg, 4)(out, batch)
    out2 = dict(out)
    pred = out[K.OUT_ACTION].clone()
    pred[0, 2:] += 100.0  # only padded steps change
    out2[K.OUT_ACTION] = pred
    again, _ = ActionTaskLoss(cfg, 4)(out2, batch)
    torch.testing.assert_close(base, again)


@pytest.mark.parametrize("kind", ["l1", "mse", "huber"])
def test_dim_weights_scale_terms(kind):
    out, batch = _batch()
    w = [1.0, 0.0, 0.0, 0.0]
    loss_w, _ = ActionTaskLoss(LossConfig(action=kind, w_task=0.0, dim_weights=w), 4)(out, batch)
    sub_out = {K.OUT_ACTION: out[K.OUT_ACTION][..., :1]}
    sub_batch = {K.ACTION: batch[K.ACTION][..., :1], K.ACTION_IS_PAD: batch[K.ACTION_IS_PAD]}
    loss_1, _ = ActionTaskLoss(LossConfig(action=kind, w_task=0.0, gripper_dim=0), 1).action_loss(
        sub_out, sub_batch
    )
    torch.testing.assert_close(loss_w, loss_1)


def test_binned_cross_entropy_and_discretize():
    x = torch.tensor([-1.5, -1.0, -0.001, 0.0, 0.999, 1.0, 3.0])
    ids = discretize(x, 4)
    assert ids.tolist() == [0, 0, 1, 2, 3, 3, 3]
    centers = bin_centers(4)
    assert torch.allclose(centers, torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    out, batch = _batch()
    NB = 8
    target_ids = discretize(batch[K.ACTION], NB)
    perfect = torch.full((*batch[K.ACTION].shape, NB), -30.0).scatter(-1, target_ids.unsqueeze(-1), 30.0)
    out[K.OUT_ACTION_LOGITS] = perfect
    loss, _ = ActionTaskLoss(LossConfig(w_task=0.0), 4, head="binned", n_bins=NB)(out, batch)
    assert loss < 1e-6
    out[K.OUT_ACTION_LOGITS] = torch.zeros_like(perfect)
    uniform, _ = ActionTaskLoss(LossConfig(w_task=0.0), 4, head="binned", n_bins=NB)(out, batch)
    torch.testing.assert_close(uniform, torch.log(torch.tensor(float(NB))))


def test_gripper_accuracy_uses_gripper_zero():
    out, batch = _batch(B=1, H=2, A=2)
    batch[K.ACTION_IS_PAD] = torch.zeros(1, 2, dtype=torch.bool)
    batch[K.ACTION] = torch.tensor([[[0.0, 0.4], [0.0, 0.6]]])
    out[K.OUT_ACTION] = torch.tensor([[[0.0, 0.6], [0.0, 0.6]]])
    _, m = ActionTaskLoss(LossConfig(w_task=0.0), 2, gripper_zero=0.5)(out, batch)
    assert m["gripper_acc"].item() == pytest.approx(0.5)
    _, m = ActionTaskLoss(LossConfig(w_task=0.0), 2)(out, batch)
    assert m["gripper_acc"].item() == pytest.approx(1.0)


def test_bad_dim_weights_named():
    with pytest.raises(ConfigError, match="loss.dim_weights has 2 values.*4 dimensions"):
        ActionTaskLoss(LossConfig(dim_weights=[1.0, 1.0]), 4)


def test_loss_is_differentiable():
    out, batch = _batch()
    out = {k: v.requires_grad_() for k, v in out.items()}
    loss, _ = ActionTaskLoss(LossConfig(), 4)(out, batch)
    loss.backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in out.values())


def test_waypoint_term_is_smooth_l1_and_needs_targets():
    out, batch = _batch()
    g = torch.Generator().manual_seed(3)
    out[K.OUT_WAYPOINT] = torch.randn(3, 3, generator=g) * 2
    batch[K.WAYPOINT] = torch.randn(3, 3, generator=g)
    cfg = LossConfig(w_action=0.0, w_task=2.0, task_terms={"waypoint": 3.0})
    loss, m = ActionTaskLoss(cfg, action_dim=4)(out, batch)
    d = (out[K.OUT_WAYPOINT] - batch[K.WAYPOINT]).abs()
    expected = torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()
    torch.testing.assert_close(m["loss/task_waypoint"], expected)
    torch.testing.assert_close(loss, 2.0 * 3.0 * expected)
    del batch[K.WAYPOINT]
    with pytest.raises(ConfigError, match="waypoint.*data.waypoint_key"):
        ActionTaskLoss(cfg, action_dim=4)(out, batch)
    with pytest.raises(ConfigError, match="task_id, progress, waypoint"):
        LossConfig(task_terms={"where": 1.0})
