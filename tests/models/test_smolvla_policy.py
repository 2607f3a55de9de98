"""A LeRobot SmolVLA checkpoint as a vla-ft policy: our batch path equals LeRobot's, full-parameter
training reaches every parameter, and a checkpoint saved here is a LeRobot directory again."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vla_ft import constants as C
from vla_ft.config import LossConfig, ModelConfig
from vla_ft.errors import ConfigError
from vla_ft.losses import ActionTaskLoss
from vla_ft.models import VLAPolicy, load_tokenizer, param_info
from vla_ft.models.smolvla_io import load_lerobot_smolvla
from vla_ft.models.smolvla_policy import SmolVLAPolicy, load_smolvla_policy
from vla_ft.train.distributed import transformer_blocks

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "lerobot"
CKPT = FIXTURES / "smolvla_tiny"
CAMS = ("observation.images.front", "observation.images.wrist")
FLOW = ModelConfig(pretrained=str(CKPT), action_head="flow")


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "smolvla_reference.safetensors"))


@pytest.fixture(scope="module")
def tasks() -> list[str]:
    return json.loads((FIXTURES / "smolvla_reference.json").read_text())["tasks"]


def _our_batch(policy: SmolVLAPolicy, ref: dict, tasks: list[str], with_action: bool = False) -> dict:
    """The reference's raw inputs through OUR data path: uint8 (B, T, K, 3, H, W) images, state
    normalized by the policy's normalizer, instructions by the dataset's tokenizer call."""
    images = torch.stack([ref[f"raw.{c}"].permute(0, 3, 1, 2) for c in CAMS], dim=1)[:, None]
    state = policy.normalizer.normalize_state(ref["raw.observation.state"])[:, None]
    tok = load_tokenizer(FLOW)(
        tasks, padding="max_length", max_length=48, truncation=True, return_tensors="pt"
    )
    batch = {
        C.IMAGES: images,
        C.STATE: state,
        C.INSTR_IDS: tok["input_ids"],
        C.INSTR_MASK: tok["attention_mask"],
    }
    if with_action:
        batch[C.ACTION] = policy.normalizer.normalize_action(ref["raw.action"])
        batch[C.ACTION_IS_PAD] = ref["raw.action_is_pad"]
    return batch


def test_our_batch_path_samples_lerobots_reference_actions(ref, tasks):
    policy = VLAPolicy.from_pretrained(CKPT).eval()  # dispatches on config.json "type": "smolvla"
    assert isinstance(policy, SmolVLAPolicy) and policy.dims.image_keys == list(CAMS)
    inputs = policy._model_inputs(_our_batch(policy, ref, tasks))
    with torch.no_grad():
        actions = policy.backbone.sample_actions(**inputs, noise=ref["sample.noise"])
    torch.testing.assert_close(actions, ref["sample.actions_full"], atol=1e-4, rtol=0)
    unnorm = policy.normalizer.unnormalize_action(actions[..., : policy.action_dim])
    torch.testing.assert_close(unnorm, ref["predict.actions_unnormalized"], atol=1e-4, rtol=0)


def test_save_writes_lerobots_layout_and_round_trips_exactly(tmp_path, ref, tasks):
    policy = VLAPolicy.from_pretrained(CKPT).eval()
    out = policy.save_pretrained(tmp_path / "ours")
    again = VLAPolicy.from_pretrained(out).eval()
    for (name, a), (_, b) in zip(policy.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    batch = _our_batch(policy, ref, tasks)
    with torch.no_grad():
        x = policy.backbone.sample_actions(**policy._model_inputs(batch), noise=ref["sample.noise"])
        y = again.backbone.sample_actions(**again._model_inputs(batch), noise=ref["sample.noise"])
    assert torch.equal(x, y)
    # LeRobot's own loader reads it: the same key set as the source file, every tensor equal
    src, written = load_file(str(CKPT / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert src.keys() == written.keys() and all(torch.equal(src[k], written[k]) for k in src)
    model, proc = load_lerobot_smolvla(out)
    assert proc.camera_keys == list(CAMS) and proc.state_dim == 4 and proc.action_dim == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["type"] == "smolvla" and cfg["output_features"]["action"]["shape"] == [4]


def test_full_parameter_step_reaches_every_parameter_with_llrd_metadata(ref, tasks):
    policy = VLAPolicy.from_pretrained(CKPT).train()
    batch = _our_batch(policy, ref, tasks, with_action=True)
    loss_fn = ActionTaskLoss(LossConfig(task_terms={}), action_dim=4, head="flow")
    loss, metrics = loss_fn(policy(batch), batch)
    loss.backward()
    no_grad = [n for n, p in policy.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad
    assert torch.isfinite(metrics["loss/action"]) and "action_err/dim3" in metrics
    info = param_info(policy)
    assert {i.module for i in info.values()} == {"vision", "language", "projector", "heads"}
    assert info["backbone.vlm_layers.1.self_attn.k_proj.weight"].depth == 2
    names = {id(m) for m in transformer_blocks(policy)}
    assert id(policy.backbone.vlm_layers[0]) in names and id(policy.backbone.expert_layers[1]) in names


def test_gradient_checkpointing_gives_the_same_gradients(ref, tasks):
    grads = []
    for ckpt in (False, True):
        policy = VLAPolicy.from_pretrained(CKPT).train()
        policy.set_gradient_checkpointing(ckpt)
        batch = _our_batch(policy, ref, tasks, with_action=True)
        torch.manual_seed(0)
        out = policy(batch)
        out[C.OUT_FLOW_ERR].mean().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"chunk": 4}, r"data.chunk=4 .* chunks of 8; set data.chunk=8"),
        ({"state_dim": 12}, r"state has 12 dims, max_state_dim is 8"),
        ({"history": 2}, r"data.history=1"),
    ],
)
def test_data_the_checkpoint_cannot_take_is_one_config_error(change, pattern):
    from types import SimpleNamespace

    info = SimpleNamespace(
        action_dim=4, state_dim=4, image_keys=["front", "wrist"], image_size=(64, 64), history=1, chunk=8,
        task_names=["t"], normalizer=None,
    )  # fmt: skip
    for key, value in change.items():
        setattr(info, key, value)
    with pytest.raises(ConfigError, match=pattern):
        load_smolvla_policy(CKPT, FLOW, info)


def test_smolvla_declares_no_task_outputs_and_refuses_lora():
    from vla_ft.config import LoraConfig
    from vla_ft.models.lora import apply_lora

    policy = load_smolvla_policy(CKPT, FLOW)
    assert policy.task_outputs == frozenset() and policy.heatmap_count == 0
    with pytest.raises(ConfigError, match=r"model.lora.r=4 does not apply to a SmolVLA checkpoint.*lora.r=0"):
        apply_lora(policy, LoraConfig(r=4))
    assert type(policy) is SmolVLAPolicy


def test_another_head_on_a_smolvla_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="set model.action_head=flow"):
        load_smolvla_policy(CKPT, ModelConfig(pretrained=str(CKPT)))


def test_lerobots_expert_only_setting_is_one_config_line():
    policy = load_smolvla_policy(
        CKPT,
        ModelConfig(pretrained=str(CKPT), action_head="flow", freeze=["vision", "language", "projector"]),
    )
    trainable = {n.split(".")[1] for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable == {
        "expert_layers",
        "expert_norm",
        "action_in_proj",
        "action_out_proj",
        "action_time_mlp_in",
        "action_time_mlp_out",
    }


def test_memory_plan_of_a_smolvla_checkpoint_matches_autograds_saved_bytes(ref, tasks):
    """The planner (meta device: vision tower by the closed form, the rest traced) against the bytes
    autograd saves in a real fp32 CPU forward of the same checkpoint and batch shape."""
    from vla_ft.config import load_config
    from vla_ft.tools.memory_arch import data_dims, saved_bytes
    from vla_ft.tools.plan_memory import plan_config

    cfg = load_config("pick_place_smolvla.yaml", ["train.batch_size=1", "data.instruction_max_tokens=48"])
    dims = dataclasses.replace(data_dims(cfg), image_size=(64, 64), state_dim=4)
    arch, plan = plan_config(cfg, 1, "fp32", dims)
    assert arch.params == sum(p.numel() for p in VLAPolicy.from_pretrained(CKPT).parameters())
    policy = VLAPolicy.from_pretrained(CKPT).train()
    batch = _our_batch(policy, ref, tasks, with_action=True)
    batch = {k: v[:1] for k, v in batch.items()}
    measured, _ = saved_bytes(lambda: policy(batch)[C.OUT_FLOW_ERR], list(policy.parameters()))
    print(f"planned {plan.activations:.0f} B, measured {measured} B")
    assert abs(plan.activations - measured) / measured < 0.02, (plan.activations, measured)


def test_a_newer_lerobots_training_only_fields_are_accepted(tmp_path):
    import shutil

    ckpt = tmp_path / "newer"
    shutil.copytree(CKPT, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg |= {"fine_tune_vision_encoder": False, "vision_encoder_lr_multiplier": 0.1, "compile_model": False}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    model, _ = load_lerobot_smolvla(ckpt)
    cfg["attention_dropout_of_the_future"] = 0.1  # an unknown field may change the network: refused
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown field"):
        load_lerobot_smolvla(ckpt)
