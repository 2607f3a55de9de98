"""Action heads (continuous chunk regression, binned action tokens) and the auxiliary task head.

Action heads read the final hidden states of the H learned action-query tokens (decoded in
parallel, one forward pass per chunk). A new head type (e.g. flow matching) registers in
``ACTION_HEADS`` with the same ``forward(hidden) -> dict`` contract.
"""

from __future__ import annotations

import torch
from torch import nn

from vla_ft.constants import OUT_ACTION, OUT_ACTION_LOGITS, OUT_PROGRESS, OUT_TASK_LOGITS, OUT_WAYPOINT


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
    bins: :meth:`to_bins` clamps them first. ``OUT_ACTION`` is decoded as the softmax expectation
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
        """Normalized actions (..., A) -> int64 bin ids (..., A) in [0, NB), clamped at the edges."""
        x = (actions.clamp(-self.bin_range, self.bin_range) + self.bin_range) / (2 * self.bin_range)
        return (x * self.n_bins).long().clamp(0, self.n_bins - 1)

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


ACTION_HEADS: dict[str, type[nn.Module]] = {"continuous": ContinuousActionHead, "binned": BinnedActionHead}


class TaskHead(nn.Module):
    """Task-id classification, episode-progress and next-waypoint regression from the readout token.

    The waypoint (where the hand is at the next gripper open/close, relative to where it is now) is
    a dense, metric target for "where is the named object / destination": the bang-bang actions of
    scripted and teleoperated demos teach localization one sign at a time (docs/training.md).

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
