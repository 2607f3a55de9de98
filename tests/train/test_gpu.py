"""Mixed-precision training on CUDA (skipped without a GPU; run on the device machine)."""

import pytest
import torch

from vla_ft.train.finetune import run_finetune
from vla_ft.train.logging import read_metrics


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda_reduces_loss(tiny_cfg, precision):
    extra = {"train.steps": 60, "train.lr": 2e-3, "train.batch_size": 16, "data.augment.enabled": "false"}
    cfg = tiny_cfg(**extra, **{"train.device": "cuda", "train.precision": precision, "train.val_every": 30})
    result = run_finetune(cfg)
    rows = [r for r in read_metrics(result.run_dir) if r["split"] == "train"]
    losses = {r["step"]: r["loss"] for r in rows}
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(56, 61)) / 5
    assert last < 0.7 * first, (first, last)
    assert all(r["skipped_steps"] == 0 for r in rows) or precision == "fp16"
    assert rows[-1]["mem_gb"] > 0
    assert torch.cuda.max_memory_allocated() > 0
