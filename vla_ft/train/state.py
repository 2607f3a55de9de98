"""Everything a run needs to continue exactly where it stopped: :class:`TrainState`.

A checkpoint's ``training_state/`` is :meth:`TrainState.state_dict` written to disk (by
:class:`~vla_ft.train.checkpointer.Checkpointer`), and resuming is :meth:`TrainState.load_state_dict`
of what :func:`~vla_ft.train.checkpoint.load_training_state` reads back. The weights the optimizer
updates live in ``policy``; with EMA on, ``ema`` holds the averaged copy that evaluation and
``model.safetensors`` use, and the raw weights go to ``training_state/raw_model.safetensors``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vla_ft.errors import CheckpointError
from vla_ft.train import checkpoint as ckpt_io
from vla_ft.train.distributed import DistContext


@dataclass
class TrainState:
    """The resumable state of one rank's training run.

    Attributes:
        policy: the trained weights (sharded in place under FSDP).
        optimizer, scheduler, scaler: AdamW (or a variant), its LR schedule, the fp16 grad scaler.
        ema: the weight average (``torch.optim.swa_utils.AveragedModel``), or None.
        ema_decay: its decay, ``train.ema`` (None: no EMA).
        aug_gen: the augmentation generator (seeded per rank).
        ctx: the distributed context (the data position is saved in global samples).
        step: optimizer steps taken (skipped NaN/Inf steps included).
        epoch, pos: the data position: the epoch and the samples this rank drew in it.
        skipped: steps skipped for a NaN/Inf loss or gradient.
        best, best_step, stale: the best value of ``train.best_metric``, its step, and the number of
            evaluations since it (early stopping's patience counter).
        history: one ``{"step", "val_loss" | "success_rate"}`` row per validation/evaluation.
        wandb_id: the wandb run id, so a resumed run continues the same wandb run.
    """

    policy: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    ema_decay: float | None
    aug_gen: torch.Generator
    ctx: DistContext
    step: int = 0
    epoch: int = 0
    pos: int = 0
    skipped: int = 0
    best: float | None = None
    best_step: int | None = None
    stale: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    wandb_id: str | None = None

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved as the model: the EMA ones when EMA is on."""
        return self.ema.module if self.ema is not None else self.policy

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What ``training_state/`` holds: (JSON values for ``state.json``, tensors).

        The tensors are ``optimizer``, ``scheduler``, ``scaler`` (None when not saved), ``rng`` (this
        rank's torch, CUDA and augmentation generators), ``raw_model`` (the non-averaged weights,
        EMA on only) and, in a distributed run, ``sharded``: (policy, optimizer) for
        torch.distributed.checkpoint, which replaces ``optimizer``. ``state.json`` ends with the
        python and numpy RNGs (``rng_host``).
        """
        ctx = self.ctx
        rng = {"torch": torch.get_rng_state(), "augment": self.aug_gen.get_state()}
        if ctx.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(ctx.device)
        values = {
            "step": self.step, "epoch": self.epoch, "pos": self.pos * ctx.world_size,
            "world_size": ctx.world_size, "skipped": self.skipped, "best": self.best,
            "best_step": self.best_step, "stale": self.stale, "history": self.history,
            "wandb_id": self.wandb_id,
            "ema_n_averaged": int(self.ema.n_averaged) if self.ema is not None else 0,
            "rng_host": _host_rng_state(),
        }  # fmt: skip
        tensors = {
            "optimizer": None if ctx.enabled else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng,
        }
        if self.ema is not None:
            tensors["raw_model"] = self.policy.state_dict()
        if ctx.enabled:
            tensors["sharded"] = (self.policy, self.optimizer)
        return values, tensors

    def load_state_dict(self, values: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Continue from a checkpoint: ``(values, tensors)`` as :func:`checkpoint.load_training_state`
        returns them (``sharded`` is then the DCP directory). ``policy`` must already hold the
        checkpoint's model weights (the EMA ones when EMA is on).

        Raises:
            CheckpointError: the checkpoint was saved with EMA and ``ema`` is None, or the reverse.
        """
        self.scheduler.load_state_dict(tensors["scheduler"])
        if "scaler" in tensors:
            self.scaler.load_state_dict(tensors["scaler"])
        if (self.ema is not None) != ("raw_model" in tensors):
            raise CheckpointError(
                f"train.ema={self.ema_decay} but the checkpoint was saved with"
                f"{'out' if 'raw_model' not in tensors else ''} EMA: resume with the run's own train.ema"
            )
        if self.ema is not None:  # the policy was loaded with the EMA weights (model.safetensors)
            self.ema.module.load_state_dict(self.policy.state_dict())
            self.ema.n_averaged.fill_(values["ema_n_averaged"])
        if "sharded" in tensors:  # a distributed run's checkpoint, saved at any world size
            ckpt_io.load_sharded(tensors["sharded"], self.policy, self.optimizer)  # raw weights + optimizer
        else:
            self.optimizer.load_state_dict(tensors["optimizer"])
            if self.ema is not None:
                self.policy.load_state_dict(tensors["raw_model"])
        self.step, self.epoch, self.skipped = values["step"], values["epoch"], values["skipped"]
        self.pos = values["pos"] // self.ctx.world_size  # global samples of this epoch -> this rank's
        self.best, self.best_step, self.stale = values["best"], values["best_step"], values["stale"]
        self.history, self.wandb_id = values["history"], values.get("wandb_id")
        _set_host_rng_state(values["rng_host"])
        torch.set_rng_state(tensors["rng"]["torch"])
        self.aug_gen.set_state(tensors["rng"]["augment"])
        if self.ctx.device.type == "cuda" and "cuda" in tensors["rng"]:
            torch.cuda.set_rng_state(tensors["rng"]["cuda"], self.ctx.device)


def make_ema(policy: nn.Module, decay: float | None, device: torch.device) -> AveragedModel | None:
    """An exponential moving average of ``policy``'s weights and buffers (None when ``decay`` is)."""
    if not decay:
        return None
    return AveragedModel(policy, device=device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _host_rng_state() -> dict[str, Any]:
    """The python and numpy global RNG states as JSON values."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _set_host_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
