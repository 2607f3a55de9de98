"""model.action_head=flow on our own presets: flow-matching training outputs, sampling, save/load."""

from __future__ import annotations

import numpy as np
import torch
from model_helpers import make_batch, make_info, make_obs

from vla_ft import constants as C
from vla_ft.config import LossConfig, ModelConfig
from vla_ft.losses import ActionTaskLoss
from vla_ft.models import VLAPolicy, build_policy
from vla_ft.models.flow import euler_integrate
from vla_ft.models.heads import FlowActionHead
from vla_ft.models.policy import ModelDims


def _policy(preset: str = "tiny") -> VLAPolicy:
    torch.manual_seed(0)
    info = make_info()
    policy = build_policy(ModelConfig(preset=preset, action_head="flow"), ModelDims.from_info(info))
    policy.set_normalizer(info.normalizer)
    return policy


def test_training_forward_gives_the_velocity_error_and_every_parameter_learns():
    policy = _policy().train()
    batch = make_batch(make_info())
    out = policy(batch)
    assert out[C.OUT_FLOW_ERR].shape == out[C.OUT_ACTION].shape == batch[C.ACTION].shape
    loss_fn = ActionTaskLoss(LossConfig(task_terms={"task_id": 1.0, "progress": 1.0}), 4, head="flow")
    loss, metrics = loss_fn(out, batch)
    loss.backward()
    head = [n for n, p in policy.named_parameters() if n.startswith("action_head.") and p.grad is None]
    assert not head and torch.isfinite(metrics["loss/action"])
    assert policy.action_head.action_in.weight.grad.abs().sum() > 0  # the noisy chunk is an input


def test_sampling_integrates_the_head_from_noise_and_is_seeded():
    policy = _policy().eval()
    batch = {k: v for k, v in make_batch(make_info()).items() if k != C.ACTION}
    torch.manual_seed(3)
    a = policy(batch)[C.OUT_ACTION]
    torch.manual_seed(3)
    b = policy(batch)[C.OUT_ACTION]
    assert a.shape == (3, 4, 4) and torch.equal(a, b) and torch.isfinite(a).all()
    chunk = policy.predict_action(make_obs(make_info()), "put the red cube in the blue bowl")
    assert chunk.shape == (4, 4) and np.isfinite(chunk).all()


def test_euler_sampling_follows_a_known_field_to_its_target():
    """With the exact velocity of the straight noise->target line, 10 Euler steps land on the target."""
    target = torch.tensor([[[0.5, -1.0]]])
    noise = torch.tensor([[[2.0, 3.0]]])
    out = euler_integrate(lambda x, t: noise - target, noise, 10)
    torch.testing.assert_close(out, target)


def test_flow_head_round_trips_through_a_checkpoint(tmp_path):
    policy = _policy().eval()
    policy.save_pretrained(tmp_path / "ckpt")
    again = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(again.action_head, FlowActionHead)
    batch = {k: v for k, v in make_batch(make_info()).items() if k != C.ACTION}
    torch.manual_seed(1)
    a = policy(batch)[C.OUT_ACTION]
    torch.manual_seed(1)
    assert torch.equal(a, again(batch)[C.OUT_ACTION])


def test_a_continuous_checkpoint_fine_tuned_with_the_flow_head_gets_its_new_tensors(tmp_path, caplog):
    info = make_info()
    torch.manual_seed(0)
    base = build_policy(ModelConfig(preset="tiny"), ModelDims.from_info(info))
    base.save_pretrained(tmp_path / "base")
    with caplog.at_level("WARNING"):
        policy = VLAPolicy.from_pretrained(tmp_path / "base", ModelConfig(action_head="flow"), info)
    assert isinstance(policy.action_head, FlowActionHead) and "action_head.action_in.weight" in caplog.text
    for name, value in base.state_dict().items():  # the rest, the MLP trunk included, is loaded
        assert torch.equal(policy.state_dict()[name], value), name
