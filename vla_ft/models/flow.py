"""Flow-matching building blocks shared by every flow action head.

Convention (the openpi / LeRobot one): time ``t = 1`` is pure noise, ``t = 0`` is data. A training
sample is the straight line between them,

    x_t = t * noise + (1 - t) * actions,      target velocity u_t = noise - actions,

and the network regresses ``v(x_t, t) ~ u_t``. Sampling starts at ``x_1 = noise`` and walks to
``t = 0`` with forward Euler steps of size ``dt = -1 / num_steps``.

Nothing here owns parameters: SmolVLA (``vla_ft.models.smolvla``) uses these functions, and a
native ``flow`` action head can reuse them unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Beta(1.5, 1) * 0.999 + 0.001: openpi's time distribution (more weight near t = 1, never exactly 0).
TIME_BETA_ALPHA = 1.5
TIME_BETA_BETA = 1.0
TIME_SCALE = 0.999
TIME_OFFSET = 0.001


def sample_time(
    batch_size: int,
    device: torch.device | str | None = None,
    *,
    alpha: float = TIME_BETA_ALPHA,
    beta: float = TIME_BETA_BETA,
    scale: float = TIME_SCALE,
    offset: float = TIME_OFFSET,
) -> Tensor:
    """Training times ``Beta(alpha, beta) * scale + offset``, float32 of shape (batch_size,).

    The Beta draw runs on the CPU with the global torch RNG (its Dirichlet sampler is not
    available on every accelerator), then moves to ``device``.
    """
    dist = torch.distributions.Beta(
        torch.tensor(alpha, dtype=torch.float32), torch.tensor(beta, dtype=torch.float32)
    )
    t = dist.sample((batch_size,)) * scale + offset
    return t.to(device=device, dtype=torch.float32)


def sample_noise(
    shape: tuple[int, ...], device: torch.device | str | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Standard normal float32 noise (the sample at ``t = 1``)."""
    return torch.randn(shape, dtype=torch.float32, device=device, generator=generator)


def noisy_actions(actions: Tensor, noise: Tensor, time: Tensor) -> tuple[Tensor, Tensor]:
    """Point on the noise-data line and its velocity target.

    Args:
        actions: (B, ...) clean actions (t = 0).
        noise: same shape as ``actions`` (t = 1).
        time: (B,) per-sample time in [0, 1].

    Returns:
        ``(x_t, u_t)`` with ``x_t = t*noise + (1-t)*actions`` and ``u_t = noise - actions``.
    """
    t = time.reshape(time.shape[0], *([1] * (actions.dim() - 1)))
    x_t = t * noise + (1 - t) * actions
    return x_t, noise - actions


def time_embedding(time: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """Sine/cosine features of a scalar time per sample: (B,) -> (B, dim), ``[sin | cos]``.

    The periods are geometric from ``min_period`` to ``max_period`` over ``dim // 2`` frequencies.
    Computed in float64 (float32 on MPS, which lacks float64); the caller casts the result.
    """
    if dim % 2:
        raise ValueError(f"time embedding width must be even, got {dim}")
    if time.dim() != 1:
        raise ValueError(f"time must have shape (batch,), got {tuple(time.shape)}")
    wide = torch.float32 if time.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=wide, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi)[None, :] * time[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


def euler_integrate(
    velocity: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    num_steps: int,
    on_step: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from t = 1 (``noise``) down to t = 0.

    Step ``k`` (0-based) evaluates the velocity at ``t_k = 1 + k * dt`` with ``dt = -1/num_steps``
    (a float32 (B,) tensor) and updates ``x <- x + dt * v``. ``on_step(k, t_k, v)`` sees every
    velocity, e.g. to record the trajectory.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dt = -1.0 / num_steps
    x = noise
    batch = noise.shape[0]
    for k in range(num_steps):
        t = torch.tensor(1.0 + k * dt, dtype=torch.float32, device=noise.device).expand(batch)
        v = velocity(x, t)
        if on_step is not None:
            on_step(k, t, v)
        x = x + dt * v
    return x


def masked_flow_loss(
    losses: Tensor, action_is_pad: Tensor | None = None, action_dim: int | None = None
) -> tuple[Tensor, Tensor]:
    """Reduce element-wise losses (B, H, A_max) to the training loss.

    Only the first ``action_dim`` dimensions count (the rest are zero padding of the action
    vector), and chunk steps flagged in ``action_is_pad`` (B, H) are zeroed. The mean divides by
    the number of valid (step, dim) entries, not by B*H*A.

    Returns:
        ``(loss, per_sample)``: the scalar mean over all valid entries and the (B,) mean per sample.
    """
    if action_dim is not None:
        losses = losses[..., :action_dim]
    if action_is_pad is None:
        return losses.mean(), losses.mean(dim=tuple(range(1, losses.dim())))
    valid = (~action_is_pad.bool()).to(losses.dtype)
    losses = losses * valid.unsqueeze(-1)
    per_step = losses.shape[-1]
    n_sample = (valid.sum(dim=1) * per_step).clamp_min(1)
    n_total = (valid.sum() * per_step).clamp_min(1)
    return losses.sum() / n_total, losses.sum(dim=(1, 2)) / n_sample
