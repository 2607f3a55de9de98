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
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vla_ft.config import REPO_ROOT
from vla_ft.errors import ConfigError, EnvError, VLAFTError
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


# Run in a fresh interpreter, as a spawned evaluation worker starts: an id registered in this
# process by an earlier import (metaworld imported by the user's script, say) is not there.
_PROBE = """
import sys
try:
    import envs  # this suite's vla_ft/... ids, registered as in a worker
except Exception:
    pass
from vla_ft.errors import VLAFTError
from vla_ft.eval.gym_ids import resolve_gym_id
try:
    resolve_gym_id(sys.argv[1])
except VLAFTError as exc:
    print(str(exc).splitlines()[0])
    sys.exit(3)
"""


def check_gym_id(gym_id: str) -> None:
    """A gymnasium id that :func:`gymnasium.make` will find in every evaluation worker: the module
    of its ``module:`` prefix or of its namespace imported as a worker imports it
    (:func:`vla_ft.eval.gym_ids.resolve_gym_id`), checked in a fresh interpreter (about a second).
    Building the env is the env check's (vla_ft/eval/env_check.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, gym_id], capture_output=True, text=True, env=env, timeout=300
    )
    if probe.returncode == 0:
        return
    if probe.returncode == 3:
        raise EnvError(probe.stdout.strip().splitlines()[-1])
    reason = (probe.stderr.strip().splitlines() or ["no output"])[-1][-300:]
    raise EnvError(f"env.gym_id={gym_id!r} could not be checked: {reason}")


def check_env_names(env_cfg: Any) -> None:
    """The task(s) (``env.task``, or every name in ``env.tasks``) or gymnasium id the run will be
    scored on exist, and each task has the goal set ``env.goals`` asks for (no env is built)."""
    if env_cfg.type == "gym":
        check_gym_id(env_cfg.gym_id)
        return
    if env_cfg.type == "robosuite":
        from vla_ft.sim.robosuite_env import check_env_name

        check_env_name(env_cfg)
        return
    from vla_ft.eval.evaluate import check_tasks

    check_tasks(env_cfg)
