"""Instruction-conditioned vision (FiLM) and spatial-softmax keypoint tokens of the native backbone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from model_helpers import make_batch, make_info, simple_loss

from vla_ft import constants as C
from vla_ft.config import ModelConfig
from vla_ft.errors import ConfigError
from vla_ft.models import VLAPolicy, load_vla, param_info
from vla_ft.models.vision import SpatialSoftmax

FILM = {"film": True, "keypoints": 8}


def _policy(extra=FILM, seed=0):
    torch.manual_seed(seed)
    return load_vla(ModelConfig(preset="tiny", extra=dict(extra)), make_info())


def _randomize_film(policy):
    with torch.no_grad():
        for layer in policy.backbone.vision.film:
            layer.weight.normal_(0, 0.5)
            layer.bias.normal_(0, 0.5)


def _image_tokens(policy, batch, ids):
    b = dict(batch, **{C.INSTR_IDS: ids})
    with torch.no_grad():
        return policy(b)[C.OUT_HIDDEN]


def test_film_starts_as_identity_and_then_follows_the_instruction():
    policy = _policy().eval()
    batch = make_batch(make_info())
    other = batch[C.INSTR_IDS].flip(1) * batch[C.INSTR_MASK]
    x = batch[C.IMAGES].reshape(-1, *batch[C.IMAGES].shape[3:]).float() / 255
    cond_a = torch.randn(x.shape[0], policy.backbone.hidden_size)
    vision = policy.backbone.vision
    # zero-initialized FiLM: the conditioning changes nothing
    torch.testing.assert_close(vision(x, cond_a), vision(x, torch.randn_like(cond_a)))
    _randomize_film(policy)
    assert not torch.allclose(vision(x, cond_a), vision(x, torch.randn_like(cond_a)))
    # through the policy: the image tokens (first positions) depend on the instruction
    n_img = vision(x[:1], cond_a[:1]).shape[1] * len(make_info().image_keys)
    a = _image_tokens(policy, batch, batch[C.INSTR_IDS])[:, :n_img]
    b = _image_tokens(policy, batch, other)[:, :n_img]
    assert (a - b).abs().max() > 1e-3


def test_film_requires_conditioning():
    vision = _policy().backbone.vision
    with pytest.raises(ValueError, match="FiLM"):
        vision(torch.rand(2, 3, 32, 32))


def test_keypoints_are_expected_coordinates():
    sm = SpatialSoftmax(channels=1, keypoints=1, out_dim=2)
    with torch.no_grad():
        sm.heatmaps.weight.fill_(1.0)
        sm.heatmaps.bias.zero_()
        sm.log_temperature.fill_(-5.0)  # near-argmax
        sm.out.weight.copy_(torch.eye(2))
        sm.out.bias.zero_()
    feats = torch.zeros(1, 1, 5, 5)
    feats[0, 0, 1, 4] = 10.0  # row 1, column 4: cell centre y = -1 + 3/5, x = -1 + 9/5
    tokens, heat = sm(feats)
    torch.testing.assert_close(tokens[0, 0], torch.tensor([0.8, -0.4]), atol=1e-3, rtol=0)
    assert heat.shape == (1, 1, 5, 5) and int(heat.flatten().argmax()) == 1 * 5 + 4


def _two_peak_softmax(window):
    """A 1-keypoint layer reading a 5x5 map whose heat map equals the feature (temperature 1)."""
    sm = SpatialSoftmax(channels=1, keypoints=1, out_dim=2, window=window)
    with torch.no_grad():
        sm.heatmaps.weight.fill_(1.0)
        sm.heatmaps.bias.zero_()
        sm.log_temperature.zero_()
        sm.out.weight.copy_(torch.eye(2))
        sm.out.bias.zero_()
    feats = torch.zeros(1, 1, 5, 5)
    feats[0, 0, 0, 0] = 4.0  # the peak, in the top-left corner cell: centre (-0.8, -0.8)
    feats[0, 0, 4, 4] = 3.0  # a second bright spot in the opposite corner (a same-colored distractor)
    return sm, feats


def test_local_keypoint_window_reads_the_peak_not_the_centre_of_mass():
    glob, feats = _two_peak_softmax(window=0)
    local, _ = _two_peak_softmax(window=1)
    (g_xy, g_heat), (l_xy, l_heat) = glob(feats), local(feats)
    torch.testing.assert_close(g_heat, l_heat)  # the supervised heat map is the full map either way
    # global: the flat background and the distractor pull the keypoint toward the centre
    assert g_xy[0, 0].abs().max() < 0.5
    # local: softmax over the 2x2 in-image cells of the 3x3 window around (0, 0), by hand
    w = torch.tensor([4.0, 0.0, 0.0, 0.0]).softmax(0)  # cells (0,0), (0,1), (1,0), (1,1)
    x = w[0] * -0.8 + w[1] * -0.4 + w[2] * -0.8 + w[3] * -0.4
    torch.testing.assert_close(l_xy[0, 0], torch.stack([x, x]), atol=1e-5, rtol=0)
    # gradients reach the cells inside the window only
    feats = feats.clone().requires_grad_(True)
    local(feats)[0].sum().backward()
    inside = torch.zeros(5, 5, dtype=torch.bool)
    inside[:2, :2] = True
    assert feats.grad[0, 0][~inside].abs().max() == 0 and feats.grad[0, 0][inside].abs().max() > 0


def test_keypoint_window_is_saved_with_the_checkpoint(tmp_path):
    policy = _policy({**FILM, "keypoint_window": 1})
    assert policy.backbone.vision.keypoints.window == 1
    policy.eval().save_pretrained(tmp_path / "ckpt")
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.arch["keypoint_window"] == 1 and loaded.backbone.vision.keypoints.window == 1
    batch = make_batch(make_info())
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)[C.OUT_ACTION], policy(batch)[C.OUT_ACTION])
    # a checkpoint written before the option reads its keypoints from the whole map, as it was trained
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del meta["arch"]["keypoint_window"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    (tmp_path / "ckpt" / "manifest.json").unlink()  # such checkpoints had no manifest either
    assert VLAPolicy.from_pretrained(tmp_path / "ckpt").backbone.vision.keypoints.window == 0


def test_negative_keypoint_window_is_a_config_error():
    with pytest.raises(ConfigError, match="keypoint_window"):
        _policy({**FILM, "keypoint_window": -1})


def test_keypoint_tokens_are_added_per_image():
    off = {"film": False, "keypoints": 0}
    plain = _policy(off)
    one = _policy({**off, "keypoints": 4, "keypoint_tokens": False})  # one token for all keypoints
    each = _policy({**off, "keypoints": 4, "keypoint_tokens": True})  # one token per keypoint
    x = torch.rand(2, 3, 32, 32)
    n = plain.backbone.vision(x).shape[1]
    assert one.backbone.vision(x).shape[1] == n + 1
    assert each.backbone.vision(x).shape[1] == n + 4


def test_deep_copy_uses_its_own_film_weights():
    """EMA keeps a deep copy: its hooks must read the copy's gamma/beta, not the live model's."""
    policy = _policy()
    _randomize_film(policy)
    policy.eval()
    batch = make_batch(make_info())
    ref = _image_tokens(policy, batch, batch[C.INSTR_IDS])
    clone = copy.deepcopy(policy)
    with torch.no_grad():
        for layer in clone.backbone.vision.film:
            layer.weight.mul_(-1.0)
    changed = _image_tokens(clone, batch, batch[C.INSTR_IDS])
    assert (changed - ref).abs().max() > 1e-3
    # the live model, run after the copy, is unaffected by the copy's forward
    torch.testing.assert_close(_image_tokens(policy, batch, batch[C.INSTR_IDS]), ref)
    torch.testing.assert_close(_image_tokens(clone, batch, batch[C.INSTR_IDS]), changed)


def test_film_parameters_have_metadata_and_train():
    policy = _policy()
    info = param_info(policy)
    own = [n for n in info if ".film." in n or ".keypoints." in n]
    assert own and all(info[n].module == "vision" for n in own)
    batch = make_batch(make_info())
    simple_loss(policy(batch), batch).backward()
    for layer in policy.backbone.vision.film:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_with_film_same_gradients():
    policy = _policy()
    _randomize_film(policy)
    batch = make_batch(make_info())
    simple_loss(policy(batch), batch).backward()
    ref = {n: p.grad.clone() for n, p in policy.named_parameters()}
    assert ref["state_film.weight"].abs().sum() > 0  # the state reaches the CNN through FiLM
    policy.zero_grad()
    policy.set_gradient_checkpointing(True)
    simple_loss(policy(batch), batch).backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_save_and_load_round_trip(tmp_path):
    policy = _policy()
    _randomize_film(policy)
    policy.eval()
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.arch["film"] and loaded.arch["keypoints"] == 8
    batch = make_batch(make_info())
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)[C.OUT_ACTION], policy(batch)[C.OUT_ACTION])


def test_film_needs_a_cnn_with_stages():
    with pytest.raises(ConfigError, match="model.extra.film"):
        load_vla(
            ModelConfig(
                preset="tiny",
                vision="vit_tiny_patch16_224",
                extra={"film": True, "vision_kwargs": {"img_size": 32, "depth": 1}},
            ),
            make_info(),
        )


def test_deep_copy_and_pickle_after_a_training_forward():
    """The stored gamma/beta are non-leaf tensors after a forward with grad: copies start empty."""
    import pickle

    policy = _policy()
    batch = make_batch(make_info())
    simple_loss(policy(batch), batch).backward()
    clone = copy.deepcopy(policy)
    restored = pickle.loads(pickle.dumps(policy))
    policy.eval(), clone.eval(), restored.eval()
    with torch.no_grad():
        ref = policy(batch)[C.OUT_ACTION]
        torch.testing.assert_close(clone(batch)[C.OUT_ACTION], ref)
        torch.testing.assert_close(restored(batch)[C.OUT_ACTION], ref)


def test_state_joins_the_film_condition():
    """The proprio state (gripper open or holding) steers the CNN too; zero-init: no effect at first."""
    policy = _policy().eval()
    assert policy.state_film is not None
    batch = make_batch(make_info())
    n_img = policy.backbone.vision(
        batch[C.IMAGES][:1, 0, 0].float() / 255, torch.zeros(1, policy.backbone.hidden_size)
    ).shape[1] * len(make_info().image_keys)
    moved = dict(batch, **{C.STATE: batch[C.STATE] + 1.0})
    _randomize_film(policy)
    # the image tokens come before the state token: only FiLM can carry the state into them
    torch.testing.assert_close(
        _image_tokens(policy, moved, batch[C.INSTR_IDS])[:, :n_img],
        _image_tokens(policy, batch, batch[C.INSTR_IDS])[:, :n_img],
    )
    with torch.no_grad():
        policy.state_film.weight.normal_(0, 0.5)
    a = _image_tokens(policy, moved, batch[C.INSTR_IDS])[:, :n_img]
    b = _image_tokens(policy, batch, batch[C.INSTR_IDS])[:, :n_img]
    assert (a - b).abs().max() > 1e-3
    info = param_info(policy)
    assert info["state_film.weight"].module == C.MODULE_PROJECTOR


def test_checkpoint_from_before_state_film_and_waypoint_head_loads(tmp_path, caplog):
    """Older checkpoints lack state_film and task_head.waypoint: both keep their init, with a warning."""
    from safetensors.torch import load_file, save_file

    policy = _policy()
    _randomize_film(policy)
    policy.eval().save_pretrained(tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    old = {k: v for k, v in tensors.items() if not k.startswith(("state_film.", "task_head.waypoint."))}
    assert len(old) < len(tensors)
    save_file(old, tmp_path / "ckpt" / "model.safetensors")
    (tmp_path / "ckpt" / "manifest.json").unlink()  # written before checkpoints had manifests
    with caplog.at_level("WARNING"):
        loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert "state_film.weight" in caplog.text and "task_head.waypoint" in caplog.text
    assert not loaded.state_film.weight.any()  # zero-init: behaves as the old model did
    batch = make_batch(make_info())
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)[C.OUT_ACTION], policy(batch)[C.OUT_ACTION])
        assert loaded(batch)[C.OUT_WAYPOINT].shape == (batch[C.STATE].shape[0], 3)


def test_tiny_policy_outputs_heatmaps_of_the_current_frame():
    info = make_info(history=2)
    torch.manual_seed(0)
    policy = load_vla(ModelConfig(preset="tiny"), info)
    batch = make_batch(info, b=3)
    out = policy(batch)
    heat = out[C.OUT_HEATMAP]
    n_cams = len(policy.dims.image_keys)
    assert heat.shape[:3] == (3, n_cams, 8)  # (B, K cameras, 8 keypoints of the tiny preset, h, w)
    # the heat maps are of the last (current) history frame: changing the older frame's pixels
    # changes nothing, changing the current one does
    older = dict(batch)
    older[C.IMAGES] = batch[C.IMAGES].clone()
    older[C.IMAGES][:, 0] = 255 - older[C.IMAGES][:, 0]
    policy.eval()
    with torch.no_grad():
        base = policy(batch)[C.OUT_HEATMAP]
        assert torch.allclose(policy(older)[C.OUT_HEATMAP], base)
        newer = dict(batch)
        newer[C.IMAGES] = batch[C.IMAGES].clone()
        newer[C.IMAGES][:, 1] = 255 - newer[C.IMAGES][:, 1]
        assert not torch.allclose(policy(newer)[C.OUT_HEATMAP], base)


def _cond(policy, texts):
    tok = policy.tokenizer(texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        return policy.backbone.encode_text(tok["input_ids"], tok["attention_mask"])


def test_film_window_makes_the_conditioning_a_sum_of_local_phrases():
    policy = _policy({**FILM, "film_window": 4}).eval()
    # color words of one length, so every instruction has as many tokens (the code is their mean)
    colors = ("blue", "pink")
    cond = {(c, b): _cond(policy, [f"put the {c} cube in the {b} bowl"]) for c in colors for b in colors}
    # 2 layers x 4-token windows reach 7 bytes back: the two colors never meet, so the code of a
    # (cube, bowl) pairing is that of the other three pairings combined, exactly
    combined = cond["blue", "pink"] + cond["pink", "blue"] - cond["pink", "pink"]
    torch.testing.assert_close(cond["blue", "blue"], combined, atol=1e-5, rtol=1e-4)
    # with the whole instruction in view (the default) the bowl's phrase also reads the cube's color
    full = _policy(FILM).eval()
    f = {(c, b): _cond(full, [f"put the {c} cube in the {b} bowl"]) for c in colors for b in colors}
    assert (
        f["blue", "blue"] - (f["blue", "pink"] + f["pink", "blue"] - f["pink", "pink"])
    ).abs().max() > 1e-3


def test_a_film_window_wider_than_the_instruction_is_full_attention():
    texts = ["put the red cube in the green bowl", "place the blue cube into the yellow bowl now"]
    full, wide = _policy(FILM).eval(), _policy({**FILM, "film_window": 512}).eval()
    wide.load_state_dict(full.state_dict())
    torch.testing.assert_close(_cond(wide, texts), _cond(full, texts))
    # padding (the shorter text is right-padded) changes nothing under a window either
    windowed = _policy({**FILM, "film_window": 6}).eval()
    torch.testing.assert_close(_cond(windowed, texts)[:1], _cond(windowed, texts[:1]), atol=1e-5, rtol=1e-4)


def test_film_window_is_saved_with_the_checkpoint(tmp_path):
    policy = _policy({**FILM, "film_window": 6}).eval()
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.arch["film_window"] == 6 and loaded.backbone.film_window == 6
    batch = make_batch(make_info())
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)[C.OUT_ACTION], policy(batch)[C.OUT_ACTION])


@pytest.mark.parametrize(
    ("extra", "match"),
    [({**FILM, "film_window": -1}, "film_window=-1"), ({"film": False, "film_window": 6}, "film=true")],
)
def test_bad_film_window_is_a_config_error(extra, match):
    with pytest.raises(ConfigError, match=match):
        _policy(extra)


def test_readout_knobs_apply_to_a_loaded_checkpoint_and_tensor_knobs_must_match(tmp_path):
    _policy(FILM).eval().save_pretrained(tmp_path / "base")
    base = str(tmp_path / "base")
    # fine-tuning a checkpoint with a FiLM window / local keypoint readout: the config's value holds
    # (it was silently the checkpoint's before), and the next checkpoint keeps it
    tuned = load_vla(
        ModelConfig(pretrained=base, extra={"film_window": 6, "keypoint_window": 1}), make_info()
    )
    assert tuned.backbone.film_window == 6 and tuned.backbone.vision.keypoints.window == 1
    tuned.eval().save_pretrained(tmp_path / "tuned")
    again = VLAPolicy.from_pretrained(tmp_path / "tuned")
    assert again.backbone.film_window == 6 and again.backbone.vision.keypoints.window == 1
    assert load_vla(ModelConfig(pretrained=base), make_info()).backbone.film_window == 0
    # a knob that shapes tensors comes from the checkpoint: the same value is fine, another is an error
    load_vla(ModelConfig(pretrained=base, extra={"keypoints": 8}), make_info())
    with pytest.raises(ConfigError, match=r"model.extra.keypoints=4: the checkpoint .* keypoints=8"):
        load_vla(ModelConfig(pretrained=base, extra={"keypoints": 4}), make_info())


def test_a_knob_an_older_checkpoint_lacks_is_compared_with_what_it_was_built_with(tmp_path):
    """A checkpoint written before a knob existed has no key for it in its arch: it was built with
    the knob's old behaviour (loading.ABSENT_KNOBS), and a config asking for another value is refused
    rather than silently ignored."""
    import json

    from vla_ft.integrity import write_manifest

    _policy({**FILM, "keypoint_tokens": False}).eval().save_pretrained(tmp_path / "old")
    meta_file = tmp_path / "old" / "config.json"
    meta = json.loads(meta_file.read_text())
    del meta["arch"]["keypoint_tokens"]  # as written before keypoint tokens existed (built without)
    meta_file.write_text(json.dumps(meta, indent=1))
    write_manifest(tmp_path / "old")  # a consistent checkpoint as it was written then, not a damaged copy
    old = str(tmp_path / "old")
    load_vla(ModelConfig(pretrained=old, extra={"keypoint_tokens": False}), make_info())  # the same
    with pytest.raises(
        ConfigError,
        match=r"keypoint_tokens=True: .* built with keypoint_tokens=False \(written before the knob",
    ):
        load_vla(ModelConfig(pretrained=old, extra={"keypoint_tokens": True}), make_info())


def test_a_bc_cnn_checkpoint_refuses_another_architecture_knob(tmp_path):
    torch.manual_seed(0)
    load_vla(ModelConfig(preset="bc-cnn"), make_info()).eval().save_pretrained(tmp_path / "cnn")
    cfg = ModelConfig(pretrained=str(tmp_path / "cnn"), extra={"keypoints": 4})
    with pytest.raises(ConfigError, match=r"model.extra.keypoints=4: .* keypoints=32.* cnn checkpoint: none"):
        load_vla(cfg, make_info())
