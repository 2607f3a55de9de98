"""The memory plan: its activation estimate against autograd's saved tensors on the CPU, its
arithmetic per setting, the 7B example, the script and the trainer's warning."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vla_ft import constants as C
from vla_ft.config import Config, ModelConfig
from vla_ft.data.normalize import Normalizer
from vla_ft.models import ModelDims, load_vla
from vla_ft.tools import plan_memory as M
from vla_ft.tools.memory_arch import saved_bytes

REPO = Path(__file__).resolve().parents[2]
B, L, SIZE = 8, 16, 64


def _info() -> SimpleNamespace:
    rng = np.random.default_rng(0)
    norm = Normalizer.from_arrays("min_max", rng.uniform(-1, 1, (64, 4)), rng.normal(size=(64, 5)))
    return SimpleNamespace(
        action_dim=4, state_dim=5, image_keys=["agentview_image", "wrist_image"],
        state_keys=["ee_pos", "gripper_qpos"], image_size=(SIZE, SIZE), history=1, chunk=4,
        task_names=["a", "b"], normalizer=norm,
    )  # fmt: skip


def _batch(info) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        C.IMAGES: torch.randint(0, 256, (B, 1, 2, 3, SIZE, SIZE), generator=g, dtype=torch.uint8),
        C.STATE: torch.randn(B, 1, 5, generator=g),
        C.INSTR_IDS: torch.randint(3, 259, (B, L), generator=g),
        C.INSTR_MASK: torch.ones(B, L, dtype=torch.long),  # full length: the plan's instruction length
    }


def _cfg(preset: str, ckpt: bool, batch: int = B) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(preset=preset, gradient_checkpointing=ckpt)
    cfg.data.instruction_max_tokens = L
    cfg.train.batch_size = batch
    return cfg


@pytest.mark.parametrize(
    "preset, precision",
    [("tiny", "fp32"), ("tiny", "bf16"), ("tiny-vlm", "fp32"), ("tiny-vlm", "bf16"), ("small", "fp32")],
)
@pytest.mark.parametrize("ckpt", [False, True])
def test_activation_estimate_matches_autograds_saved_bytes_on_cpu(preset, precision, ckpt, capsys):
    """Closed forms for the transformer stacks + meta traces for the rest vs. the real thing:
    the distinct storages autograd saves in one CPU forward (bf16: CPU autocast)."""
    info = _info()
    torch.manual_seed(0)
    policy = load_vla(ModelConfig(preset=preset), info)
    policy.set_gradient_checkpointing(ckpt)
    policy.train()
    batch = _batch(info)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        measured, _ = saved_bytes(lambda: policy(batch), list(policy.parameters()))
    _, plan = M.plan_config(_cfg(preset, ckpt), 1, precision, dims=ModelDims.from_info(info))
    ratio = plan.activations / measured
    with capsys.disabled():
        print(f"\n[memory] {preset:8s} {precision} ckpt={ckpt:d}: measured {measured / 2**20:7.2f} MiB, "
              f"planned {plan.activations / 2**20:7.2f} MiB, ratio {ratio:.3f}")  # fmt: skip
    assert 0.85 <= ratio <= 1.15, (measured, plan.activations)


def test_plan_arithmetic_per_setting():
    """Sharding, offload, 8-bit state and the in-backward step change the parts they should."""
    arch, base = M.plan_config(
        _cfg("tiny-vlm", False, batch=16), 1, "fp32", dims=ModelDims.from_info(_info())
    )
    n = sum(arch.tensor_numels)
    assert base.weights == 4 * arch.params and base.gradients == 4 * n and base.optimizer == 8 * n
    est = lambda **kw: M.estimate(arch, dataclasses.replace(base.setting, **kw))  # noqa: E731
    fsdp = est(parallel="fsdp", world_size=4, micro_batch=4)
    assert fsdp.optimizer == pytest.approx(base.optimizer / 4) and fsdp.gradients == pytest.approx(n)
    assert fsdp.activations == pytest.approx(base.activations / 4)  # per-rank micro-batch 16 / 4
    assert est(parallel="fsdp", cpu_offload=True).optimizer == 0
    eight = est(optimizer="adamw8bit").optimizer
    assert base.optimizer / 4 < eight < base.optimizer / 2  # small tensors keep fp32 state
    assert est(optimizer_in_backward=True).gradients == 0
    assert est(checkpointing=True).activations < 0.5 * base.activations
    assert est(micro_batch=8).peak < base.peak
    # a model built with checkpointing on plans the same as the setting flipped on afterwards
    _, built_on = M.plan_config(_cfg("tiny", True, batch=16), 1, "bf16", dims=ModelDims.from_info(_info()))
    arch_off, _ = M.plan_config(_cfg("tiny", False, batch=16), 1, "bf16", dims=ModelDims.from_info(_info()))
    flipped = M.estimate(arch_off, dataclasses.replace(built_on.setting))
    assert built_on.activations == pytest.approx(flipped.activations) and built_on.peak == pytest.approx(
        flipped.peak
    )


def test_seven_billion_plan_needs_the_savers_on_one_80gb_gpu(tmp_path):
    """Llama-2-7B dims (docs/examples/llama2-7b/config.json, read as config only) on the meta device."""
    out = tmp_path / "plan.json"
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from plan_memory import main
    finally:
        sys.path.pop(0)
    # an OpenVLA-like VLA: SigLIP-so400m ViT at 224 px (256 tokens per view) + Llama-2-7B
    args = ["--cfg", "pick_place.yaml", "model.pretrained=null", "model.preset=small",
            "model.vision=vit_so400m_patch14_siglip_224", "data.image_size=224",
            f"model.language={REPO / 'docs/examples/llama2-7b'}", "train.batch_size=16", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["tokens"]["image_tokens_per_view"] == 256
    assert 7.0e9 < r["params"] < 7.2e9  # Llama-2-7B (no LM head) + so400m + projector and heads
    assert r["plan"]["weights_gib"] == pytest.approx(4 * r["params"] / 2**30, rel=1e-3)
    assert not r["fits"] and r["advice"][0]["change"] == "model.gradient_checkpointing=true"
    cumulative = [a for a in r["advice"] if not a["change"].startswith("or:")]
    assert cumulative[-1]["peak_gib"] * M.RESERVE + 2 <= 80  # the savers together fit
    assert any("adamw8bit" in a["change"] for a in cumulative)


def test_plan_memory_rejects_a_missing_checkpoint_clearly(capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from plan_memory import main
    finally:
        sys.path.pop(0)
    assert main(["--cfg", "pick_place.yaml", "model.pretrained=no/such/dir"]) == 2
    assert "model.pretrained='no/such/dir': no config.json there" in capsys.readouterr().err


def test_trainer_warns_before_an_out_of_memory(monkeypatch, tiny_cfg):
    """The start-of-run check (CUDA only in the trainer): here on a pretend 1 GiB GPU."""
    cfg = tiny_cfg(**{"train.batch_size": 4096, "model.pretrained": "null", "model.preset": "tiny-vlm"})
    info = _info()
    policy = load_vla(cfg.model, info)
    fake = SimpleNamespace(total_memory=2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: fake)
    with pytest.warns(UserWarning, match=r"will not fit this 1 GiB GPU.*gradient_checkpointing=true"):
        plan = M.warn_if_out_of_memory(cfg, policy, info, 1, torch.device("cpu"))
    assert plan.peak > 2**30
