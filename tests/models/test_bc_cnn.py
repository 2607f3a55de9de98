"""The bc-cnn preset (vla_ft/models/bc_cnn.py): size, shapes, instruction conditioning, the
checkpoint round trip, parameter metadata, the memory plan and the options it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import make_batch, make_info, make_obs, simple_loss

from vla_ft import constants as C
from vla_ft.config import Config, LoraConfig, ModelConfig
from vla_ft.errors import ConfigError
from vla_ft.models import ModelDims, VLAPolicy, build_policy, count_parameters, load_vla, param_info
from vla_ft.models.bc_cnn import BCCNNPolicy
from vla_ft.tools.memory_arch import saved_bytes


@pytest.fixture(scope="module")
def info():
    return make_info(size=32)


@pytest.fixture(scope="module")
def policy(info):
    torch.manual_seed(0)
    return load_vla(ModelConfig(preset="bc-cnn"), info).eval()


def _tokens(policy, texts: list[str], length: int | None = None) -> dict[str, torch.Tensor]:
    pad = {"padding": "max_length", "max_length": length} if length else {"padding": "longest"}
    tok = policy.tokenizer(texts, return_tensors="pt", **pad)
    return {C.INSTR_IDS: tok["input_ids"].long(), C.INSTR_MASK: tok["attention_mask"].long()}


@pytest.mark.parametrize("size", [64, 80])
def test_parameter_count_is_the_baselines(size):
    policy = load_vla(ModelConfig(preset="bc-cnn"), make_info(size=size))
    trainable, total = count_parameters(policy)
    assert trainable == total and 1.5e6 < total < 2.0e6, total  # resolution-independent (pooled readouts)
    assert isinstance(policy, BCCNNPolicy) and policy.arch["kind"] == "cnn"
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in policy.modules())


@pytest.mark.parametrize("history", [1, 2])
def test_forward_shapes_and_the_batch_is_not_modified(history):
    info = make_info(history=history, chunk=6)
    torch.manual_seed(0)
    policy = load_vla(ModelConfig(preset="bc-cnn", action_head="binned", n_bins=16), info)
    batch = make_batch(info, b=5)
    before = {k: v.clone() for k, v in batch.items()}
    out = policy(batch)
    assert all(torch.equal(before[k], batch[k]) for k in batch)
    assert out[C.OUT_ACTION].shape == (5, 6, 4) and out[C.OUT_ACTION_LOGITS].shape == (5, 6, 4, 16)
    assert out[C.OUT_TASK_LOGITS].shape == (5, 2) and out[C.OUT_PROGRESS].shape == (5,)
    assert out[C.OUT_WAYPOINT].shape == (5, 3) and out[C.OUT_HIDDEN].shape == (5, 1, 512)
    assert C.OUT_HEATMAP not in out
    simple_loss(out, batch).backward()
    assert all(p.grad is not None for p in policy.parameters())


def test_the_flow_head_trains_and_samples(info):
    torch.manual_seed(0)
    policy = load_vla(ModelConfig(preset="bc-cnn", action_head="flow", extra={"num_steps": 2}), info)
    batch = make_batch(info)
    out = policy(batch)
    assert out[C.OUT_FLOW_ERR].shape == (3, info.chunk, info.action_dim)
    sample = policy({k: v for k, v in batch.items() if k != C.ACTION})
    assert sample[C.OUT_ACTION].shape == (3, info.chunk, info.action_dim)


def test_the_instruction_conditions_the_output_and_word_order_matters(policy, info):
    batch = make_batch(info, b=1)
    images, state = batch[C.IMAGES].expand(4, *batch[C.IMAGES].shape[1:]), batch[C.STATE].expand(4, -1, -1)
    texts = [
        "put the red cube in the blue bowl",
        "put the blue cube in the red bowl",  # the same bytes in another order
        "put the green cube in the blue bowl",
        "put the red cube in the blue bowl",
    ]
    with torch.no_grad():
        act = policy({C.IMAGES: images, C.STATE: state, **_tokens(policy, texts)})[C.OUT_ACTION]
    assert torch.equal(act[0], act[3])
    for i in (1, 2):
        assert (act[0] - act[i]).abs().max() > 1e-4, texts[i]
    # padding columns change nothing (the mean is over real tokens only)
    with torch.no_grad():
        padded = policy({C.IMAGES: images[:1], C.STATE: state[:1], **_tokens(policy, texts[:1], 64)})
    torch.testing.assert_close(padded[C.OUT_ACTION][0], act[0], rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_gives_identical_actions(policy, info, tmp_path):
    policy.set_normalizer(info.normalizer)
    batch = make_batch(info)
    with torch.no_grad():
        ref = policy(batch)
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(loaded, BCCNNPolicy) and loaded.arch == policy.arch
    with torch.no_grad():
        got = loaded(batch)
    for key in (C.OUT_ACTION, C.OUT_TASK_LOGITS, C.OUT_PROGRESS, C.OUT_WAYPOINT):
        assert torch.equal(ref[key], got[key]), key
    obs = make_obs(info, n=2)
    instr = ["pick up the cube", "place it"]
    np.testing.assert_array_equal(policy.predict_action(obs, instr), loaded.predict_action(obs, instr))
    # select_action: one action per call from the queued chunk, the same as predict_action's first
    loaded.reset()
    first = loaded.select_action(make_obs(info), "pick up the cube")
    np.testing.assert_allclose(first, loaded.predict_action(make_obs(info), "pick up the cube")[0])
    assert len(loaded._queue) == info.chunk - 1


def test_other_data_dims_reinitialize_the_adaptable_tensors(policy, tmp_path, caplog):
    policy.save_pretrained(tmp_path / "ckpt")
    other = make_info(tasks=("a", "b", "c"), chunk=8)
    loaded = load_vla(ModelConfig(pretrained=str(tmp_path / "ckpt")), other)
    assert loaded.action_queries.shape == (8, 512) and "re-initialized" in caplog.text
    torch.testing.assert_close(loaded.backbone.trunk[0].weight, policy.backbone.trunk[0].weight)


def test_param_info_puts_every_parameter_in_a_module(policy):
    info = param_info(policy)
    assert list(info) == [n for n, _ in policy.named_parameters()]
    assert {i.module for i in info.values()} == set(C.MODULES)
    assert all(0 <= i.depth < i.num_layers for i in info.values())
    vision = {n: i.depth for n, i in info.items() if i.module == C.MODULE_VISION}
    assert vision["backbone.encoders.1.convs.0.weight"] == 0 < vision["backbone.encoders.1.convs.6.weight"]
    assert max(vision.values()) == vision["backbone.encoders.0.keypoints.heatmaps.weight"] == 4
    frozen = load_vla(ModelConfig(preset="bc-cnn", freeze=["vision"]), make_info())
    assert not any(p.requires_grad for p in frozen.backbone.encoders.parameters())
    assert all(p.requires_grad for p in frozen.backbone.trunk.parameters())


def test_architecture_overrides(info):
    cfg = ModelConfig(
        preset="bc-cnn", hidden_size=64, num_layers=3, extra={"channels": [8, 16], "strides": [2, 2]}
    )
    small = load_vla(cfg, info)
    assert (
        small.arch["width"] == 64
        and len(small.backbone.trunk) == 9
        and len(small.backbone.encoders[0].convs) == 4
    )
    assert small(make_batch(info))[C.OUT_ACTION].shape == (3, info.chunk, info.action_dim)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"gradient_checkpointing": True}, r"model.gradient_checkpointing=true does not apply to a bc-cnn"),
        (
            {"vision": "resnet18"},
            r"model.vision='resnet18' does not apply to model.preset=bc-cnn.*model.vision=null",
        ),
        ({"language": "/some/lm"}, r"model.language='/some/lm' does not apply"),
        ({"extra": {"pool_grid": 2}}, r"model.extra has pool_grid, knobs of the native"),
        (
            {"extra": {"strides": [2, 2]}},
            r"model.extra.strides=\[2, 2\]: give one stride >= 1 per conv layer \(4",
        ),
        ({"extra": {"channels": []}}, r"model.extra.channels=\[\]: give a list of conv widths"),
        ({"num_layers": 0}, r"model.num_layers=0: bc-cnn needs an integer >= 1"),
    ],
)
def test_unsupported_or_invalid_model_options_are_one_clear_error(info, changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_vla(ModelConfig(preset="bc-cnn", **changes), info)


def test_checkpointing_and_lora_are_refused_on_a_built_policy(policy):
    policy.set_gradient_checkpointing(False)  # what the trainer calls with the option off: a no-op
    with pytest.raises(ConfigError, match="set model.gradient_checkpointing=false"):
        policy.set_gradient_checkpointing(True)
    from vla_ft.models.lora import apply_lora

    with pytest.raises(
        ConfigError, match=r"model.lora.r=8 does not apply to a bc-cnn policy.*model.lora.r=0"
    ):
        apply_lora(policy, LoraConfig(r=8))


def test_trainer_preflight_lists_every_unsupported_option():
    from vla_ft.config_checks import check_config
    from vla_ft.train.preflight import PreflightError

    cfg = Config()
    cfg.data.collect_if_missing = False
    cfg.model = ModelConfig(preset="bc-cnn", gradient_checkpointing=True, lora=LoraConfig(r=4))
    cfg.loss.task_terms = {"task_id": 1.0, "grounding": 2.0}
    cfg.train.parallel = "fsdp"
    with pytest.raises(PreflightError) as exc:
        check_config(cfg)
    text = str(exc.value)
    for key in (
        "model.lora.r=4",
        "model.gradient_checkpointing=true",
        "loss.task_terms.grounding",
        "train.parallel=fsdp",
    ):
        assert key in text, key
    cfg.model, cfg.loss.task_terms, cfg.train.parallel = (
        ModelConfig(preset="bc-cnn"),
        {"waypoint": 1.0},
        "ddp",
    )
    check_config(cfg)  # what bc-cnn supports passes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_plan_matches_autograds_saved_bytes(precision, info):
    from vla_ft.tools import plan_memory as M

    torch.manual_seed(0)
    policy = load_vla(ModelConfig(preset="bc-cnn"), info).train()
    batch = make_batch(info, b=8)
    batch[C.INSTR_MASK] = torch.ones_like(batch[C.INSTR_MASK])  # the plan's full instruction length
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        measured, _ = saved_bytes(lambda: policy(batch), list(policy.parameters()))
    cfg = Config()
    cfg.model = ModelConfig(preset="bc-cnn")
    cfg.data.instruction_max_tokens = batch[C.INSTR_IDS].shape[1]
    cfg.train.batch_size = 8
    arch, plan = M.plan_config(cfg, 1, precision, dims=ModelDims.from_info(info))
    assert arch.params == count_parameters(policy)[1] and arch.block_params == 0
    assert 0.85 <= plan.activations / measured <= 1.15, (measured, plan.activations)


def test_builds_on_the_meta_device_for_planning():
    dims = ModelDims(action_dim=7, state_dim=8, image_keys=["a", "b", "c"], image_size=(80, 80), chunk=8)
    with torch.device("meta"):
        policy = build_policy(ModelConfig(preset="bc-cnn"), dims)
    assert len(policy.backbone.encoders) == 3 and next(policy.parameters()).is_meta
