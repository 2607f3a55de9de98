"""The full-parameter training loop, readable top to bottom in :func:`fit`.

:func:`fit` builds the :class:`~vla_ft.train.state.TrainState` (weights, EMA, optimizer, schedule,
grad scaler, RNGs, data position, best metric), resumes it from a checkpoint when asked, and runs
the optimizer steps; a :class:`~vla_ft.train.checkpointer.Checkpointer` writes the checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vla_ft.config import Config, TrainConfig
from vla_ft.data.sampler import ResumableSampler
from vla_ft.errors import PREEMPTED_EXIT, Preempted, VLAFTError, worker_message
from vla_ft.losses import ActionTaskLoss
from vla_ft.train import checkpoint as ckpt_io
from vla_ft.train.checkpointer import Checkpointer
from vla_ft.train.distributed import DistContext, grad_sync_context, micro_batch_size, wrap_model
from vla_ft.train.logging import open_logger
from vla_ft.train.optim import (
    apply_unfreezing,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    lr_metrics,
)
from vla_ft.train.preempt import StopRequest
from vla_ft.train.state import TrainState, make_ema
from vla_ft.train.step import (
    BadStepCounter,
    Batch,
    autocast,
    ema_update,
    to_device,
    train_step,
    validate,
)


class TrainingDiverged(VLAFTError):
    """The loss stayed NaN/Inf for ``train.max_bad_steps`` consecutive steps."""


@dataclass
class FitResult:
    run_dir: Path
    step: int
    best_metric: float | None
    best_step: int | None
    stopped_early: bool
    skipped_steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new > old if metric == "success_rate" else new < old


def make_loader(
    ds, batch_size: int, sampler, num_workers: int, device: torch.device, seed: int
) -> DataLoader:
    """A DataLoader whose order comes from ``sampler`` and which never draws from the global RNG."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=sampler is not None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=getattr(ds, "collate_fn", None),  # batched fetch (TrajectoryDataset.get_batch)
    )


def fit(
    cfg: Config,
    policy: nn.Module,
    param_info: dict,
    train_ds,
    val_ds,
    run_dir: Path,
    device: torch.device,
    precision: str,
    augment: Callable[[dict, torch.Generator], dict] | None = None,
    evaluate_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
    resume: tuple[dict, dict] | None = None,
    sample_weights: torch.Tensor | None = None,
    loss_kwargs: dict | None = None,
    ctx: DistContext | None = None,
) -> FitResult:
    """Train every parameter of ``policy`` for ``cfg.train.steps`` optimizer steps.

    Args:
        cfg: the run config (``train``, ``loss``, ``seed``, ``data.num_workers``, ``log``; the
            logger records the whole config with wandb).
        policy: the VLA on ``device``; every parameter trainable unless ``model.freeze`` says otherwise.
        param_info: name -> ParamInfo(module, depth, num_layers), for LR groups and unfreezing.
        train_ds, val_ds: datasets of batch-vocabulary samples (val_ds may be None).
        run_dir: where checkpoints, metrics and plots go.
        device, precision: resolved device and ``fp32|bf16|fp16``.
        augment: callable(batch, generator) -> new batch, applied to training micro-batches only;
            the generator (seeded from ``cfg.seed`` and the rank) is part of the resumable state.
        evaluate_fn: callable(policy, step) -> metrics with ``success_rate`` (simulation evaluation;
            rank 0 only, the result is broadcast).
        resume: (json state, tensors) from :func:`checkpoint.load_training_state`, or None.
        sample_weights: per-sample sampling weights (multi-file mixing), or None for uniform.
        loss_kwargs: extra arguments for :class:`ActionTaskLoss` (head, bins, gripper_zero).
        ctx: the distributed context (None: one process). ``policy`` is wrapped here (DDP, or
            sharded in place by FSDP2); ``train.batch_size`` is the global batch.
    """
    tc = cfg.train
    ctx = ctx if ctx is not None else DistContext(device=device)
    micro = micro_batch_size(tc.batch_size, tc.grad_accum, ctx.world_size)  # per rank
    amp = lambda: autocast(device, precision)  # noqa: E731
    loss_fn = ActionTaskLoss(cfg.loss, **(loss_kwargs or {})).to(device)

    # The state a checkpoint holds; the EMA copy is taken before FSDP shards the policy in place.
    ema = make_ema(policy, tc.ema, device)
    model = wrap_model(policy, ctx, precision, tc.cpu_offload)  # DDP / FSDP2 (in place) / as is
    optimizer = build_optimizer(build_param_groups(policy, param_info, tc), tc, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1 + ctx.rank)
    state = TrainState(policy, optimizer, build_scheduler(optimizer, tc), scaler, ema, tc.ema, aug_gen, ctx)
    model = torch.compile(model) if tc.compile else model
    if resume is not None:
        state.load_state_dict(*resume)

    sampler = ResumableSampler(len(train_ds), cfg.seed, sample_weights, ctx.rank, ctx.world_size)
    train_batches = _MicroBatches(train_ds, micro, sampler, cfg.data.num_workers, device, cfg.seed)
    val_loader = make_loader(val_ds, micro, None, cfg.data.num_workers, device, cfg.seed) if val_ds else None
    grad_sync = grad_sync_context(model, ctx)
    augment_batch = (lambda b: augment(b, aug_gen)) if augment is not None else None
    logger = open_logger(cfg, run_dir, ctx.is_main, state.step, state.wandb_id)
    state.wandb_id = logger.wandb_id
    need_bytes = ckpt_io.estimate_checkpoint_bytes(policy, ema is not None)
    checkpoints = Checkpointer(run_dir, ctx, tc.keep_last, need_bytes)
    bad_steps = BadStepCounter(state.skipped, device, enabled=not scaler.is_enabled())  # fp16: scaler's

    trainable = apply_unfreezing(policy, param_info, state.step, tc.unfreeze_steps)
    if ctx.is_main:
        _print_trainable(policy, trainable)
    policy.train()
    stopped_early = False
    data_wait = step_time = 0.0
    # SIGTERM/SIGINT finish the current step, then save and stop (vla_ft/train/preempt.py)
    with StopRequest(report=ctx.is_main) as stop:
        while state.step < tc.steps and not stopped_early:
            t0 = time.perf_counter()
            if tc.unfreeze_steps:
                apply_unfreezing(policy, param_info, state.step, tc.unfreeze_steps)
            try:
                micro_batches = train_batches.take(state, tc.grad_accum)
            except VLAFTError as exc:  # data read lazily that turned out unreadable (a damaged chunk)
                raise _data_error(exc, state, checkpoints, logger) from None
            t_data = time.perf_counter() - t0

            metrics, stepped = train_step(
                model, loss_fn, micro_batches, optimizer, scaler, amp, tc.grad_clip, augment_batch,
                grad_sync=grad_sync, reduce_flag=ctx.max_flag if ctx.enabled else None,
            )  # fmt: skip
            state.step += 1
            state.scheduler.step()  # rewound at the next sync point if this step was skipped (_settle)
            if ema is not None:
                ema_update(ema, policy, tc.ema, stepped)
            bad_steps.record(stepped)
            data_wait += t_data
            step_time += time.perf_counter() - t0

            step, last = state.step, state.step == tc.steps
            due_log = step % cfg.log.every == 0 or last
            due_val = val_loader is not None and tc.val_every and (step % tc.val_every == 0 or last)
            due_eval = evaluate_fn is not None and tc.eval_every and step % tc.eval_every == 0
            due_save = (tc.save_every and step % tc.save_every == 0) or last
            if due_log or due_val or due_eval or due_save:
                _settle(state, bad_steps, tc, checkpoints, logger)

            if due_log:
                _log_train(logger, state, ctx.mean(metrics), tc, cfg.log.every, data_wait, step_time)
                data_wait = step_time = 0.0
            if due_val:  # every rank validates (FSDP needs all of them); rank 0's numbers decide
                val = ctx.broadcast(validate(state.eval_model, loss_fn, val_loader, device, amp))
                logger.log(step, "val", val)
                stopped_early |= _track(state, checkpoints, tc, "val_loss", val["loss"])
            if due_eval:
                result = _evaluate(evaluate_fn, state, checkpoints)
                logger.log(step, "eval", result)
                stopped_early |= _track(state, checkpoints, tc, "success_rate", result["success_rate"])
            if due_save or stopped_early:
                checkpoints.save(state)
            # SIGTERM/SIGINT on any rank: save here, then leave (a finished run just finishes)
            if not last and not stopped_early and stop.requested(ctx):
                raise _preempted(stop, state, bad_steps, tc, checkpoints, logger)

    logger.close()
    if state.best_step is None:  # no metric was ever computed: the last checkpoint is the best
        checkpoints.best_is_last()
    ctx.barrier()
    return FitResult(
        run_dir, state.step, state.best, state.best_step, stopped_early, state.skipped, state.history
    )


def _print_trainable(policy: nn.Module, trainable: int) -> None:
    total = sum(p.numel() for p in policy.parameters())
    print(f"[vla-ft] trainable parameters: {trainable:,} / {total:,} ({100.0 * trainable / total:.1f}%)")


class _MicroBatches:
    """Training micro-batches in ``sampler``'s order, read from the state's data position, which they
    advance (a new DataLoader starts at the run's first step and at each new epoch)."""

    def __init__(self, ds, micro: int, sampler, num_workers: int, device: torch.device, seed: int) -> None:
        self.ds, self.micro, self.sampler = ds, micro, sampler
        self.num_workers, self.device, self.seed = num_workers, device, seed
        self._batches = None

    def take(self, state: TrainState, k: int) -> list[Batch]:
        """The next ``k`` micro-batches, on the device. When one cannot be read (a VLAFTError) the
        data position stays after the last finished step (an epoch rollover is unwound too)."""
        position = state.epoch, state.pos
        try:
            return [self._next(state) for _ in range(k)]
        except VLAFTError:
            state.epoch, state.pos = position
            raise

    def _next(self, state: TrainState) -> Batch:
        if self._batches is None:
            self._start(state)
        batch = next(self._batches, None)
        if batch is None:  # epoch finished
            state.epoch, state.pos, self._batches = state.epoch + 1, 0, None
            self._start(state)
            batch = next(self._batches)
        state.pos += self.micro
        return to_device(batch, self.device)

    def _start(self, state: TrainState) -> None:
        self.sampler.set_position(state.epoch, state.pos)
        loader = make_loader(self.ds, self.micro, self.sampler, self.num_workers, self.device, self.seed)
        self._batches = iter(loader)


def _settle(
    state: TrainState, bad_steps: BadStepCounter, tc: TrainConfig, checkpoints: Checkpointer, logger
) -> None:
    """Read the NaN/Inf counters (one host sync): rewind the LR schedule by the steps skipped since
    the last read, and stop after ``train.max_bad_steps`` bad steps in a row.

    Raises:
        TrainingDiverged: after saving the (unchanged) weights.
    """
    total, peak = bad_steps.read()
    if total > state.skipped:  # the schedule advanced optimistically on steps that were skipped
        state.scheduler.last_epoch -= total - state.skipped + 1
        state.scheduler.step()
        state.skipped = total
    if peak >= tc.max_bad_steps:
        path = checkpoints.save(state)
        logger.close()
        raise TrainingDiverged(
            f"loss or gradient was NaN/Inf for {peak} consecutive steps (by step {state.step}); "
            f"the last good weights are saved in {path}. Lower train.lr (now {tc.lr:g}), "
            f"lengthen train.warmup_steps or set train.grad_clip"
        )


def _log_train(
    logger,
    state: TrainState,
    metrics: dict[str, torch.Tensor],
    tc: TrainConfig,
    log_every: int,
    data_wait: float,
    step_time: float,
) -> None:
    """One ``train`` row (the global batch's mean loss terms, learning rates, throughput) and the
    progress bar; ``data_wait``/``step_time`` are the seconds spent since the last row."""
    row = {k: float(v) for k, v in metrics.items()}
    row.update(lr_metrics(state.optimizer, state.scheduler, tc.lr))
    row["samples_per_s"] = log_every * tc.batch_size / max(step_time, 1e-9)
    row["data_wait_share"] = data_wait / max(step_time, 1e-9)
    row["skipped_steps"] = state.skipped
    device = state.ctx.device
    if device.type == "cuda":
        row["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    logger.log(state.step, "train", row)
    bar = {"loss": row["loss"], "lr": row["lr"], "gnorm": row["grad_norm"]}
    bar.update({"smp/s": row["samples_per_s"], "wait": row["data_wait_share"]})
    if "mem_gb" in row:
        bar["memGB"] = row["mem_gb"]
    logger.progress(state.step, bar)


def _track(state: TrainState, checkpoints: Checkpointer, tc: TrainConfig, metric: str, value: float) -> bool:
    """Record a validation/evaluation result in the history, and update the best value and the
    patience counter when it is ``train.best_metric`` (a new best is saved and tagged ``best``).
    True when training should stop early."""
    state.history.append({"step": state.step, metric: value})
    if metric != tc.best_metric or not math.isfinite(value):
        return False
    if _better(metric, value, state.best):
        state.best, state.best_step, state.stale = value, state.step, 0
        checkpoints.save(state, best=True)
        return False
    state.stale += 1
    return tc.patience is not None and state.stale >= tc.patience


def _evaluate(evaluate_fn: Callable, state: TrainState, checkpoints: Checkpointer) -> dict[str, float]:
    """Rank 0's simulation evaluation of the evaluated weights, broadcast to every rank. Under FSDP
    no rank holds the full weights: they are saved first and rank 0 evaluates the copy on disk."""
    ctx = state.ctx
    ckpt = checkpoints.save(state) if ctx.mode == "fsdp" else None
    result = None
    if ctx.is_main:
        result = evaluate_fn(_full_model(ckpt, ctx.device) if ckpt else state.eval_model, state.step)
    return ctx.broadcast(result)


def _data_error(exc: VLAFTError, state: TrainState, checkpoints: Checkpointer, logger) -> VLAFTError:
    """The error for a training batch that could not be read: ``exc``'s message plus where training
    stopped. One process saves the state after the last finished step first (a distributed save
    is collective: the other ranks are not there to join it)."""
    where = f"training stopped before step {state.step + 1}"
    if not state.ctx.enabled and state.step > 0:
        where += (
            f"; the state after step {state.step} is saved in {checkpoints.save(state)} (train.resume=auto)"
        )
    logger.close()
    return type(exc)(f"{worker_message(exc)} ({where})")


def _preempted(
    stop: StopRequest,
    state: TrainState,
    bad_steps: BadStepCounter,
    tc: TrainConfig,
    checkpoints: Checkpointer,
    logger,
) -> Preempted:
    """Settle the NaN/Inf counters, save a resumable checkpoint and close the logger: the error that
    ends a run stopped by SIGTERM/SIGINT (exit status 75)."""
    _settle(state, bad_steps, tc, checkpoints, logger)
    path = checkpoints.save(state)
    logger.close()
    name = stop.signal.name if stop.signal else "a signal on another rank"
    return Preempted(
        f"stopped by {name} after step {state.step} of {tc.steps}; resumable checkpoint {path}: rerun "
        f"the same command with train.resume=auto to continue (exit status {PREEMPTED_EXIT})"
    )


def _full_model(ckpt: Path, device: torch.device) -> nn.Module:
    """The policy saved in ``ckpt`` (its full weights), for rank 0's simulation evaluation under FSDP."""
    from vla_ft.models import VLAPolicy

    return VLAPolicy.from_pretrained(ckpt).to(device)
