"""Loading paths and their errors: component weights from local dirs/files, HF VLM dirs, bad names,
incomplete or mismatched checkpoints, task-count changes."""

from __future__ import annotations

import json
import logging
import time

import pytest
import timm
import torch
from model_helpers import make_batch, make_info, simple_loss
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, LlamaConfig, LlamaModel

from vla_ft import constants as C
from vla_ft.config import ModelConfig
from vla_ft.errors import CheckpointError, ConfigError
from vla_ft.integrity import write_manifest
from vla_ft.models import VLAPolicy, load_tokenizer, load_vla, param_info
from vla_ft.models.language import LanguageBackbone
from vla_ft.models.presets import get_preset
from vla_ft.models.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    torch.manual_seed(0)
    load_vla(ModelConfig(preset="tiny"), make_info()).save_pretrained(path)
    return path


def test_checkpoint_files(tiny_ckpt):
    names = {p.name for p in tiny_ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "normalization.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # no pickle


_PALIGEMMA = {
    "model_type": "paligemma",
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "text_config": {
        "model_type": "gemma",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "vocab_size": 400,
    },
    "projection_dim": 64,
    "image_token_index": 399,
}
_LLAVA = {
    "model_type": "llava",
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "text_config": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 400,
    },
    "image_token_index": 399,
}


@pytest.mark.parametrize("family", ["idefics3", "paligemma", "llava"])
def test_hf_vlm_dir_loads_as_backbone_and_trains(family, tmp_path):
    spec = {"idefics3": get_preset("tiny-vlm").vlm, "paligemma": _PALIGEMMA, "llava": _LLAVA}[family]
    torch.manual_seed(1)
    vlm = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**spec))
    vlm.save_pretrained(tmp_path / "vlm")
    byte_tokenizer().save_pretrained(tmp_path / "vlm")
    stats = {"image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}  # CLIP-like, not the default
    (tmp_path / "vlm" / "preprocessor_config.json").write_text(json.dumps(stats))
    model_cfg = ModelConfig(preset="tiny", vlm=str(tmp_path / "vlm"))
    assert type(load_tokenizer(model_cfg)).__name__ == "ByT5Tokenizer"
    policy = load_vla(model_cfg, make_info())
    ref = vlm.get_input_embeddings().weight.detach().clone()
    assert torch.equal(policy.backbone.model.get_input_embeddings().weight, ref)  # weights loaded, not random
    assert set(param_info(policy)) == {n for n, _ in policy.named_parameters()}

    batch = make_batch(make_info())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    loss = simple_loss(policy(batch), batch)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(policy.backbone.model.get_input_embeddings().weight, ref)
    policy.save_pretrained(tmp_path / "ckpt")  # rebuilds from config.json alone, without the VLM dir
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt")
    assert torch.allclose(loaded.backbone.std.flatten(), torch.tensor(stats["image_std"]))
    policy.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(policy(batch)[C.OUT_ACTION], loaded(batch)[C.OUT_ACTION])
    assert torch.equal(
        loaded.backbone.model.get_input_embeddings().weight,
        policy.backbone.model.get_input_embeddings().weight,
    )


def test_language_dir_and_timm_weights_file(tmp_path):
    lm = LlamaModel(
        LlamaConfig(**{k: v for k, v in get_preset("tiny").language.items() if k != "model_type"})
    )
    lm.save_pretrained(tmp_path / "lm")
    vision = timm.create_model("resnet18", num_classes=0, **get_preset("tiny").vision_kwargs)
    save_file(vision.state_dict(), tmp_path / "vision.safetensors")
    cfg = ModelConfig(
        preset="tiny", language=str(tmp_path / "lm"), vision_pretrained=str(tmp_path / "vision.safetensors")
    )
    policy = load_vla(cfg, make_info())
    assert torch.equal(policy.backbone.language.model.norm.weight, lm.norm.weight)
    assert torch.equal(policy.backbone.vision.model.layer1[0].conv1.weight, vision.layer1[0].conv1.weight)
    policy.save_pretrained(tmp_path / "ckpt")  # rebuilds from the saved configs alone
    assert torch.equal(
        VLAPolicy.from_pretrained(tmp_path / "ckpt").backbone.vision.model.layer1[0].conv1.weight,
        vision.layer1[0].conv1.weight,
    )


@pytest.mark.parametrize("as_dir", [True, False])
def test_hf_backbones_are_float32_whatever_dtype_their_config_names(tmp_path, as_dir):
    """A checkpoint saved in bf16 (as most hub models are) or a config naming ``torch_dtype``
    float16 still gives float32 weights: they are the optimizer's master copy, and autocast supplies
    the mixed precision. Built in the named dtype, AdamW would step bf16/fp16 weights directly."""
    fields = {k: v for k, v in get_preset("tiny").language.items() if k != "model_type"}
    if as_dir:
        LlamaModel(LlamaConfig(**fields)).to(torch.bfloat16).save_pretrained(tmp_path / "lm")
        assert json.loads((tmp_path / "lm" / "config.json").read_text()).get("dtype") == "bfloat16"
        spec = str(tmp_path / "lm")
    else:
        spec = {"model_type": "llama", **fields, "torch_dtype": "float16"}
    lm = LanguageBackbone(spec)
    assert {p.dtype for p in lm.parameters()} == {torch.float32}


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="'resnet1800' is not a timm model name. Did you mean: resnet18"):
        load_vla(ModelConfig(preset="tiny", vision="resnet1800"), make_info())
    with pytest.raises(ConfigError, match="model.preset='tyni' is unknown .did you mean 'tiny'"):
        load_vla(ModelConfig(preset="tyni"), make_info())
    with pytest.raises(
        ConfigError, match="model.language: model_type='llamaa' is not a transformers model type"
    ):
        LanguageBackbone({"model_type": "llamaa", "hidden_size": 32})


def test_offline_hub_ids_fail_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for cfg in (
        ModelConfig(preset="tiny", language="someone/not-here"),
        ModelConfig(preset="tiny", vlm="HuggingFaceTB/SmolVLM-256M-Instruct"),
        ModelConfig(pretrained="someone/vla-checkpoint"),
    ):
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match="hub is offline"):
            load_vla(cfg, make_info())
        assert time.perf_counter() - start < 5


def test_missing_weights_file(tiny_ckpt, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    with pytest.raises(CheckpointError, match=f"{broken}: no model.safetensors"):
        VLAPolicy.from_pretrained(broken)
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        VLAPolicy.from_pretrained(tmp_path / "nowhere")


def test_missing_and_unexpected_tensors_are_named(tiny_ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors.pop("readout")
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, bad / "model.safetensors")
    write_manifest(bad)  # a consistent checkpoint of another model, not a damaged copy
    with pytest.raises(CheckpointError, match=r"missing: readout.*unexpected: extra\.weight"):
        VLAPolicy.from_pretrained(bad)


def test_another_action_space_starts_a_fresh_action_head(tiny_ckpt, caplog):
    """Fine-tuning a base on another robot's actions (4-D -> 7-D) keeps every tensor that reads images,
    state and language and re-initializes the action head's output layer, with a warning."""
    base = VLAPolicy.from_pretrained(tiny_ckpt)
    with caplog.at_level(logging.WARNING):
        policy = load_vla(ModelConfig(pretrained=str(tiny_ckpt)), make_info(action_dim=7))
    assert "4-D actions, the data has 7-D" in caplog.text and "action_head" in caplog.text
    out = policy(make_batch(make_info(action_dim=7)))
    assert out[C.OUT_ACTION].shape[-1] == 7
    assert torch.equal(policy.backbone.language.model.norm.weight, base.backbone.language.model.norm.weight)


def test_other_task_count_and_chunk_reinitialize_heads(tiny_ckpt, caplog):
    base = VLAPolicy.from_pretrained(tiny_ckpt)
    with caplog.at_level(logging.WARNING):
        policy = load_vla(ModelConfig(pretrained=str(tiny_ckpt)), make_info(tasks=("a", "b", "c"), chunk=6))
    assert "re-initialized" in caplog.text and "task_head" in caplog.text and "action_queries" in caplog.text
    batch = make_batch(make_info(tasks=("a", "b", "c"), chunk=6))
    out = policy(batch)
    assert out[C.OUT_TASK_LOGITS].shape == (3, 3) and out[C.OUT_ACTION].shape == (3, 6, 4)
    assert torch.equal(policy.backbone.language.model.norm.weight, base.backbone.language.model.norm.weight)


def test_head_type_follows_the_user_config(tiny_ckpt, caplog):
    with caplog.at_level(logging.WARNING):
        policy = load_vla(ModelConfig(pretrained=str(tiny_ckpt), action_head="binned", n_bins=8), make_info())
    assert "action_head.mlp.3" in caplog.text
    out = policy(make_batch(make_info()))
    assert out[C.OUT_ACTION_LOGITS].shape == (3, 4, 4, 8)
    saved = VLAPolicy.from_pretrained(tiny_ckpt)
    assert torch.equal(policy.action_head.mlp[1].weight, saved.action_head.mlp[1].weight)  # trunk kept
