"""Stop on request: SIGTERM/SIGINT finish the current optimizer step, save, and exit with status 75.

Schedulers (SLURM, Kubernetes) send SIGTERM some seconds before they kill a job; Ctrl-C sends
SIGINT. :class:`StopRequest` turns the first of either into a flag the training loop reads after
each optimizer step; the loop then writes a resumable checkpoint and raises
:class:`~vla_ft.errors.Preempted`, which the CLI turns into exit status 75 (``PREEMPTED_EXIT``).
A second SIGINT aborts at once (``KeyboardInterrupt``, exit status 130).

Under torchrun the agent forwards the signal to every worker; workers may see it at different
steps, so the flag is max-reduced over the ranks after every step, on the CPU (the gloo group;
no GPU synchronization), and every rank stops after the same step. One signal delivered twice
(Ctrl-C reaches both the torchrun agent, which forwards it, and the workers) counts once:
repeats within ``REPEAT_S`` seconds of the first are ignored.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

REPEAT_S = 1.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT set :attr:`signal` instead of killing.

    Handlers are installed only in the main thread (Python's rule); elsewhere the request never
    fires and the process keeps the signals' default behaviour.
    """

    def __init__(self, report: bool = True) -> None:
        self.signal: signal.Signals | None = None
        self.report = report
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._first_at = signal.Signals(signum), now
            if self.report:
                print(
                    f"\n[vla-ft] {self.signal.name}: stopping after the current step and saving a "
                    f"checkpoint (Ctrl-C again to abort without saving)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if signum == signal.SIGINT and now - self._first_at > REPEAT_S:
            raise KeyboardInterrupt

    def requested(self, ctx: Any = None) -> bool:
        """Whether any rank got a stop signal (a CPU all-reduce when ``ctx`` is distributed)."""
        local = self.signal is not None
        if ctx is None or not ctx.enabled:
            return local
        return ctx.any_host(local)
