"""The training loop's checkpoints: :class:`Checkpointer` saves a :class:`TrainState` into a run
directory, tags ``best``, and prunes all but the newest ``train.keep_last`` (the on-disk format and
the atomic write are :mod:`vla_ft.train.checkpoint`'s)."""

from __future__ import annotations

from pathlib import Path

from vla_ft.train import checkpoint as ckpt_io
from vla_ft.train.distributed import DistContext
from vla_ft.train.state import TrainState


class Checkpointer:
    """Writes ``<run_dir>/checkpoints/step_N`` and moves the ``last`` and ``best`` links.

    In a distributed run every rank calls :meth:`save` (it is collective): under FSDP the full
    weights are gathered to rank 0, which writes the model files, the links and the pruning; every
    rank writes its shard of the model and optimizer state and its RNG.

    Args:
        run_dir: the run directory.
        ctx: the distributed context.
        keep_last: step checkpoints to keep (``best`` and ``last`` are never deleted).
        need_bytes: the estimated size of one checkpoint, for the message when the disk is full.
    """

    def __init__(self, run_dir: Path, ctx: DistContext, keep_last: int, need_bytes: int | None = None):
        self.run_dir, self.ctx, self.keep_last, self.need_bytes = run_dir, ctx, keep_last, need_bytes
        self._saved: dict[int, Path] = {}  # step -> checkpoint written by this run

    def save(self, state: TrainState, best: bool = False) -> Path:
        """Save ``state`` at its step (once: a second call at the same step returns the same
        directory) and point ``last`` at it; ``best`` also points ``best`` at it.

        Raises:
            CheckpointError: the write failed (a full disk, say); ``last`` still names the previous
                checkpoint.
        """
        done = self._saved.get(state.step)
        if done is not None and done.exists():  # already written at this step (e.g. as best)
            if best and self.ctx.is_main:
                ckpt_io.point_link(self.run_dir / "best", done)
            return done
        values, tensors = state.state_dict()
        raw, sharded = tensors.pop("raw_model", None), tensors.pop("sharded", None)
        path = ckpt_io.save_checkpoint(
            self.run_dir, state.step, lambda out: self._write_model(state, out), values, tensors, raw,
            self.ctx, sharded, need_bytes=self.need_bytes,
        )  # fmt: skip
        self._saved[state.step] = path
        if self.ctx.is_main:
            if best:
                ckpt_io.point_link(self.run_dir / "best", path)
            ckpt_io.prune_checkpoints(self.run_dir, self.keep_last)
        self.ctx.barrier()
        return path

    def _write_model(self, state: TrainState, out: Path) -> None:
        """The model directory of the evaluated weights (EMA ones when EMA is on)."""
        if self.ctx.mode == "fsdp":  # gather the full weights to rank 0's CPU (collective)
            ckpt_io.save_full_model(state.policy, out, self.ctx)
        elif self.ctx.is_main:
            state.eval_model.save_pretrained(out, manifest=False)  # save_checkpoint writes one for all

    def best_is_last(self) -> None:
        """Point ``best`` at the ``last`` checkpoint (a run that never computed its metric)."""
        if self.ctx.is_main:
            ckpt_io.point_link(self.run_dir / "best", (self.run_dir / "last").resolve())
