"""LoRA through peft on the tiny preset: what is trainable, what changes, merged checkpoints, resume."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from model_helpers import make_batch, make_info, simple_loss
from safetensors.torch import load_file
from torch import nn

from vla_ft import constants as C
from vla_ft.config import LoraConfig, ModelConfig, load_config
from vla_ft.errors import CheckpointError, ConfigError
from vla_ft.models import VLAPolicy, count_parameters, load_vla, param_info
from vla_ft.models.lora import LORA_DIR, LoRAPolicy, apply_lora, is_lora_parameter, target_modules

NEW_TASK_PARTS = (
    "view_embed",
    "state_proj",
    "state_film",
    "action_queries",
    "readout",
    "action_head",
    "task_head",
)


def _policy(r: int = 8, **lora) -> tuple[VLAPolicy, LoraConfig]:
    torch.manual_seed(0)
    cfg = LoraConfig(r=r, **lora)
    return load_vla(ModelConfig(preset="tiny", lora=cfg), make_info()), cfg


def _train(policy: nn.Module, steps: int = 3, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    policy.train()
    for i in range(steps):
        batch = make_batch(make_info(), b=4, seed=i)
        loss = simple_loss(policy(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def trained():
    """(LoRA policy after 3 AdamW steps, its parameters before them, the untrained base state, cfg)."""
    policy, cfg = _policy(r=8)
    base = {k: v.clone() for k, v in policy.state_dict().items()}
    apply_lora(policy, cfg)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    _train(policy, steps=3)
    policy.eval()
    return policy, before, base, cfg


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("model.lora.r=-1", "model.lora.r=-1 is invalid"),
        ("model.lora.alpha=0", "model.lora.alpha=0.0 is invalid"),
        ("model.lora.dropout=1.0", "model.lora.dropout=1.0 is invalid"),
        ("model.lora.target=[attention]", "model.lora.target='attention' is invalid: use module names from"),
        ("model.lora.target=[]", "name at least one backbone module"),
        ("model.lora.target=[vision,vision]", "name each module once"),
        ("model.lora.rank=8", "unknown config key 'model.lora.rank': did you mean 'model.lora.r'"),
    ],
)
def test_lora_config_errors_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern.replace("[", r"\[")):
        load_config("pick_place.yaml", [override])


def test_lora_with_freeze_is_one_clear_error():
    with pytest.raises(
        ConfigError, match=r"model.freeze=\['vision'\] cannot be combined with model.lora.r=8"
    ):
        load_config("pick_place.yaml", ["model.lora.r=8", "model.freeze=[vision]"])


def test_lora_defaults_off_and_alpha_defaults_to_twice_the_rank():
    cfg = load_config("pick_place.yaml", ["model.lora.r=16"])
    assert cfg.model.lora.r == 16 and cfg.model.lora.scale_alpha == 32.0
    assert load_config("pick_place.yaml").model.lora.r == 0
    policy, _ = _policy(r=0)
    assert apply_lora(policy, LoraConfig()) is policy and type(policy) is VLAPolicy


def test_adapters_sit_on_every_linear_and_conv_of_the_targets_and_only_they_plus_heads_train():
    policy, cfg = _policy(r=8)
    base_total = count_parameters(policy)[1]
    convs = {n: m for n, m in policy.named_modules() if isinstance(m, nn.Conv2d)}
    vision_linears = {
        n for n, m in policy.named_modules() if isinstance(m, nn.Linear) and n.startswith("backbone.vision.")
    }  # e.g. FiLM generators, keypoint projection
    layers, skipped = target_modules(policy, cfg.target)
    apply_lora(policy, cfg)
    assert isinstance(policy, LoRAPolicy)
    # attention + MLP projections of both language layers, both projector linears, every vision
    # linear and conv except dilated convs (peft's conv adapter would not line up: they stay frozen)
    plain = {n for n, m in convs.items() if m.dilation == (1, 1)}
    expected = {"backbone.projector.0", "backbone.projector.2"} | plain | vision_linears
    assert set(skipped) == set(convs) - plain
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            expected.add(f"backbone.language.model.layers.{i}.self_attn.{proj}")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            expected.add(f"backbone.language.model.layers.{i}.mlp.{proj}")
    assert plain and all(n.startswith("backbone.vision.") for n in convs)
    assert set(layers) == expected and set(target_modules_of(policy)) == expected

    for name, p in policy.named_parameters():
        trains = is_lora_parameter(name) or name.split(".")[0] in NEW_TASK_PARTS
        assert p.requires_grad == trains, name
    adapters = sum(p.numel() for n, p in policy.named_parameters() if is_lora_parameter(n))
    heads = sum(p.numel() for n, p in policy.named_parameters() if n.split(".")[0] in NEW_TASK_PARTS)
    n_trainable, total = count_parameters(policy)
    assert n_trainable == adapters + heads and total == base_total + adapters
    # rank r: an adapted Linear(in, out) adds r * (in + out) parameters, a Conv2d(in, out, k) r * (in*k*k + out)
    per_layer = 0
    for name in expected:
        base = policy.get_submodule(name).get_base_layer()
        if isinstance(base, nn.Conv2d):
            k = base.kernel_size[0] * base.kernel_size[1]
            per_layer += 8 * (base.in_channels * k + base.out_channels)
        else:
            per_layer += 8 * (base.in_features + base.out_features)
    assert adapters == per_layer
    assert 0 < 100.0 * n_trainable / total < 30.0
    assert set(param_info(policy)) == {n for n, _ in policy.named_parameters()}  # LR groups still work


def test_rank_16_trains_more_than_rank_8_and_both_less_than_full():
    pct = {}
    for r in (8, 16):
        policy, cfg = _policy(r=r)
        apply_lora(policy, cfg)
        trainable, total = count_parameters(policy)
        pct[r] = 100.0 * trainable / total
    assert pct[8] < pct[16] < 100.0


def test_only_adapters_and_new_task_parts_change_under_training(trained):
    policy, before, _, _ = trained
    changed = {n for n, p in policy.named_parameters() if not torch.equal(before[n], p.detach())}
    frozen_changed = [n for n in changed if not policy.get_parameter(n).requires_grad]
    assert not frozen_changed, frozen_changed[:5]
    assert any(".lora_B." in n for n in changed) and any(".lora_A." in n for n in changed)
    assert {n.split(".")[0] for n in changed} >= {"action_head", "task_head", "action_queries", "readout"}
    assert not [n for n in changed if n.startswith("backbone.") and not is_lora_parameter(n)]


def test_merged_checkpoint_loads_as_a_plain_policy_and_reproduces_the_adapted_outputs(trained, tmp_path):
    policy, _, base, _ = trained
    batch = make_batch(make_info(), b=3, seed=7)
    with torch.no_grad():
        expected = policy(batch)
    path = policy.save_pretrained(tmp_path / "ckpt")

    weights = load_file(str(path / "model.safetensors"))
    assert not [k for k in weights if "lora_" in k or "base_layer" in k]  # our format, merged
    assert set(weights) == set(base)  # the tensor names of the model before LoRA
    meta = json.loads((path / LORA_DIR / "lora.json").read_text())
    assert meta["lora"]["r"] == 8 and sorted(meta["modules"]) == sorted(target_modules_of(policy))

    loaded = VLAPolicy.from_pretrained(path).eval()
    assert type(loaded) is VLAPolicy
    with torch.no_grad():
        got = loaded(batch)
    for key in (C.OUT_ACTION, C.OUT_TASK_LOGITS, C.OUT_PROGRESS):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)
    # the adapters did move the backbone: the merged q_proj differs from the base weight
    name = "backbone.language.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(weights[name], base[name])
    # saving did not touch the training model (still adapted, same outputs)
    assert isinstance(policy, LoRAPolicy)
    with torch.no_grad():
        torch.testing.assert_close(policy(batch)[C.OUT_ACTION], expected[C.OUT_ACTION], rtol=0, atol=0)


def target_modules_of(policy: nn.Module) -> list[str]:
    return [n for n, m in policy.named_modules() if hasattr(m, "lora_A")]


def test_resume_rebuilds_the_adapted_model_bit_for_bit(trained, tmp_path):
    policy, _, _, cfg = trained
    path = policy.save_pretrained(tmp_path / "ckpt")
    resumed = apply_lora(VLAPolicy.from_pretrained(path), cfg, resume=path)
    mine, theirs = policy.state_dict(), resumed.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        assert torch.equal(theirs[key], value), key
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == {
        n for n, p in policy.named_parameters() if p.requires_grad
    }


def test_resume_with_other_lora_settings_is_refused(tmp_path):
    policy, cfg = _policy(r=8)
    apply_lora(policy, cfg)
    path = policy.save_pretrained(tmp_path / "lora")
    with pytest.raises(
        CheckpointError, match=r"trained with model.lora=.*'r': 8.*resume with the checkpoint"
    ):
        apply_lora(VLAPolicy.from_pretrained(path), LoraConfig(r=16), resume=path)
    with pytest.raises(CheckpointError, match="trained with model.lora"):
        apply_lora(VLAPolicy.from_pretrained(path), LoraConfig(r=0), resume=path)
    full, _ = _policy(r=0)
    plain = full.save_pretrained(tmp_path / "full")
    with pytest.raises(CheckpointError, match="trained without LoRA"):
        apply_lora(VLAPolicy.from_pretrained(plain), cfg, resume=plain)


def test_missing_peft_is_a_config_error(monkeypatch):
    policy, cfg = _policy(r=8)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ConfigError, match=r"needs the peft package: pip install -e '.\[lora\]'"):
        apply_lora(policy, cfg)


def test_a_vlm_backbone_gets_adapters_per_target_and_merges_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, target=["language", "projector"])
    policy = load_vla(ModelConfig(preset="tiny-vlm", lora=cfg), make_info())
    apply_lora(policy, cfg)
    adapted = target_modules_of(policy)
    assert adapted and all(".text_model." in n or ".connector." in n for n in adapted)
    assert any(".connector." in n for n in adapted)
    _train(policy, steps=2)
    policy.eval()
    batch = make_batch(make_info(), b=2, seed=3)
    with torch.no_grad():
        expected = policy(batch)[C.OUT_ACTION]
        loaded = VLAPolicy.from_pretrained(policy.save_pretrained(tmp_path / "vlm")).eval()
        torch.testing.assert_close(loaded(batch)[C.OUT_ACTION], expected, rtol=1e-5, atol=1e-5)
