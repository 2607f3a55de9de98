"""Parameter metadata, freezing, gradient checkpointing, binning, and inference queues."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import make_batch, make_info, make_obs, simple_loss

from vla_ft import constants as C
from vla_ft.config import ModelConfig
from vla_ft.losses import discretize
from vla_ft.models import count_parameters, load_vla, param_info


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_vla(ModelConfig(preset="tiny"), make_info())


@pytest.mark.parametrize("preset", ["tiny", "tiny-vlm"])
def test_param_info_covers_every_parameter(preset):
    policy = load_vla(ModelConfig(preset=preset), make_info())
    info = param_info(policy)
    assert list(info) == [n for n, _ in policy.named_parameters()]
    assert {i.module for i in info.values()} == set(C.MODULES)
    assert all(0 <= i.depth < i.num_layers for i in info.values())
    lang = {n: i for n, i in info.items() if i.module == C.MODULE_LANGUAGE}
    emb = [i for n, i in lang.items() if "embed_tokens" in n]
    top = [i for n, i in lang.items() if n.endswith("norm.weight") and ".layers." not in n]
    assert emb[0].depth == 0 and top[0].depth == top[0].num_layers - 1
    blocks = sorted({i.depth for n, i in lang.items() if ".layers." in n})
    assert blocks == list(range(1, top[0].num_layers - 1))
    vision = [i.depth for i in info.values() if i.module == C.MODULE_VISION]
    assert min(vision) == 0 and len(set(vision)) >= 3  # stem, stages/blocks, top


def test_tiny_vision_depth_follows_stages(tiny):
    info = param_info(tiny)
    d = {
        n.removeprefix("backbone.vision.model."): i.depth
        for n, i in info.items()
        if i.module == C.MODULE_VISION
    }
    assert (
        d["conv1.0.weight"]
        < d["layer1.0.conv1.weight"]
        < d["layer2.0.conv1.weight"]
        < d["layer4.0.conv1.weight"]
    )


def test_freeze_and_count():
    policy = load_vla(ModelConfig(preset="tiny", freeze=["vision"]), make_info())
    trainable, total = count_parameters(policy)
    n_vision = sum(p.numel() for n, p in policy.named_parameters() if n.startswith("backbone.vision."))
    assert trainable == total - n_vision


@pytest.mark.parametrize("preset", ["tiny", "tiny-vlm"])
def test_gradient_checkpointing_same_result(preset):
    torch.manual_seed(0)
    policy = load_vla(ModelConfig(preset=preset), make_info())
    batch = make_batch(make_info())
    simple_loss(policy(batch), batch).backward()
    ref = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    policy.set_gradient_checkpointing(True)
    policy.train()
    hf = policy.backbone.model if preset == "tiny-vlm" else policy.backbone.language.model
    assert getattr(hf, "is_activation_checkpointing", None) or hf.is_gradient_checkpointing
    if preset == "tiny":
        assert policy.backbone.vision.model.grad_checkpointing
    simple_loss(policy(batch), batch).backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bins_match_the_loss_discretization():
    policy = load_vla(ModelConfig(preset="tiny", action_head="binned", n_bins=16, bin_range=1.5), make_info())
    x = torch.linspace(-3, 3, 101)
    low, high = policy.bin_range
    # by hand: clamp to [-1.5, 1.5], scale to [0, 16], floor, the top edge into the last bin
    expected = ((x.clamp(low, high) - low) / (high - low) * 16).long().clamp(0, 15)
    assert torch.equal(discretize(x, 16, low, high), expected)
    assert torch.equal(policy.action_bins.to_bins(x), expected)
    inside = torch.linspace(-1.49, 1.49, 50)
    assert (policy.action_bins.from_bins(policy.action_bins.to_bins(inside)) - inside).abs().max() <= 1.5 / 16


def test_select_action_queue(tiny, monkeypatch):
    calls = []
    chunk = np.arange(4 * 4, dtype=np.float32).reshape(1, 4, 4)

    def fake_predict(obs, instr):
        calls.append(obs["agentview_image"].shape)
        return chunk + len(calls)

    monkeypatch.setattr(tiny, "predict_action", fake_predict)
    tiny.reset()
    obs = make_obs(make_info())
    acts = [tiny.select_action(obs, "go") for _ in range(6)]
    assert len(calls) == 2 and calls[0] == (1, 1, 64, 64, 3)  # (N, T, H, W, 3) handed to predict
    np.testing.assert_array_equal(acts[0], chunk[0, 0] + 1)
    np.testing.assert_array_equal(acts[4], chunk[0, 0] + 2)
    tiny.reset()
    tiny.select_action(obs, "go")
    assert len(calls) == 3


def test_select_action_temporal_ensemble(monkeypatch):
    policy = load_vla(ModelConfig(preset="tiny", temporal_ensemble=0.5), make_info())
    preds = iter([np.full((1, 4, 4), 1.0, np.float32), np.full((1, 4, 4), 3.0, np.float32)])
    monkeypatch.setattr(policy, "predict_action", lambda obs, instr: next(preds))
    obs = make_obs(make_info())
    assert np.allclose(policy.select_action(obs, "go"), 1.0)
    w = np.exp(-0.5 * np.arange(2))  # oldest first
    assert np.allclose(policy.select_action(obs, "go"), (w[0] * 1.0 + w[1] * 3.0) / w.sum())


def test_real_select_action_runs(tiny):
    tiny.reset()
    info = make_info()
    a = tiny.select_action(make_obs(info), "pick up the cube")
    assert a.shape == (4,) and ((a >= -1) & (a <= 1)).all()
    tiny.reset()  # a new batch of episodes
    b = tiny.select_action(make_obs(info, n=2), ["a", "b"])
    assert b.shape == (2, 4)


@pytest.mark.parametrize("preset", ["tiny", "tiny-vlm"])
def test_size_overrides_apply_to_the_language_model(preset):
    policy = load_vla(ModelConfig(preset=preset, hidden_size=64, num_layers=1, num_heads=2), make_info())
    cfg = (
        policy.backbone.model.config.text_config
        if preset == "tiny-vlm"
        else policy.backbone.language.model.config
    )
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 1, 2)
    assert policy(make_batch(make_info()))[C.OUT_HIDDEN].shape[-1] == 64


@pytest.mark.parametrize("preset", ["tiny", "tiny-vlm"])
def test_prediction_does_not_depend_on_the_batch_padding(preset):
    """A short instruction batched with a long one gives the same chunk as alone (position ids skip pads)."""
    policy = load_vla(ModelConfig(preset=preset), make_info())
    obs = make_obs(make_info(), n=2)
    both = policy.predict_action(obs, ["go", "pick up the red cube and put it in the blue bowl"])
    alone = policy.predict_action({k: v[:1] for k, v in obs.items()}, ["go"])
    np.testing.assert_allclose(both[:1], alone, rtol=1e-4, atol=1e-5)


def test_history_frames(monkeypatch):
    info = make_info(history=2)
    policy = load_vla(ModelConfig(preset="tiny"), info)
    assert policy(make_batch(info))[C.OUT_ACTION].shape == (3, 4, 4)
    assert policy.predict_action(make_obs(info), "go").shape == (4, 4)  # one frame: repeated to 2
    seen = []
    real = policy.predict_action
    monkeypatch.setattr(policy, "predict_action", lambda obs, instr: seen.append(obs) or real(obs, instr))
    policy.reset()
    first, second = make_obs(info, seed=1), make_obs(info, seed=2)
    policy.select_action(first, "go")
    policy.cfg.n_action_steps = 1
    policy.reset()
    policy.select_action(first, "go")
    policy.select_action(second, "go")
    stacked = seen[-1]["wrist_image"]  # (N, T, H, W, 3): previous then current frame
    assert stacked.shape[:2] == (1, 2)
    assert np.array_equal(stacked[0, 0], first["wrist_image"]) and np.array_equal(
        stacked[0, 1], second["wrist_image"]
    )
