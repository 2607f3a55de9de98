"""Action heads (continuous chunk regression, binned action tokens, flow matching) and the
auxiliary task head.

Action heads read the final hidden states of the H learned action-query tokens (decoded in
parallel, one forward pass per chunk). A new head type registers in ``ACTION_HEADS`` with the same
``forward(hidden) -> dict`` contract (the flow head also takes the target chunk when training).
"""

from __future__ import annotations

import torch
from torch import nn

from vla_ft.constants import (
    OUT_ACTION,
    OUT_ACTION_LOGITS,
    OUT_FLOW_ERR,
    OUT_PROGRESS,
    OUT_TASK_LOGITS,
    OUT_WAYPOINT,
)
from vla_ft.losses import discretize
from vla_ft.models.flow import euler_integrate, noisy_actions, sample_time, time_embedding


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))


class ContinuousActionHead(nn.Module):
    """Regress the normalized action of every chunk step from its query token.

    Args:
        hidden: backbone width D.
        action_dim: A.
    """

    def __init__(self, hidden: int, action_dim: int, **_: object) -> None:
        super().__init__()
        self.mlp = _mlp(hidden, action_dim)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, H, D) query states -> {OUT_ACTION: (B, H, A)} in normalized units."""
        return {OUT_ACTION: self.mlp(h)}


class BinnedActionHead(nn.Module):
    """OpenVLA-style discrete actions: ``n_bins`` uniform bins per dimension over [-r, r].

    Normalized targets outside [-r, r] (possible with mean_std normalization) fall into the edge
    bins (:meth:`to_bins`, the loss's binning). ``OUT_ACTION`` is decoded as the softmax expectation
    of the bin centers (``decode="expectation"``, differentiable) or the argmax bin center.

    Args:
        hidden: backbone width D.
        action_dim: A.
        n_bins: NB.
        bin_range: r; bins cover [-r, r] in normalized units.
        decode: ``expectation`` or ``argmax``.
    """

    def __init__(
        self,
        hidden: int,
        action_dim: int,
        n_bins: int = 256,
        bin_range: float = 1.0,
        decode: str = "expectation",
    ) -> None:
        super().__init__()
        self.action_dim, self.n_bins, self.bin_range, self.decode = action_dim, n_bins, bin_range, decode
        self.mlp = _mlp(hidden, action_dim * n_bins)
        edges = torch.linspace(-bin_range, bin_range, n_bins + 1)
        self.register_buffer("centers", (edges[:-1] + edges[1:]) / 2, persistent=False)  # (NB,)

    def to_bins(self, actions: torch.Tensor) -> torch.Tensor:
        """Normalized actions (..., A) -> int64 bin ids (..., A) in [0, NB), clamped at the edges: the
        loss's :func:`vla_ft.losses.discretize` over [-r, r]."""
        return discretize(actions, self.n_bins, -self.bin_range, self.bin_range)

    def from_bins(self, ids: torch.Tensor) -> torch.Tensor:
        """Bin ids (..., A) -> bin-center actions (..., A)."""
        return self.centers[ids]

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, H, D) -> {OUT_ACTION_LOGITS: (B, H, A, NB), OUT_ACTION: (B, H, A)}."""
        logits = self.mlp(h).unflatten(-1, (self.action_dim, self.n_bins))  # (B, H, A, NB)
        if self.decode == "argmax":
            action = self.from_bins(logits.argmax(-1))
        else:
            action = logits.softmax(-1) @ self.centers.to(logits.dtype)  # (B, H, A)
        return {OUT_ACTION_LOGITS: logits, OUT_ACTION: action}


class FlowActionHead(nn.Module):
    """Flow matching on each query state: an MLP predicts the velocity ``v(x_t, t | h)`` that moves
    a noisy chunk toward the data (``vla_ft/models/flow.py``: t = 1 noise, t = 0 data).

    The query state ``h``, the noisy action (linear) and the sine/cosine time embedding (linear) are
    summed and go through a LayerNorm-MLP. The backbone runs once per chunk; sampling integrates
    ``num_steps`` Euler steps through this small head only.

    Args:
        hidden: backbone width D.
        action_dim: A.
        num_steps: Euler steps when sampling (``model.extra.num_steps`` overrides at call time).
    """

    MIN_PERIOD, MAX_PERIOD = 4e-3, 4.0  # SmolVLA's/pi0's time-embedding periods

    def __init__(self, hidden: int, action_dim: int, num_steps: int = 10, **_: object) -> None:
        super().__init__()
        self.action_dim, self.num_steps = action_dim, num_steps
        self.time_dim = 2 * max(1, hidden // 2)
        self.action_in = nn.Linear(action_dim, hidden)
        self.time_in = nn.Linear(self.time_dim, hidden)
        self.mlp = _mlp(hidden, action_dim)

    def velocity(self, h: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, H, D) states, (B, H, A) noisy chunk, (B,) times -> (B, H, A) velocity."""
        temb = time_embedding(t, self.time_dim, self.MIN_PERIOD, self.MAX_PERIOD).to(h.dtype)
        return self.mlp(h + self.action_in(x.to(h.dtype)) + self.time_in(temb)[:, None])

    def forward(
        self, h: torch.Tensor, actions: torch.Tensor | None = None, num_steps: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Training (``actions`` (B, H, A) given): ``OUT_FLOW_ERR`` the squared velocity error at a
        time drawn from Beta(1.5, 1) and ``OUT_ACTION`` the one-step estimate ``x_t - t * v``.
        Inference: ``OUT_ACTION`` integrated from standard normal noise."""
        if actions is not None:
            actions = actions.to(h.dtype)
            t = sample_time(h.shape[0], h.device).to(h.dtype)
            x_t, u_t = noisy_actions(actions, torch.randn_like(actions), t)
            v = self.velocity(h, x_t, t)
            return {OUT_FLOW_ERR: (u_t - v).square(), OUT_ACTION: x_t - t[:, None, None] * v}
        noise = torch.randn(*h.shape[:2], self.action_dim, device=h.device, dtype=h.dtype)
        x = euler_integrate(lambda x, t: self.velocity(h, x, t), noise, num_steps or self.num_steps)
        return {OUT_ACTION: x}


ACTION_HEADS: dict[str, type[nn.Module]] = {
    "continuous": ContinuousActionHead,
    "binned": BinnedActionHead,
    "flow": FlowActionHead,
}


class TaskHead(nn.Module):
    """Task-id classification, episode-progress and next-waypoint regression from the readout token.

    The waypoint (where the hand is at the next gripper open/close, relative to where it is now) is
    a dense, metric target for "where is the named object / destination": the bang-bang actions of
    scripted and teleoperated demos teach localization one sign at a time (see
    docs/experiments/2026-11-pick-place-rounds.md, second round).

    Args:
        hidden: D.
        num_tasks: NT (at least 1).
    """

    def __init__(self, hidden: int, num_tasks: int) -> None:
        super().__init__()
        self.task = _mlp(hidden, num_tasks)
        self.progress = _mlp(hidden, 1)
        self.waypoint = _mlp(hidden, 3)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, D) -> {OUT_TASK_LOGITS: (B, NT), OUT_PROGRESS: (B,) in (0, 1), OUT_WAYPOINT: (B, 3)}."""
        return {
            OUT_TASK_LOGITS: self.task(h),
            OUT_PROGRESS: torch.sigmoid(self.progress(h)).squeeze(-1),
            OUT_WAYPOINT: self.waypoint(h),
        }
