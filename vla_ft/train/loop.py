"""The full-parameter training loop, readable top to bottom in :func:`fit`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from vla_ft.config import Config
from vla_ft.data.sampler import ResumableSampler
from vla_ft.errors import PREEMPTED_EXIT, CheckpointError, Preempted, VLAFTError, worker_message
from vla_ft.losses import ActionTaskLoss
from vla_ft.train import checkpoint as ckpt_io
from vla_ft.train.distributed import (
    DistContext,
    grad_sync_context,
    micro_batch_size,
    wrap_model,
)
from vla_ft.train.logging import NullLogger, RunLogger
from vla_ft.train.optim import apply_unfreezing, build_optimizer, build_param_groups, build_scheduler
from vla_ft.train.preempt import StopRequest
from vla_ft.train.step import autocast, ema_update, to_device, train_step, validate


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
        cfg: the run config.
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
    ema = (
        AveragedModel(policy, device=device, multi_avg_fn=get_ema_multi_avg_fn(tc.ema), use_buffers=True)
        if tc.ema
        else None
    )
    model = wrap_model(policy, ctx, precision, tc.cpu_offload)  # DDP / FSDP2 (in place) / as is
    groups = build_param_groups(policy, param_info, tc)
    optimizer = build_optimizer(groups, tc, device)
    scheduler = build_scheduler(optimizer, tc)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if tc.compile:
        model = torch.compile(model)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1 + ctx.rank)
    augment_batch = (lambda b: augment(b, aug_gen)) if augment is not None else None
    sampler = ResumableSampler(len(train_ds), cfg.seed, sample_weights, ctx.rank, ctx.world_size)
    val_loader = make_loader(val_ds, micro, None, cfg.data.num_workers, device, cfg.seed) if val_ds else None
    grad_sync = grad_sync_context(model, ctx)

    step, epoch, pos, skipped = 0, 0, 0, 0
    best, best_step, stale, history = None, None, 0, []
    wandb_id = None
    if resume is not None:
        state, tensors = resume
        scheduler.load_state_dict(tensors["scheduler"])
        if "scaler" in tensors:
            scaler.load_state_dict(tensors["scaler"])
        if (ema is not None) != ("raw_model" in tensors):
            raise CheckpointError(
                f"train.ema={tc.ema} but the checkpoint was saved with"
                f"{'out' if 'raw_model' not in tensors else ''} EMA: resume with the run's own train.ema"
            )
        if ema is not None:  # the policy was loaded with the EMA weights (model.safetensors)
            ema.module.load_state_dict(policy.state_dict())
            ema.n_averaged.fill_(state["ema_n_averaged"])
        if "sharded" in tensors:  # a distributed run's checkpoint, saved at any world size
            ckpt_io.load_sharded(tensors["sharded"], policy, optimizer)  # raw weights + optimizer
        else:
            optimizer.load_state_dict(tensors["optimizer"])
            if ema is not None:
                policy.load_state_dict(tensors["raw_model"])
        step, epoch, skipped = state["step"], state["epoch"], state["skipped"]
        pos = state["pos"] // ctx.world_size  # global samples of this epoch -> this rank's
        best, best_step, stale, history = state["best"], state["best_step"], state["stale"], state["history"]
        wandb_id = state.get("wandb_id")
        torch.set_rng_state(tensors["rng"]["torch"])
        aug_gen.set_state(tensors["rng"]["augment"])
        if device.type == "cuda" and "cuda" in tensors["rng"]:
            torch.cuda.set_rng_state(tensors["rng"]["cuda"], device)

    if ctx.is_main:
        logger = RunLogger(cfg, run_dir, tc.steps, start_step=step, wandb_id=wandb_id)
    else:
        logger = NullLogger(wandb_id)
    eval_model = lambda: ema.module if ema is not None else policy  # noqa: E731

    # NaN/Inf bookkeeping stays on the device; it is read at sync points (log/val/eval/save steps).
    count_bad = not scaler.is_enabled()  # fp16: the grad scaler handles overflow itself
    bad_total = torch.full((), float(skipped), device=device)
    bad_run = torch.zeros((), device=device)
    bad_peak = torch.zeros((), device=device)
    saved: dict[int, Path] = {}
    ckpt_bytes = ckpt_io.estimate_checkpoint_bytes(policy, ema is not None)

    def write_model(path: Path) -> None:
        if ctx.mode == "fsdp":  # gather the full weights to rank 0's CPU (collective)
            ckpt_io.save_full_model(policy, path, ctx)
        elif ctx.is_main:
            eval_model().save_pretrained(path, manifest=False)  # save_checkpoint writes one for all

    def save(tag_best: bool = False) -> Path:
        if step in saved and saved[step].exists():  # already written at this step (e.g. as best)
            if tag_best and ctx.is_main:
                ckpt_io.point_link(run_dir / "best", saved[step])
            return saved[step]
        rng = {"torch": torch.get_rng_state(), "augment": aug_gen.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {
            "step": step, "epoch": epoch, "pos": pos * ctx.world_size, "world_size": ctx.world_size,
            "skipped": skipped, "best": best, "best_step": best_step, "stale": stale,
            "history": history, "wandb_id": logger.wandb_id,
            "ema_n_averaged": int(ema.n_averaged) if ema is not None else 0,
        }  # fmt: skip
        tensors = {
            "optimizer": None if ctx.enabled else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": rng,
        }
        raw = policy.state_dict() if ema is not None else None
        sharded = (policy, optimizer) if ctx.enabled else None
        path = ckpt_io.save_checkpoint(
            run_dir, step, write_model, state, tensors, raw, ctx, sharded, need_bytes=ckpt_bytes
        )
        saved[step] = path
        if ctx.is_main:
            if tag_best:
                ckpt_io.point_link(run_dir / "best", path)
            ckpt_io.prune_checkpoints(run_dir, tc.keep_last)
        ctx.barrier()
        return path

    def settle() -> None:
        """Read the device-side NaN/Inf counters (one host sync): rewind the LR schedule by the
        steps skipped since the last read, and stop after ``max_bad_steps`` bad steps in a row."""
        nonlocal skipped
        total, peak = (int(v) for v in torch.stack([bad_total, bad_peak]).tolist())
        if total > skipped:  # the schedule advanced optimistically on steps that were skipped
            scheduler.last_epoch -= total - skipped + 1
            scheduler.step()
            skipped = total
        if peak >= tc.max_bad_steps:
            path = save()
            logger.close()
            raise TrainingDiverged(
                f"loss or gradient was NaN/Inf for {peak} consecutive steps (by step {step}); "
                f"the last good weights are saved in {path}. Lower train.lr (now {tc.peak_lr:g}), "
                f"lengthen train.warmup_steps or set train.grad_clip"
            )

    def track(metric_name: str, value: float) -> bool:
        """Update best/patience for the configured metric; True when training should stop."""
        nonlocal best, best_step, stale
        if metric_name != tc.best_metric or not math.isfinite(value):
            return False
        if _better(metric_name, value, best):
            best, best_step, stale = value, step, 0
            save(tag_best=True)
            return False
        stale += 1
        return tc.patience is not None and stale >= tc.patience

    trainable = apply_unfreezing(policy, param_info, step, tc.unfreeze_steps)
    total = sum(p.numel() for p in policy.parameters())
    if ctx.is_main:
        print(f"[vla-ft] trainable parameters: {trainable:,} / {total:,} ({100.0 * trainable / total:.1f}%)")
    policy.train()
    stopped_early = False
    data_wait = step_time = 0.0
    batches = None
    # SIGTERM/SIGINT finish the current step, then save and stop (vla_ft/train/preempt.py)
    with StopRequest(report=ctx.is_main) as stop:
        while step < tc.steps and not stopped_early:
            t0 = time.perf_counter()
            if tc.unfreeze_steps:
                apply_unfreezing(policy, param_info, step, tc.unfreeze_steps)
            micro_batches = []
            position = epoch, pos  # the data position after the last finished step
            try:
                for _ in range(tc.grad_accum):
                    if batches is None:
                        sampler.set_position(epoch, pos)
                        batches = iter(
                            make_loader(train_ds, micro, sampler, cfg.data.num_workers, device, cfg.seed)
                        )
                    batch = next(batches, None)
                    if batch is None:  # epoch finished
                        epoch, pos, batches = epoch + 1, 0, None
                        sampler.set_position(epoch, pos)
                        batches = iter(
                            make_loader(train_ds, micro, sampler, cfg.data.num_workers, device, cfg.seed)
                        )
                        batch = next(batches)
                    pos += micro
                    micro_batches.append(to_device(batch, device))
            except VLAFTError as exc:  # data read lazily that turned out unreadable (a damaged chunk)
                epoch, pos = position  # unwinds an epoch rollover inside this accumulation too
                where = f"training stopped before step {step + 1}"
                if not ctx.enabled and step > 0:  # one process: keep the progress (a save is collective)
                    where += f"; the state after step {step} is saved in {save()} (train.resume=auto)"
                logger.close()
                raise type(exc)(f"{worker_message(exc)} ({where})") from None
            t_data = time.perf_counter() - t0

            metrics, stepped = train_step(
                model, loss_fn, micro_batches, optimizer, scaler, amp, tc.grad_clip, augment_batch,
                grad_sync=grad_sync, reduce_flag=ctx.max_flag if ctx.enabled else None,
            )  # fmt: skip
            step += 1
            scheduler.step()  # rewound at the next sync point if this step was skipped (settle)
            if ema is not None:
                ema_update(ema, policy, tc.ema, stepped)
            if count_bad:
                bad = (~stepped).float()
                bad_total += bad
                bad_run.mul_(bad).add_(bad)  # consecutive bad steps: (run + bad) * bad
                torch.maximum(bad_peak, bad_run, out=bad_peak)
            data_wait += t_data
            step_time += time.perf_counter() - t0

            due_log = step % cfg.log.every == 0 or step == tc.steps
            due_val = (
                val_loader is not None and tc.val_every and (step % tc.val_every == 0 or step == tc.steps)
            )
            due_eval = evaluate_fn is not None and tc.eval_every and step % tc.eval_every == 0
            due_save = (tc.save_every and step % tc.save_every == 0) or step == tc.steps
            if due_log or due_val or due_eval or due_save:
                settle()

            if due_log:
                row = {k: float(v) for k, v in ctx.mean(metrics).items()}  # the global batch's means
                row["lr"] = float(optimizer.param_groups[-1]["lr"])
                row["samples_per_s"] = cfg.log.every * tc.batch_size / max(step_time, 1e-9)
                row["data_wait_share"] = data_wait / max(step_time, 1e-9)
                row["skipped_steps"] = skipped
                if device.type == "cuda":
                    row["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.log(step, "train", row)
                bar = {"loss": row["loss"], "lr": row["lr"], "gnorm": row["grad_norm"]}
                bar.update({"smp/s": row["samples_per_s"], "wait": row["data_wait_share"]})
                if "mem_gb" in row:
                    bar["memGB"] = row["mem_gb"]
                logger.progress(step, bar)
                data_wait = step_time = 0.0

            if due_val:  # every rank validates (FSDP needs all of them); rank 0's numbers decide
                val = ctx.broadcast(validate(eval_model(), loss_fn, val_loader, device, amp))
                logger.log(step, "val", val)
                history.append({"step": step, "val_loss": val["loss"]})
                stopped_early |= track("val_loss", val["loss"])
            if due_eval:
                ckpt = save() if ctx.mode == "fsdp" else None  # rank 0 evaluates a full copy from disk
                result = None
                if ctx.is_main:
                    result = evaluate_fn(_full_model(ckpt, device) if ckpt else eval_model(), step)
                result = ctx.broadcast(result)
                logger.log(step, "eval", result)
                history.append({"step": step, "success_rate": result["success_rate"]})
                stopped_early |= track("success_rate", result["success_rate"])
            if due_save or stopped_early:
                save()
            # SIGTERM/SIGINT on any rank: save here, then leave (a finished run just finishes)
            if step < tc.steps and not stopped_early and stop.requested(ctx):
                settle()
                path = save()
                logger.close()
                raise Preempted(
                    f"stopped by {stop.signal.name if stop.signal else 'a signal on another rank'} after "
                    f"step {step} of {tc.steps}; resumable checkpoint {path}: rerun the same command with "
                    f"train.resume=auto to continue (exit status {PREEMPTED_EXIT})"
                )

    logger.close()
    if best_step is None and ctx.is_main:  # no metric was ever computed: the last checkpoint is the best
        ckpt_io.point_link(run_dir / "best", (run_dir / "last").resolve())
    ctx.barrier()
    return FitResult(run_dir, step, best, best_step, stopped_early, skipped, history)


def _full_model(ckpt: Path, device: torch.device) -> nn.Module:
    """The policy saved in ``ckpt`` (its full weights), for rank 0's simulation evaluation under FSDP."""
    from vla_ft.models import VLAPolicy

    return VLAPolicy.from_pretrained(ckpt).to(device)
