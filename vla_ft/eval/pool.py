"""Pools of rollout workers with crash detection and restart: spawned processes or Ray actors.

Slots (concurrent episodes) are dealt to workers round-robin: slot ``s`` lives in worker
``s % workers``. Requests go to every worker first and replies are collected afterwards, so
workers step their envs in parallel. A worker that dies, closes its pipe or does not answer within
``timeout_s`` is killed and restarted; the caller learns which workers were lost (their envs and
episodes are gone) through :meth:`WorkerPool.request`'s return value.

:func:`make_pool` picks the backend from ``eval.backend``: :class:`WorkerPool` (``local``, spawned
processes on this machine) or ``vla_ft.eval.ray_pool.RayPool`` (``ray``, one Ray actor per worker).
Both serve the same requests from the same ``worker.EnvHost``.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

from vla_ft.eval.pool_base import STARTUP_TIMEOUT_S, BasePool, WorkerError
from vla_ft.eval.worker import worker_main


class WorkerPool(BasePool):
    """Spawned workers that own the env slots.

    Args:
        env_cfg: the ``env`` config section, sent to every worker.
        max_steps: episode step limit passed to the env factory (None: the task default).
        n_slots: concurrent episodes in total.
        n_workers: processes (capped at ``n_slots``).
        options: ``history`` (frames per observation) and ``expert`` (an
            ExpertPolicy or None).
        timeout_s: seconds a request may take before its worker counts as crashed.
    """

    def __init__(
        self,
        env_cfg: Any,
        max_steps: int | None,
        n_slots: int,
        n_workers: int,
        options: dict,
        timeout_s: float,
    ) -> None:
        super().__init__(n_slots, n_workers, timeout_s)
        self.env_cfg = env_cfg
        self.max_steps = max_steps
        self.options = options
        self.ctx = mp.get_context("spawn")  # forking after an EGL renderer exists hangs the child
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Any] = {}

    def start(self) -> dict[str, Any]:
        """Start every worker; returns the env spec the first one reports."""
        return self._start_workers()

    def _launch(self, w: int) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(
            target=worker_main,
            args=(child, self.env_cfg, self.max_steps, self.slots[w], self.options),
            daemon=True,
            name=f"vla-ft-eval-{w}",
        )
        proc.start()
        child.close()
        self.procs[w], self.conns[w] = proc, parent

    def _receive(self, w: int, timeout: float) -> tuple | None:
        """One reply from worker w, or None if it died / timed out (it is then killed)."""
        conn = self.conns[w]
        try:
            if conn.poll(timeout):
                msg = conn.recv()
                if msg[0] == "user_error":
                    raise msg[1]
                if msg[0] == "error":
                    raise WorkerError(f"rollout worker {w} failed:\n{msg[1]}")
                return msg
        except (EOFError, ConnectionError, OSError):
            pass
        self._kill(w)
        return None

    def _await_ready(self, w: int) -> dict[str, Any]:
        msg = self._receive(w, max(self.timeout_s, STARTUP_TIMEOUT_S))
        if msg is None:
            raise WorkerError(
                f"rollout worker {w} died while starting (exit code {self.procs[w].exitcode}); "
                "run one episode with eval.workers=1 to see the env error"
            )
        return msg[1]

    def _kill(self, w: int) -> None:
        proc = self.procs[w]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)
        self.conns[w].close()

    def request(self, msgs: dict[int, tuple]) -> tuple[dict[int, list], list[int]]:
        """Send one message to each listed worker, then gather the replies.

        Returns:
            ``(replies, lost)``: payloads by worker, and the workers that crashed (already
            restarted, with empty slots).
        """
        sent = []
        for w, msg in msgs.items():
            try:
                self.conns[w].send(msg)
                sent.append(w)
            except (BrokenPipeError, ConnectionError, OSError):
                self._kill(w)
        replies, lost = {}, [w for w in msgs if w not in sent]
        for w in sent:
            msg = self._receive(w, self.timeout_s)
            if msg is None:
                lost.append(w)
            else:
                replies[w] = msg[1]
        for w in lost:
            self.restart(w)
        return replies, sorted(lost)

    def close(self) -> None:
        for w, conn in self.conns.items():
            if self.procs[w].is_alive():
                try:
                    conn.send(("close",))
                except (BrokenPipeError, ConnectionError, OSError):
                    pass
        for w, proc in self.procs.items():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
            self.conns[w].close()


def make_pool(env_cfg: Any, eval_cfg: Any, max_steps: int | None, n_slots: int, options: dict) -> BasePool:
    """The worker pool ``eval_cfg.backend`` names (not started)."""
    args = (env_cfg, max_steps, n_slots, int(eval_cfg.workers), options, eval_cfg.worker_timeout_s)
    if eval_cfg.backend == "ray":
        from vla_ft.eval.ray_pool import RayPool

        return RayPool(
            *args,
            address=eval_cfg.ray_address,
            num_cpus=eval_cfg.ray_num_cpus,
            num_gpus=eval_cfg.ray_num_gpus,
        )
    return WorkerPool(*args)
