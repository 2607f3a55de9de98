"""SmolVLA (vla_ft.models.smolvla / smolvla_io) against tensors lerobot 0.6.1 itself computed.

tests/fixtures/lerobot/smolvla_tiny/ is a LeRobot SmolVLA checkpoint (tiny SmolVLM config, 30
training steps) and smolvla_reference.safetensors holds, for a batch of 2 samples, every stage of
LeRobot's pipeline: preprocessor output (``pre.*``), model inputs (``model.*``), the training
forward with fixed noise/time (``forward.*``), Euler sampling with fixed noise (``sample.*``), the
un-normalized chunk (``predict.*``) and resize_with_pad on a non-square crop (``resize.*``). Float32
on CPU throughout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vla_ft.errors import ConfigError
from vla_ft.models.flow import masked_flow_loss, noisy_actions, sample_time
from vla_ft.models.smolvla import from_lerobot_key, pad_last_dim, to_lerobot_key
from vla_ft.models.smolvla_io import (
    compute_loss,
    load_lerobot_smolvla,
    model_inputs,
    predict_action_chunk,
    save_lerobot_smolvla,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "lerobot"
CKPT = FIXTURES / "smolvla_tiny"
CAMS = ("observation.images.front", "observation.images.wrist")


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "smolvla_reference.safetensors"))


@pytest.fixture(scope="module")
def ref_info() -> dict:
    return json.loads((FIXTURES / "smolvla_reference.json").read_text())


@pytest.fixture(scope="module")
def loaded():
    return load_lerobot_smolvla(CKPT)


@pytest.fixture(scope="module")
def batch(loaded, ref, ref_info):
    """The preprocessed training batch, built from the raw user inputs."""
    _, proc = loaded
    obs = {c: ref[f"raw.{c}"] for c in CAMS} | {"observation.state": ref["raw.observation.state"]}
    return proc(obs, ref_info["tasks"], action=ref["raw.action"], action_is_pad=ref["raw.action_is_pad"])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------- preprocessing
def test_preprocessor_matches_lerobot(loaded, batch, ref, ref_info):
    _, proc = loaded
    assert proc.camera_keys == list(CAMS)
    assert batch["task"] == ref_info["tasks_after_newline"]
    assert torch.equal(batch["observation.language.tokens"], ref["pre.observation.language.tokens"])
    assert batch["observation.language.tokens"].dtype == torch.int64
    assert torch.equal(
        batch["observation.language.attention_mask"], ref["pre.observation.language.attention_mask"]
    )
    tokens = [
        proc.tokenizer.convert_ids_to_tokens(row) for row in batch["observation.language.tokens"].tolist()
    ]
    assert tokens == ref_info["token_strings"]
    for c in CAMS:  # uint8 HWC -> float CHW / 255 exactly, images are not normalized
        assert torch.equal(batch[c], ref[f"input.{c}"])
        assert torch.equal(batch[c], ref[f"pre.{c}"])
    assert _max_diff(batch["observation.state"], ref["pre.observation.state"]) <= 1e-6
    assert _max_diff(batch["action"], ref["pre.action"]) <= 1e-6
    assert torch.equal(batch["action_is_pad"], ref["pre.action_is_pad"])
    # inference call (no action): same state and tokens; float CHW input is accepted as is
    obs = {c: ref[f"input.{c}"] for c in CAMS} | {"observation.state": ref["raw.observation.state"]}
    inf = proc(obs, ref_info["tasks"])
    assert "action" not in inf
    assert torch.equal(inf["observation.language.tokens"], batch["observation.language.tokens"])
    assert torch.equal(inf["observation.state"], batch["observation.state"])


def test_newline_and_truncation(loaded):
    _, proc = loaded
    one, _ = proc.tokenize("pick up the red cube")
    two, _ = proc.tokenize("pick up the red cube\n")
    assert torch.equal(one, two) and one.shape == (1, 6)
    long_ids, long_mask = proc.tokenize(["pick up the red cube " * 30, "open the top drawer"])
    assert long_ids.shape == (2, proc.max_length) and long_mask[0].all() and not long_mask[1].all()
    assert (long_ids[1][~long_mask[1]] == 0).all()  # right padding with id 0


def test_model_inputs_match_lerobot(loaded, batch, ref):
    model, proc = loaded
    inputs = model_inputs(model, proc, batch)
    for c, img, mask in zip(CAMS, inputs["images"], inputs["img_masks"]):
        assert _max_diff(img, ref[f"model.images.{c}"]) <= 1e-6
        assert torch.equal(mask, ref[f"model.img_masks.{c}"])
    assert torch.equal(pad_last_dim(inputs["state"], 8), ref["model.state_padded"])
    assert torch.equal(pad_last_dim(batch["action"], 8), ref["model.actions_padded"])


def test_resize_with_pad_non_square(loaded, ref):
    model, _ = loaded
    images, _ = model.prepare_images([ref["resize.input"]])
    assert images[0].shape == ref["resize.output"].shape
    assert _max_diff(images[0], ref["resize.output"]) <= 1e-6


# ---------------------------------------------------------------------------------------------- network
def test_prefix_and_suffix_embeddings(loaded, batch, ref):
    model, proc = loaded
    inputs = model_inputs(model, proc, batch)
    with torch.no_grad():
        embs, pad, flags = model.embed_prefix(
            inputs["images"], inputs["img_masks"], inputs["tokens"], inputs["token_mask"], inputs["state"]
        )
        x_t, u_t = noisy_actions(ref["model.actions_padded"], ref["forward.noise"], ref["forward.time"])
        s_embs, s_pad, s_flags = model.embed_suffix(x_t, ref["forward.time"])
    # image tokens pass the vision tower: float32 kernel noise of a few ulps (values up to ~28)
    torch.testing.assert_close(embs, ref["model.prefix_embs"], rtol=1e-5, atol=5e-5)
    assert torch.equal(pad, ref["model.prefix_pad_masks"])
    assert torch.equal(flags, ref["model.prefix_att_masks"])
    assert _max_diff(x_t, ref["forward.x_t"]) <= 1e-6 and _max_diff(u_t, ref["forward.u_t"]) <= 1e-6
    assert _max_diff(s_embs, ref["model.suffix_embs"]) <= 1e-5
    assert s_pad.all() and torch.equal(s_flags, ref["model.suffix_att_masks"].bool())


def test_training_forward_matches_lerobot(loaded, batch, ref):
    model, proc = loaded
    with torch.no_grad():
        out = compute_loss(model, proc, batch, noise=ref["forward.noise"], time=ref["forward.time"])
    assert _max_diff(out.v_t, ref["forward.v_t"]) <= 1e-5
    assert _max_diff(out.losses, ref["forward.losses_elementwise"]) <= 1e-5
    torch.testing.assert_close(out.loss, ref["forward.loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(out.per_sample, ref["forward.loss_per_sample"], rtol=1e-5, atol=0)
    # the unmasked mean (what LeRobot logs as losses_after_forward) is a different number
    assert abs(out.losses[..., :4].mean().item() - 2.0369315) < 1e-5
    assert abs(out.loss.item() - 1.8234636) < 1e-5


def test_sampling_matches_lerobot(loaded, batch, ref):
    model, proc = loaded
    inputs = model_inputs(model, proc, batch)
    with torch.no_grad():
        actions, velocities = model.sample_actions(
            **inputs, noise=ref["sample.noise"], return_velocities=True
        )
    assert velocities.shape == ref["sample.v_t_steps"].shape
    assert _max_diff(velocities, ref["sample.v_t_steps"]) <= 1e-4
    assert _max_diff(actions, ref["sample.actions_full"]) <= 1e-4
    normalized, unnormalized = predict_action_chunk(model, proc, batch, noise=ref["sample.noise"])
    assert _max_diff(normalized, ref["predict.actions_normalized"]) <= 1e-4
    assert _max_diff(unnormalized, ref["predict.actions_unnormalized"]) <= 1e-4
    assert _max_diff(unnormalized[:, 0], ref["select_action.first_unnormalized"]) <= 1e-4
    assert not torch.equal(ref["sample.noise"], actions)  # the noise tensor is not modified in place


# ---------------------------------------------------------------------------------------------- names
def test_state_dict_names_map_to_lerobot(loaded):
    model, proc = loaded
    file_keys = set(load_file(str(CKPT / "model.safetensors")))
    names = list(model.state_dict())
    assert {to_lerobot_key(n) for n in names} | set(proc.extra_tensors) == file_keys
    assert all(from_lerobot_key(to_lerobot_key(n)) == n for n in names)
    # tensors that cannot reach the action output are buffers: the VLM final norm and, in the
    # last VLM layer, everything but the key/value path
    buffers = {n for n, _ in model.named_buffers()}
    assert buffers == {
        "vlm_norm.weight",
        "vlm_layers.1.self_attn.q_proj.weight",
        "vlm_layers.1.self_attn.o_proj.weight",
        "vlm_layers.1.post_attention_layernorm.weight",
        "vlm_layers.1.mlp.gate_proj.weight",
        "vlm_layers.1.mlp.up_proj.weight",
        "vlm_layers.1.mlp.down_proj.weight",
    }


# ---------------------------------------------------------------------------------------------- round trip
def test_save_load_round_trip(loaded, batch, ref, tmp_path):
    model, proc = loaded
    out = save_lerobot_smolvla(model, proc, tmp_path / "export")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    src = load_file(str(CKPT / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(src)
    assert all(written[k].shape == src[k].shape and torch.equal(written[k], src[k]) for k in src)

    cfg_src = json.loads((CKPT / "config.json").read_text())
    cfg_out = json.loads((out / "config.json").read_text())
    assert set(cfg_out) == set(cfg_src)
    assert {k: v for k, v in cfg_out.items() if k != "vlm_model_name"} == {
        k: v for k, v in cfg_src.items() if k != "vlm_model_name"
    }
    assert Path(cfg_out["vlm_model_name"]) == out / "vlm" and (out / "vlm" / "tokenizer.json").is_file()
    for name in (
        "policy_preprocessor_step_5_normalizer_processor",
        "policy_postprocessor_step_0_unnormalizer_processor",
    ):
        a, b = load_file(str(CKPT / f"{name}.safetensors")), load_file(str(out / f"{name}.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    model2, proc2 = load_lerobot_smolvla(out)
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert set(sd1) == set(sd2) and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert proc2.camera_keys == proc.camera_keys and proc2.vlm_dir == out / "vlm"
    assert (
        proc2.tokenizer(["open the top drawer\n"])["input_ids"]
        == proc.tokenizer(["open the top drawer\n"])["input_ids"]
    )
    a1, u1 = predict_action_chunk(model, proc, batch, noise=ref["sample.noise"])
    a2, u2 = predict_action_chunk(model2, proc2, batch, noise=ref["sample.noise"])
    assert torch.equal(a1, a2) and torch.equal(u1, u2)

    save_lerobot_smolvla(model2, proc2, out)  # overwriting an existing export
    assert set(load_file(str(out / "model.safetensors"))) == set(src)


# ---------------------------------------------------------------------------------------------- errors
def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(CKPT, dst)
    return dst


def _edit_config(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_error_missing_vlm_dir(tmp_path):
    ckpt = _copy(tmp_path)
    shutil.rmtree(ckpt / "vlm")
    with pytest.raises(ConfigError, match=r"vlm_model_name='vlm'.*set model.vlm"):
        load_lerobot_smolvla(ckpt)
    with pytest.raises(ConfigError, match="model.vlm='/nonexistent/vlm' is not a directory"):
        load_lerobot_smolvla(CKPT, vlm_dir="/nonexistent/vlm")
    model, proc = load_lerobot_smolvla(ckpt, vlm_dir=CKPT / "vlm")  # the explicit argument wins
    assert proc.vlm_dir == CKPT / "vlm"


def test_error_wrong_type(tmp_path):
    ckpt = _copy(tmp_path)
    _edit_config(ckpt, type="pi0")
    with pytest.raises(ConfigError, match=r"\"type\" is 'pi0', expected \"smolvla\""):
        load_lerobot_smolvla(ckpt)


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("attention_mode", "self_attn", "attention_mode='self_attn' is not supported"),
        ("add_image_special_tokens", True, "add_image_special_tokens=True is not supported"),
        ("num_expert_layers", 1, "num_expert_layers=1 differs"),
        (
            "normalization_mapping",
            {"VISUAL": "IDENTITY", "STATE": "MIN_MAX", "ACTION": "MEAN_STD"},
            "STATE='MIN_MAX'",
        ),
        ("some_new_option", 3, r"unknown field\(s\) \['some_new_option'\]"),
    ],
)
def test_error_unsupported_config(tmp_path, field, value, pattern):
    ckpt = _copy(tmp_path)
    _edit_config(ckpt, **{field: value})
    with pytest.raises(ConfigError, match=pattern):
        load_lerobot_smolvla(ckpt)


def test_error_weights_missing_or_truncated(tmp_path):
    ckpt = _copy(tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"model\.safetensors: cannot be read.*truncated or corrupt"):
        load_lerobot_smolvla(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model\.safetensors: missing"):
        load_lerobot_smolvla(ckpt)


def test_error_shape_mismatch_and_missing_keys(tmp_path):
    ckpt = _copy(tmp_path)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.state_proj.weight"] = torch.zeros(64, 9)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(
        ConfigError, match=r"model\.state_proj\.weight has shape \[64, 9\].*expects \[64, 8\]"
    ):
        load_lerobot_smolvla(ckpt)
    del tensors["model.state_proj.weight"]
    tensors["model.extra_head.weight"] = torch.zeros(2)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(
        ConfigError, match=r"1 missing tensor\(s\).*model\.state_proj\.weight.*1 unexpected.*extra_head"
    ):
        load_lerobot_smolvla(ckpt)


def test_error_missing_stats(tmp_path):
    ckpt = _copy(tmp_path)
    name = "policy_preprocessor_step_5_normalizer_processor.safetensors"
    stats = load_file(str(ckpt / name))
    del stats["observation.state.std"]
    save_file(stats, str(ckpt / name))
    with pytest.raises(ConfigError, match=r"no 'observation\.state\.std' statistic"):
        load_lerobot_smolvla(ckpt)


# ---------------------------------------------------------------------------------------------- training
def test_bf16_autocast_close_to_fp32(loaded, batch, ref):
    model, proc = loaded
    with torch.no_grad():
        fp32 = compute_loss(model, proc, batch, noise=ref["forward.noise"], time=ref["forward.time"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = compute_loss(model, proc, batch, noise=ref["forward.noise"], time=ref["forward.time"])
            actions = model.sample_actions(**model_inputs(model, proc, batch), noise=ref["sample.noise"])
    assert bf16.v_t.dtype == torch.bfloat16 and torch.isfinite(bf16.losses).all()
    # measured: v_t 0.019 (|v_t| up to 2.4), loss 0.2 %, sampled actions 0.008
    assert _max_diff(bf16.v_t, fp32.v_t) < 0.1
    assert abs(bf16.loss.item() - fp32.loss.item()) < 0.02 * fp32.loss.item()
    assert actions.dtype == torch.float32 and _max_diff(actions, ref["sample.actions_full"]) < 0.05


def test_full_parameter_backward_reaches_every_parameter(batch):
    model, proc = load_lerobot_smolvla(CKPT)
    model.train()
    torch.manual_seed(0)
    out = compute_loss(model, proc, batch)  # default noise and Beta time
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, zero


def test_flow_helpers():
    torch.manual_seed(0)
    t = sample_time(10_000)
    assert t.dtype == torch.float32 and 0.001 <= t.min() and t.max() <= 1.0
    assert abs(t.mean().item() - (0.6 * 0.999 + 0.001)) < 0.01  # E[Beta(1.5, 1)] = 0.6
    losses = torch.ones(2, 3, 4)
    pad = torch.tensor([[False, False, True], [False, True, True]])
    loss, per_sample = masked_flow_loss(losses * torch.arange(4.0), pad, action_dim=2)
    assert loss.item() == pytest.approx(0.5) and per_sample.tolist() == pytest.approx([0.5, 0.5])
