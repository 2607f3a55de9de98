"""Every trainable preset x every action head: finite loss, gradients, bit-identical save/load,
predict_action in env units within bounds. Large VLM presets are built on the meta device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import make_batch, make_info, make_obs, simple_loss

from vla_ft import constants as C
from vla_ft.config import ModelConfig
from vla_ft.models import ModelDims, VLAPolicy, build_policy, count_parameters, list_presets, load_vla

TRAINABLE = ["tiny", pytest.param("small", marks=pytest.mark.slow), "tiny-vlm", "bc-cnn"]
TRAINABLE_NAMES = ["tiny", "small", "tiny-vlm", "bc-cnn"]
HEADS = ["continuous", "binned"]
META_ONLY = {"smolvlm-256m": (220e6, 240e6), "smolvlm-500m": (450e6, 475e6)}  # backbone without LM head


def test_every_preset_is_covered():
    assert sorted(TRAINABLE_NAMES + list(META_ONLY)) == list_presets()


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("preset", TRAINABLE)
def test_preset_trains_saves_and_predicts(preset, head, tmp_path):
    torch.manual_seed(0)
    info = make_info()
    policy = load_vla(ModelConfig(preset=preset, action_head=head, n_bins=32), info)
    trainable, total = count_parameters(policy)
    assert trainable == total > 0  # full-parameter fine-tuning: everything trainable

    batch = make_batch(info)
    before = {k: v.clone() for k, v in batch.items()}
    out = policy(batch)
    assert all(torch.equal(before[k], batch[k]) for k in batch)  # forward does not mutate the batch
    assert out[C.OUT_ACTION].shape == (3, info.chunk, info.action_dim)
    assert out[C.OUT_TASK_LOGITS].shape == (3, 2) and out[C.OUT_PROGRESS].shape == (3,)
    if head == "binned":
        assert out[C.OUT_ACTION_LOGITS].shape == (3, info.chunk, info.action_dim, 32)
    loss = simple_loss(out, batch)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in policy.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    # zero-initialized residual branches (timm zero_init_last) get zero gradient only at step 0:
    # after one optimizer step every parameter must receive a nonzero gradient
    torch.optim.SGD(policy.parameters(), lr=0.05).step()
    policy.zero_grad()
    simple_loss(policy(batch), batch).backward()
    zero = [n for n, p in policy.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert zero == []

    policy.eval()
    with torch.no_grad():
        ref = policy(batch)
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        got = loaded(batch)
    for key in (C.OUT_ACTION, C.OUT_TASK_LOGITS, C.OUT_PROGRESS):
        assert torch.equal(ref[key], got[key]), key
    assert loaded.tokenizer("pick")["input_ids"] == policy.tokenizer("pick")["input_ids"]

    chunk = loaded.predict_action(make_obs(info), "pick up the cube")
    assert chunk.shape == (info.chunk, info.action_dim) and chunk.dtype == np.float32
    chunks = loaded.predict_action(make_obs(info, n=2), ["pick up the cube", "place it"])
    assert chunks.shape == (2, info.chunk, info.action_dim)
    assert (chunks >= -1).all() and (chunks <= 1).all()
    # env units: the normalizer maps [-1, 1] to [-3, 5], so unclipped values would often exceed 1
    norm = loaded(loaded._inputs(make_obs(info, n=2), ["pick up the cube", "place it"]))[C.OUT_ACTION]
    expected = np.clip(info.normalizer.unnormalize_action(norm.detach().numpy()), -1, 1)
    np.testing.assert_allclose(chunks, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", sorted(META_ONLY))
def test_published_size_vlm_builds_on_meta(preset):
    dims = ModelDims(action_dim=7, state_dim=8, image_keys=["a", "b"], chunk=8)
    with torch.device("meta"):
        policy = build_policy(ModelConfig(preset=preset), dims)
    _, total = count_parameters(policy)
    lo, hi = META_ONLY[preset]
    assert lo < total < hi
    assert type(policy.backbone.model).__name__ == "Idefics3Model"


@pytest.mark.parametrize(
    "preset, extra, pattern",
    [
        (
            "tiny-vlm",
            {"pool_grid": 2},
            r"model.extra has pool_grid, which a vlm model \(model.preset='tiny-vlm'\)",
        ),
        (
            "tiny",
            {"channels": [8]},
            r"model.extra has channels, which a native model .*knobs are vision_kwargs",
        ),
    ],
)
def test_a_knob_of_another_kind_of_model_is_one_error(preset, extra, pattern):
    from vla_ft.errors import ConfigError
    from vla_ft.models.loading import resolve_arch

    with pytest.raises(ConfigError, match=pattern):
        resolve_arch(ModelConfig(preset=preset, extra=extra))
    assert resolve_arch(ModelConfig(preset=preset, extra={"num_steps": 4}))["kind"] in ("vlm", "native")


def test_policies_declare_their_capabilities():
    info = make_info()
    tiny, vlm, cnn = (load_vla(ModelConfig(preset=p), info) for p in ("tiny", "tiny-vlm", "bc-cnn"))
    assert tiny.heatmap_count == 8 and C.OUT_HEATMAP in tiny.task_outputs and tiny.lora_problem(4) is None
    assert vlm.heatmap_count == 0 and vlm.task_outputs == {C.OUT_TASK_LOGITS, C.OUT_PROGRESS, C.OUT_WAYPOINT}
    assert cnn.heatmap_count == 0 and "bc-cnn" in cnn.lora_problem(4)
    with pytest.raises(TypeError, match="does not implement vla_ft.models.backbone.Backbone"):
        VLAPolicy(tiny.cfg, tiny.dims, torch.nn.Linear(2, 2), tiny.tokenizer, tiny.arch)
