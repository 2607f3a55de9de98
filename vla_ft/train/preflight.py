"""Checks before the first training step, in one pass that reports every problem it finds.

A fine-tuning run names many things: a preset or checkpoint (and its integrity), a tokenizer,
dataset files and keys, loss terms that need labels in the data, the simulated task it will be
scored on, an output directory and the disk space for its checkpoints. :class:`Problems` runs the
checks and collects each :class:`~vla_ft.errors.VLAFTError` instead of stopping at the first, so a
user fixes their config once, not once per problem. A check that depends on a failed one is skipped
(a dataset that could not be read has no keys to check the loss terms against).

One problem is raised as it is (its own error type and line); several become a
:class:`PreflightError` with one line per problem. Nothing is written before the checks pass: the
run directory does not exist yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vla_ft.errors import ConfigError, VLAFTError
from vla_ft.sim.env_types import env_type
from vla_ft.train.checkpoint import human_bytes


class PreflightError(VLAFTError):
    """Several problems found before training; the message lists each on its own line."""


@dataclasses.dataclass
class Check:
    """The outcome of one :meth:`Problems.check` block."""

    ok: bool = True


class Problems:
    """Collects the user errors of several independent checks (see module docstring)."""

    def __init__(self) -> None:
        self.errors: list[VLAFTError] = []

    @contextlib.contextmanager
    def check(self) -> Iterator[Check]:
        """Run the block; a VLAFTError it raises is recorded and the block is left. The yielded
        :class:`Check` says afterwards whether the block passed (``with ... as c: ...; c.ok``)."""
        outcome = Check()
        try:
            yield outcome
        except VLAFTError as exc:
            self.errors.append(exc)
            outcome.ok = False

    def add(self, error: VLAFTError) -> None:
        self.errors.append(error)

    def raise_if_any(self) -> None:
        if not self.errors:
            return
        if len(self.errors) == 1:
            raise self.errors[0]
        lines = "\n".join(f"  {i}. {e}" for i, e in enumerate(self.errors, 1))
        raise PreflightError(f"{len(self.errors)} problems found before training; fix them all:\n{lines}")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(out_dir: str | Path, need_bytes: int | None = None) -> None:
    """``train.out_dir`` can be created and written, with room for one checkpoint."""
    out = Path(out_dir)
    base = _existing_ancestor(out)
    if not base.is_dir():
        raise ConfigError(
            f"train.out_dir={str(out_dir)!r}: {base} is a file, not a directory; choose another path"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(
            f"train.out_dir={str(out_dir)!r}: {base} is not writable by this user; choose a writable "
            f"directory (train.out_dir=...)"
        )
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise ConfigError(
                f"train.out_dir={str(out_dir)!r}: {human_bytes(free)} free on its disk but one "
                f"checkpoint needs about {human_bytes(need_bytes)}; free space or choose another disk"
            )


def check_env_names(env_cfg: Any) -> None:
    """The task(s) (``env.task``, or every name in ``env.tasks``), gymnasium id or robosuite env the
    run will be scored on exist, and each task has the goal set ``env.goals`` asks for (no env is
    built; a gymnasium id is resolved in a fresh interpreter, as a worker resolves it)."""
    env_type(env_cfg).check_names(env_cfg)
