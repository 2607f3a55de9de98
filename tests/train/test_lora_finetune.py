"""LoRA inside the real job: run_finetune with model.lora.r > 0 (tiny preset, generated data, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vla_ft.config_checks import check_config
from vla_ft.errors import CheckpointError, ConfigError
from vla_ft.models import VLAPolicy, count_parameters
from vla_ft.models.lora import LORA_DIR
from vla_ft.train.finetune import run_finetune
from vla_ft.train.logging import read_metrics
from vla_ft.train.runtime import SUMMARY_FILE

COMMON = {"train.steps": 6, "train.save_every": 3, "train.val_every": 3, "train.deterministic": "true"}


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


def test_lora_run_prints_trainable_share_writes_summary_and_plain_checkpoints(tiny_cfg, capsys):
    result = run_finetune(tiny_cfg(**COMMON, **{"model.lora.r": 4, "train.run_name": "lora"}))
    out = capsys.readouterr().out
    summary = json.loads((result.run_dir / SUMMARY_FILE).read_text())
    params = summary["params"]
    assert summary["lora"]["r"] == 4 and summary["steps"] == 6
    assert 0 < params["trainable"] < params["total"]
    assert params["trainable_pct"] == pytest.approx(100.0 * params["trainable"] / params["total"])
    pct = f"{params['trainable_pct']:.1f}%"
    assert f"trainable parameters: {params['trainable']:,} / {params['total']:,} ({pct})" in out
    assert "[vla_ft.lora] r=4" in out
    assert summary["timing"]["train_s"] > 0 and summary["memory"]["peak_rss_mb"] > 100
    assert summary["val_loss"]["final"] is not None and summary["eval"] is None  # eval.episodes=0

    for name in ("best", "last"):
        ckpt = result.run_dir / name
        assert not [k for k in load_file(str(ckpt / "model.safetensors")) if "lora_" in k]
        policy = VLAPolicy.from_pretrained(ckpt)  # evaluation loads it as a plain policy
        assert type(policy) is VLAPolicy
        assert count_parameters(policy)[1] < params["total"]  # adapters merged away
        assert (ckpt / LORA_DIR / "unmerged.safetensors").is_file()


def test_full_fine_tuning_summary_counts_every_parameter(tiny_cfg):
    result = run_finetune(tiny_cfg(**{"train.steps": 2, "train.val_every": 2, "train.run_name": "full"}))
    summary = json.loads((result.run_dir / SUMMARY_FILE).read_text())
    assert summary["lora"] is None
    assert summary["params"]["trainable"] == summary["params"]["total"]
    total = count_parameters(VLAPolicy.from_pretrained(result.run_dir / "last"))[1]
    assert summary["params"]["total"] == total and summary["params"]["trainable_pct"] == 100.0


@pytest.mark.parametrize("ema", [None, 0.9])
def test_lora_resume_from_a_checkpoint_continues_exactly(tiny_cfg, ema):
    extra = {**COMMON, "model.lora.r": 4, "model.lora.dropout": 0.1, "train.ema": ema or "null"}
    full = run_finetune(tiny_cfg(**extra, **{"train.run_name": "a"}))
    ckpt = full.run_dir / "checkpoints" / "step_0000003"
    resumed = run_finetune(tiny_cfg(**extra, **{"train.run_name": "b", "train.resume": str(ckpt)}))
    a, b = _losses(full.run_dir), _losses(resumed.run_dir)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    last_a = load_file(str(full.run_dir / "last" / "model.safetensors"))
    last_b = load_file(str(resumed.run_dir / "last" / "model.safetensors"))
    for name, value in last_a.items():
        torch.testing.assert_close(last_b[name], value, msg=name)


def test_lora_resume_refuses_a_full_fine_tuning_checkpoint(tiny_cfg):
    full = run_finetune(tiny_cfg(**{"train.steps": 2, "train.val_every": 0, "train.run_name": "f"}))
    with pytest.raises(CheckpointError, match="trained without LoRA"):
        run_finetune(
            tiny_cfg(
                **{
                    "train.steps": 4,
                    "model.lora.r": 4,
                    "train.run_name": "f2",
                    "train.resume": str(full.run_dir),
                }
            )
        )


def test_lora_with_progressive_unfreezing_is_refused_before_data_loads(tiny_cfg):
    with pytest.raises(ConfigError, match="train.unfreeze_steps=4 with model.lora.r=8"):
        check_config(tiny_cfg(**{"model.lora.r": 8, "train.unfreeze_steps": 4}))
