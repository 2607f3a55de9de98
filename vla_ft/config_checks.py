"""Cross-section rules of a run config: combinations of values from several sections that no one
section can check on its own (each section of vla_ft/config.py validates its own values). They need
no data and run in the trainer's preflight, before anything loads (vla_ft/train/finetune.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vla_ft.config import Config
from vla_ft.errors import ConfigError
from vla_ft.models.bc_cnn import unsupported_options
from vla_ft.models.loading import architecture_kind
from vla_ft.models.source import resolve_pretrained
from vla_ft.train.preflight import Problems


def config_problems(cfg: Config) -> list[ConfigError]:
    """Cross-section checks that need no data, done before anything loads (every one that fails)."""
    tc, found = cfg.train, []
    if tc.best_metric == "success_rate" and not tc.eval_every:
        found.append(
            "train.best_metric=success_rate needs periodic simulation evaluation: set train.eval_every > 0"
        )
    if tc.patience is not None and tc.best_metric == "val_loss" and not tc.val_every:
        found.append("train.patience with train.best_metric=val_loss needs train.val_every > 0")
    if cfg.model.lora.r and tc.unfreeze_steps:
        found.append(
            f"train.unfreeze_steps={tc.unfreeze_steps} with model.lora.r={cfg.model.lora.r}: LoRA trains "
            f"adapters on a frozen backbone, progressive unfreezing would unfreeze it; set train.unfreeze_steps=0"
        )
    if tc.parallel == "fsdp" and cfg.model.lora.r:
        found.append(
            f"model.lora.r={cfg.model.lora.r} with train.parallel=fsdp is not supported (LoRA checkpoints merge "
            f"a full copy of the policy): use train.parallel=ddp, or model.lora.r=0"
        )
    if cfg.data.collect_if_missing and Path(cfg.collect.output) != Path(cfg.data.paths[0]):
        found.append(
            f"data.collect_if_missing collects into collect.output={cfg.collect.output!r}, which is not "
            f"data.paths[0]={cfg.data.paths[0]!r}: make them the same file"
        )
    if config_kind(cfg) == "cnn":  # the bc-cnn baseline: options it has no use for
        found += unsupported_options(cfg, fresh=cfg.model.pretrained is None)
    return [ConfigError(msg) for msg in found]


def config_kind(cfg: Config) -> str | None:
    """The kind of model the config builds or loads (``vla_ft.models.loading.architecture_kind``)."""
    return architecture_kind(
        dataclasses.replace(cfg.model, pretrained=resolve_pretrained(cfg.model.pretrained))
    )


def check_config(cfg: Config) -> None:
    """:func:`config_problems`, raised (one problem as it is, several together)."""
    problems = Problems()
    for error in config_problems(cfg):
        problems.add(error)
    problems.raise_if_any()
