"""One optimizer step, validation, precision and data-order helpers used by the loop."""

from __future__ import annotations

import contextlib
import math
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


def train_step(
    model: nn.Module,
    loss_fn: Callable[[dict, Batch], tuple[Tensor, dict[str, Tensor]]],
    micro_batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp: Callable[[], contextlib.AbstractContextManager],
    grad_clip: float,
    augment: Callable[[Batch], Batch] | None = None,
) -> tuple[dict[str, Tensor], bool]:
    """Forward/backward over ``k`` micro-batches (loss divided by k), clip, and step the optimizer.

    The step is skipped when the loss or the gradient norm is not finite (fp16 overflow is left to
    the grad scaler, which skips and lowers its scale). Returns (mean metrics as detached tensors,
    including ``grad_norm`` before clipping, and whether the optimizer stepped).
    """
    optimizer.zero_grad(set_to_none=True)
    k = len(micro_batches)
    sums: dict[str, Tensor] = {}
    for batch in micro_batches:
        if augment is not None:
            batch = augment(batch)
        with amp():
            outputs = model(batch)
            loss, metrics = loss_fn(outputs, batch)
        scaler.scale(loss / k).backward()
        for key, value in metrics.items():
            sums[key] = sums[key] + value if key in sums else value
    means = {key: value / k for key, value in sums.items()}
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    means["grad_norm"] = grad_norm.detach()
    # One host sync per step: the skip decision. fp16 overflow in the grads is the scaler's job.
    loss_ok = bool(torch.isfinite(means["loss"]))
    grads_ok = scaler.is_enabled() or bool(torch.isfinite(grad_norm))
    stepped = loss_ok and grads_ok
    if stepped:
        scaler.step(optimizer)
    scaler.update()
    return means, stepped


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
