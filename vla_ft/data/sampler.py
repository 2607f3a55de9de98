"""A deterministic, resumable sampler: the data order is a pure function of (seed, epoch).

The trainer resumes mid-epoch by ``sampler.set_position(epoch, index)`` where ``index`` counts
samples already drawn in that epoch (on this rank); the next iteration skips them without reading
any data. Multi-file mixing uses per-sample weights (file weight / samples in that file), drawn
with replacement; without weights an epoch is a permutation of the dataset.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Sample indices for one rank.

    Args:
        num_samples: dataset length N.
        seed: base seed; the order of epoch ``e`` depends on (seed, e) only.
        weights: optional (N,) non-negative per-sample weights (drawn with replacement).
        rank, world_size: shard for distributed training; each rank gets every world_size-th index
            of the same global order (the order is padded by wrapping so ranks get equal counts).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_samples < 1:
            raise ValueError("ResumableSampler needs a non-empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if weights is not None and weights.shape != (num_samples,):
            raise ValueError(f"weights must have shape ({num_samples},), got {tuple(weights.shape)}")
        self.num_samples, self.seed = num_samples, int(seed)
        self.weights = None if weights is None else weights.double()
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, index: int) -> None:
        """Resume at sample ``index`` (already drawn on this rank) of epoch ``epoch``."""
        if not 0 <= index <= len(self):
            raise ValueError(f"position {index} is outside the epoch length {len(self)}")
        self.epoch, self.start = int(epoch), int(index)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.start, "seed": self.seed}

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The global (all ranks) index order of ``epoch``: int64 (per_rank * world_size,)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        total = self._per_rank() * self.world_size
        if self.weights is None:
            order = torch.randperm(self.num_samples, generator=g)
            if total > self.num_samples:
                order = torch.cat([order, order[: total - self.num_samples]])
        else:
            order = torch.multinomial(self.weights, total, replacement=True, generator=g)
        return order

    def _per_rank(self) -> int:
        return -(-self.num_samples // self.world_size)

    def __len__(self) -> int:
        return self._per_rank()

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order(self.epoch)[self.rank :: self.world_size]
        start, self.start = self.start, 0  # a later epoch starts at 0 unless set_position says so
        yield from order[start:].tolist()
