"""One optimizer step, validation, precision and data-order helpers used by the loop."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

Batch = dict[str, Tensor]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA devices that support it, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """Autocast context for ``bf16``/``fp16`` (CUDA and CPU), a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Batch, device: torch.device) -> Batch:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def grad_norm_and_clip(params: list[Tensor], max_norm: float) -> Tensor:
    """Global L2 norm of the gradients of ``params`` (before clipping); clip in place when
    ``max_norm > 0``. Works for plain and FSDP2-sharded (DTensor) gradients; no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2: a partial norm per shard -> the global norm
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def step_optimizer(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """``optimizer.step()`` unless ``found_inf`` (a 0-dim float tensor, 1.0 = skip) is set.

    Fused AdamW takes the flag on the device (as under a grad scaler): it skips the update and
    leaves its step counter unchanged without a host sync. Other optimizers (torchao's 8-bit AdamW)
    read the flag on the host, one sync per step.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(found_inf):
        optimizer.step()


def train_step(
    model: nn.Module,
    loss_fn: Callable[[dict, Batch], tuple[Tensor, dict[str, Tensor]]],
    micro_batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp: Callable[[], contextlib.AbstractContextManager],
    grad_clip: float,
    augment: Callable[[Batch], Batch] | None = None,
    grad_sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
    reduce_flag: Callable[[Tensor], Tensor] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Forward/backward over ``k`` micro-batches (loss divided by k), clip, and step the optimizer.

    The step is skipped when the loss or the gradient norm is not finite (fp16 overflow is left to
    the grad scaler, which skips and lowers its scale). The decision stays on the device: nothing
    here waits for the accelerator (see :func:`step_optimizer`).

    Args:
        grad_sync: callable(is_last_micro_batch) -> context for each backward (DDP's ``no_sync`` on
            all but the last micro-batch), or None.
        reduce_flag: callable(flag) -> flag maxed over ranks, so every rank skips together, or None.

    Returns:
        (mean metrics as detached tensors, including ``grad_norm`` before clipping; a 0-dim bool
        tensor on the device, True when the optimizer stepped).
    """
    optimizer.zero_grad(set_to_none=True)
    in_backward = hasattr(optimizer, "begin") and hasattr(optimizer, "finish")  # InBackwardAdamW
    k = len(micro_batches)
    sums: dict[str, Tensor] = {}
    for i, batch in enumerate(micro_batches):
        if augment is not None:
            batch = augment(batch)
        with grad_sync(i == k - 1) if grad_sync is not None else contextlib.nullcontext():
            with amp():
                outputs = model(batch)
                loss, metrics = loss_fn(outputs, batch)
            if in_backward:
                optimizer.begin(loss)
            scaler.scale(loss / k).backward()
        for key, value in metrics.items():
            sums[key] = sums[key] + value if key in sums else value
    means = {key: value / k for key, value in sums.items()}
    if in_backward:  # the parameters were updated (or skipped) during backward
        means["grad_norm"] = optimizer.finish()
        return means, torch.isfinite(means["loss"]) & torch.isfinite(means["grad_norm"])
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = grad_norm_and_clip(params, grad_clip)
    means["grad_norm"] = grad_norm.detach()
    if scaler.is_enabled():  # fp16: the scaler skips overflowing steps (and lowers its scale)
        scaler.step(optimizer)
        scaler.update()
        return means, torch.isfinite(grad_norm)
    bad = ~(torch.isfinite(means["loss"]) & torch.isfinite(grad_norm))
    found_inf = bad.float()
    if reduce_flag is not None:
        found_inf = reduce_flag(found_inf)
    step_optimizer(optimizer, found_inf)
    return means, found_inf == 0


class BadStepCounter:
    """Skipped (NaN/Inf) optimizer steps, counted on the device so that no step waits for the host:
    the total and the longest run of consecutive skips, read at sync points with :meth:`read`.

    Args:
        skipped: steps skipped before (a resumed run's count).
        device: where the counters live.
        enabled: False under fp16, whose grad scaler skips overflowing steps itself.
    """

    def __init__(self, skipped: int, device: torch.device, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = torch.full((), float(skipped), device=device)
        self.run = torch.zeros((), device=device)
        self.peak = torch.zeros((), device=device)

    def record(self, stepped: Tensor) -> None:
        """Count one step; ``stepped`` is :func:`train_step`'s flag (False: skipped)."""
        if not self.enabled:
            return
        bad = (~stepped).float()
        self.total += bad
        self.run.mul_(bad).add_(bad)  # consecutive bad steps: (run + bad) * bad
        torch.maximum(self.peak, self.run, out=self.peak)

    def read(self) -> tuple[int, int]:
        """(skipped steps in all, the longest run of consecutive ones): one host sync."""
        total, peak = (int(v) for v in torch.stack([self.total, self.peak]).tolist())
        return total, peak


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, ok: Tensor) -> None:
    """EMA of ``model`` into ``ema`` (a ``torch.optim.swa_utils.AveragedModel`` with buffers), only
    where ``ok`` (a 0-dim bool tensor: the optimizer stepped). The first update copies the weights.
    Same arithmetic as ``get_ema_multi_avg_fn`` but without its host sync (``n_averaged == 0``).
    """
    ok_f = ok.to(ema.n_averaged.device).float()
    weight = torch.where(ema.n_averaged == 0, 1.0, 1.0 - decay) * ok_f  # 0-dim, on the device
    pairs = zip([*ema.module.parameters(), *ema.module.buffers()], [*model.parameters(), *model.buffers()])
    floats, others = [], []
    for e, m in pairs:
        (floats if e.is_floating_point() else others).append((e.detach(), m.detach()))
    if floats:
        # ema += weight * (model - ema), in groups to bound the temporary copy. Not _foreach_lerp_:
        # with a device tensor as the weight some torch releases read it on the host (a sync).
        w = weight.to(floats[0][0].device)
        for i in range(0, len(floats), 64):
            ema_t, model_t = (list(t) for t in zip(*floats[i : i + 64]))
            deltas = torch._foreach_sub(model_t, ema_t)
            torch._foreach_mul_(deltas, w)
            torch._foreach_add_(ema_t, deltas)
    for e, m in others:  # integer buffers (batch-norm counters)
        avg = torch.where(ema.n_averaged == 0, m, (e * decay + m * (1 - decay)).to(e.dtype))
        e.copy_(torch.where(ok_f > 0, avg, e))
    ema.n_averaged += ok_f.long()


@torch.no_grad()
def validate(
    model: nn.Module,
    loss_fn: Callable[[dict, Batch], tuple[Tensor, dict[str, Tensor]]],
    batches,
    device: torch.device,
    amp: Callable[[], contextlib.AbstractContextManager],
    max_batches: int | None = None,
) -> dict[str, float]:
    """Mean loss terms over held-out batches (eval mode, no augmentation)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = to_device(batch, device)
        with amp():
            _, metrics = loss_fn(model(batch), batch)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        count += 1
    model.train(was_training)
    return {key: value / max(count, 1) for key, value in sums.items()}
