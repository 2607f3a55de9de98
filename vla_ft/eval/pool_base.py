"""What every pool of rollout workers shares (vla_ft/eval/pool.py explains the pools): slot
dealing, the env spec, restart accounting, and the error a worker's crash becomes."""

from __future__ import annotations

from typing import Any

STARTUP_TIMEOUT_S = 180.0  # imports + env construction on a loaded 2-core machine


def slot_count(eval_cfg: Any) -> int:
    """Concurrent episodes of an evaluation: ``eval.num_envs``, at most ``eval.episodes``."""
    return min(int(eval_cfg.num_envs), int(eval_cfg.episodes))


def worker_count(n_workers: int, n_slots: int) -> int:
    """Workers a pool starts: ``n_workers``, at most one per slot, at least one."""
    return max(1, min(n_workers, n_slots))


class WorkerError(RuntimeError):
    """An exception raised inside a worker (its traceback is the message)."""


class BasePool:
    """What every backend shares: slot dealing, the env spec, restart accounting.

    A backend implements ``start() -> spec``, ``request(msgs) -> (replies, lost)``, ``close()``
    and may override :meth:`node_of`.
    """

    backend = "local"

    def __init__(self, n_slots: int, n_workers: int, timeout_s: float) -> None:
        self.n_workers = worker_count(n_workers, n_slots)
        self.slots = {
            w: [s for s in range(n_slots) if s % self.n_workers == w] for w in range(self.n_workers)
        }
        self.timeout_s = timeout_s
        self.spec: dict[str, Any] | None = None
        self.restarts = 0

    def worker_of(self, slot: int) -> int:
        return slot % self.n_workers

    def node_of(self, w: int) -> str | None:
        """Where worker ``w`` runs now (None: this machine)."""
        return None

    def _launch(self, w: int) -> None:
        raise NotImplementedError

    def _await_ready(self, w: int) -> dict[str, Any]:
        raise NotImplementedError

    def _start_workers(self) -> dict[str, Any]:
        """Launch every worker, then wait for each; returns the env spec the first one reports."""
        for w in range(self.n_workers):
            self._launch(w)
        for w in range(self.n_workers):
            spec = self._await_ready(w)
            if self.spec is None:
                self.spec = spec
        return self.spec

    def restart(self, w: int) -> None:
        """Replace a lost worker with a fresh one (its slots start empty)."""
        self.restarts += 1
        if self.restarts > 3 * self.n_workers + 3:
            raise WorkerError(f"rollout workers crashed {self.restarts} times; giving up")
        self._launch(w)
        self._await_ready(w)
