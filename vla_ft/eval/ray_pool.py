"""``eval.backend: ray``: the env slots live in Ray actors, one actor per worker.

Each actor holds a :class:`vla_ft.eval.worker.EnvHost` (its envs and renderers) and answers the same
``reset`` / ``step`` requests as a spawned worker, so the evaluator's loop, the schedule and the
per-episode results are the same as with :class:`vla_ft.eval.pool.WorkerPool`; the policy stays in
the calling process, batched over all slots.

Session: a Ray this process is already connected to is used as it is. Otherwise the first
evaluation joins ``eval.ray_address`` (or ``$RAY_ADDRESS``), or with neither starts a new local Ray
(``address="local"``: a stale ``/tmp/ray/ray_current_cluster`` would otherwise make Ray try to join
a dead cluster). The connection stays for later evaluations in this process (periodic evaluation
during training pays start-up once) and ends at exit: a Ray started here is shut down then, a
joined cluster keeps running. ``ray.shutdown()`` ends it earlier.

Ray's start-up (2.4-3.6 s for a local Ray on 2 cores) can overlap the caller's own: :func:`start_early`
begins connecting in a background thread while the caller loads its checkpoint, and the pool's
:func:`connect` waits for it. ``ray.init`` replaces the SIGTERM handling (a Python handler that
exits, and a C-level one that aborts 3 s after the signal); :func:`connect` puts the caller's
handler back, so a training run stopped by SIGTERM after a periodic evaluation still finishes its
step and saves (vla_ft/train/preempt.py). Training does not start Ray early for that reason: a
thread's ``ray.init`` lands at an unknown moment, and the main thread could not put the handler
back until the first evaluation.

An actor that dies (its process killed, its node lost) or does not answer within
``eval.worker_timeout_s`` is killed and replaced by a new one; its in-flight episodes become
``worker_crash`` failures recorded with the node the actor ran on.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import signal
import socket
import sys
import threading
from typing import Any

from vla_ft.errors import ConfigError, EnvError
from vla_ft.eval.pool_base import STARTUP_TIMEOUT_S, BasePool, WorkerError, slot_count, worker_count
from vla_ft.eval.worker import CRASH_ENV_VAR, HANG_ENV_VAR, EnvHost, error_reply

INSTALL_HINT = "eval.backend=ray needs Ray, which is not installed: pip install -e '.[ray]'"
# Ray workers do not inherit the driver's environment when they run on another node or were started
# before a variable was set: the renderer choice is sent as a default, the test hooks exactly.
RENDER_ENV = ("MUJOCO_GL", "PYOPENGL_PLATFORM")
HOOK_ENV = (CRASH_ENV_VAR, HANG_ENV_VAR)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


_started: dict[str, str | None] = {"gcs": None}  # the GCS address of the local Ray this process started
# start_early's state: the "done" event of its thread (None: no start under way) and what it raised
_early: dict[str, Any] = {"done": None, "error": None}
_never = threading.Event()  # the start thread waits on it until the process exits (start_early)


def resolve_address(address: str | None) -> str | None:
    """The cluster an evaluation joins: ``eval.ray_address``, else ``$RAY_ADDRESS``, else None (a new local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def actor_cpus(eval_cfg: Any) -> float:
    """CPUs the actors of an evaluation reserve (one actor per worker, as the pool deals them)."""
    return worker_count(int(eval_cfg.workers), slot_count(eval_cfg)) * float(eval_cfg.ray_num_cpus)


def start_early(eval_cfg: Any) -> None:
    """Begin connecting to Ray for ``eval_cfg`` in a background thread and return at once.

    The first evaluation's :func:`connect` waits for the thread and raises what it raised (the same
    one-line errors as a connection made there). Does nothing when Ray is connected or a start is
    under way. From a thread ``ray.init`` sets no Python SIGTERM handler, but Ray's core still
    installs its C-level one for the whole process; :func:`connect` puts the caller's handler back
    once the start is done.
    """
    ray = import_ray()
    if ray.is_initialized() or _early["done"] is not None:
        return
    args = (resolve_address(eval_cfg.ray_address), actor_cpus(eval_cfg))

    done = threading.Event()
    _early["done"] = done

    def run() -> None:
        try:
            _connect_now(*args)
        except BaseException as exc:  # handed to the main thread by connect()
            _early["error"] = exc
        finally:
            done.set()
        # Ray's processes die with the thread that started them (Linux's parent-death signal follows
        # the creating thread, not the process), so this thread lives as long as the process.
        _never.wait()

    threading.Thread(target=run, name="vla-ft-ray-start", daemon=True).start()
    # A process that exits (an error while its checkpoint loads, say) lets the start finish first, so
    # Ray's own exit hook, registered at `import ray` and so run after this one, shuts down a whole Ray.
    atexit.register(done.wait, STARTUP_TIMEOUT_S)


def _wait_early() -> None:
    """Wait for a :func:`start_early` start, if one is under way, and raise what it raised."""
    done, _early["done"] = _early["done"], None
    if done is None:
        return
    done.wait()
    if threading.current_thread() is threading.main_thread():
        _keep_sigterm(signal.getsignal(signal.SIGTERM))
    error, _early["error"] = _early["error"], None
    if error is not None:
        raise error


def connect(address: str | None, cpus_needed: float) -> None:
    """Connect this process to Ray unless it is connected (see the module docstring).

    Args:
        address: the cluster to join; None starts a new local Ray.
        cpus_needed: CPUs the actors of this evaluation reserve; a local Ray started here for an
            earlier evaluation with fewer is replaced by a bigger one.
    """
    _wait_early()
    _connect_now(address, cpus_needed)


class _DropThreadWarning(logging.Filter):
    """Ray warns that it set no SIGTERM handler when started from a thread: that is what we want."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM in a process that set no handler: exit through Python, so the exit hooks shut Ray down."""
    sys.exit(128 + signum)


def _keep_sigterm(handler: Any) -> None:
    """Install the caller's SIGTERM handler again, over Ray's.

    ``ray.init`` sets a Python SIGTERM handler that exits, and Ray's core a C-level one that aborts
    the process 3 s after the signal; a training run that finishes its step and saves on SIGTERM
    (vla_ft/train/preempt.py) needs longer. ``signal.signal`` replaces both. A caller without a
    handler of its own (the default action) gets one that exits through Python instead, so Ray
    still shuts down at exit as its own handler would have made it.
    """
    if handler in (None, signal.SIG_DFL):
        handler = _exit_on_sigterm
    signal.signal(signal.SIGTERM, handler)


def _init(ray: Any, **kwargs: Any) -> None:
    """``ray.init`` that leaves the caller's SIGTERM handler in place (module docstring)."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main else None
    quiet = _DropThreadWarning()
    logging.getLogger("ray._private.worker").addFilter(quiet)
    try:
        ray.init(**kwargs)
    finally:
        logging.getLogger("ray._private.worker").removeFilter(quiet)
        if in_main:
            _keep_sigterm(previous)


def _connect_now(address: str | None, cpus_needed: float) -> None:
    ray = import_ray()
    if ray.is_initialized():
        ours = _started["gcs"] == ray.get_runtime_context().gcs_address
        if not ours or ray.cluster_resources().get("CPU", 0.0) >= cpus_needed:
            return
        ray.shutdown()
    if address:
        hint = (
            f"cannot join the Ray cluster at {address!r} (eval.ray_address or $RAY_ADDRESS): {{}}. Is "
            "`ray start --head` running there? A cluster with token auth (Ray's default) needs "
            "RAY_AUTH_MODE=token and its token (~/.ray/auth_token or $RAY_AUTH_TOKEN) here"
        )
        _check_reachable(address, hint)
        try:
            _init(ray, address=address)  # num_cpus/num_gpus raise when joining a cluster
        except (ConnectionError, RuntimeError) as exc:
            raise EnvError(hint.format(exc)) from exc
        _started["gcs"] = None
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
        _init(ray, address="local", num_cpus=cpus, include_dashboard=False)
        _started["gcs"] = ray.get_runtime_context().gcs_address  # Ray's own exit hook shuts it down


def _check_reachable(address: str, hint: str) -> None:
    """Fail at once on a ``host:port`` nothing listens on (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", "ray://...": Ray resolves those
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise EnvError(hint.format(f"nothing answers at {host}:{port} ({exc})")) from None


def _lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """What ``ray.get`` raises when the actor or its node is gone."""
    ex = ray.exceptions
    return (ex.RayActorError, ex.WorkerCrashedError, ex.NodeDiedError, ex.ObjectLostError)


class EnvActor:
    """The body of one Ray actor: an :class:`EnvHost` and the worker's reply protocol."""

    def __init__(self, render_env: dict[str, str], hook_env: dict[str, str | None]) -> None:
        for key, value in render_env.items():
            os.environ.setdefault(key, value)  # a node's own setting wins
        for key, value in hook_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.host: EnvHost | None = None

    def start(self, env_cfg: Any, max_steps: int | None, slots: list[int], options: dict) -> tuple:
        """Build the envs; ``("ready", spec, node)`` or an error reply."""
        import ray

        node = f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:12]})"
        try:
            self.host = EnvHost(env_cfg, max_steps, slots, options)
            return ("ready", self.host.spec(), node)
        except Exception:
            return error_reply()

    def handle(self, msg: tuple) -> tuple:
        try:
            return ("obs", self.host.handle(msg))
        except Exception:
            return error_reply()

    def close(self) -> None:
        if self.host is not None:
            self.host.close()  # renderers are closed explicitly, not left to the interpreter's exit
            self.host = None


class RayPool(BasePool):
    """Ray actors that own the env slots; the interface of :class:`vla_ft.eval.pool.WorkerPool`.

    Args:
        env_cfg, max_steps, n_slots, n_workers, options, timeout_s: as for ``WorkerPool``
            (``n_workers`` actors).
        address: the cluster to join (None: ``$RAY_ADDRESS``, else a new local Ray).
        num_cpus: CPUs each actor reserves.
        num_gpus: GPUs each actor reserves.
    """

    backend = "ray"

    def __init__(
        self,
        env_cfg: Any,
        max_steps: int | None,
        n_slots: int,
        n_workers: int,
        options: dict,
        timeout_s: float,
        address: str | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ) -> None:
        super().__init__(n_slots, n_workers, timeout_s)
        self.ray = import_ray()
        self.env_cfg, self.max_steps, self.options = env_cfg, max_steps, options
        self.address = resolve_address(address)
        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        self.actors: dict[int, Any] = {}
        self.ready_refs: dict[int, Any] = {}
        self.nodes: dict[int, str] = {}
        self.remote: Any = None  # the actor class, registered with Ray once per pool

    def _check_resources(self) -> None:
        total = self.ray.cluster_resources()
        for key, want in (("CPU", self.num_cpus), ("GPU", self.num_gpus)):
            have = total.get(key, 0.0)
            if want > have:
                raise ConfigError(
                    f"eval.ray_num_{key.lower()}s={want:g}: the Ray cluster has {have:g} {key}s in all, "
                    "so no env actor can be placed; lower it or add nodes"
                )

    def node_of(self, w: int) -> str | None:
        return self.nodes.get(w)

    def _launch(self, w: int) -> None:
        if self.remote is None:
            self.remote = self.ray.remote(EnvActor).options(
                num_cpus=self.num_cpus,
                num_gpus=self.num_gpus,
                max_restarts=0,  # a lost actor's episodes are gone anyway; the pool makes a fresh one
                scheduling_strategy="SPREAD",  # actors on as many nodes as have room
            )
        render_env = {k: os.environ[k] for k in RENDER_ENV if k in os.environ}
        hook_env = {k: os.environ.get(k) for k in HOOK_ENV}
        actor = self.remote.remote(render_env, hook_env)
        self.actors[w] = actor
        self.ready_refs[w] = actor.start.remote(self.env_cfg, self.max_steps, self.slots[w], self.options)

    def _raise_reply(self, w: int, reply: tuple) -> None:
        if reply[0] == "user_error":
            raise reply[1]
        if reply[0] == "error":
            raise WorkerError(
                f"rollout worker {w} (Ray actor on {self.nodes.get(w, '?')}) failed:\n{reply[1]}"
            )

    def _await_ready(self, w: int) -> dict[str, Any]:
        ray = self.ray
        ref = self.ready_refs.pop(w)
        timeout = max(self.timeout_s, STARTUP_TIMEOUT_S)
        done, _ = ray.wait([ref], timeout=timeout)
        if not done:
            self._kill(w)
            raise WorkerError(
                f"Ray env actor {w} did not start within {timeout:.0f} s: does a node have "
                f"{self.num_cpus:g} CPUs and {self.num_gpus:g} GPUs free (`ray status`)?"
            )
        try:
            reply = ray.get(ref)
        except _lost_errors(ray) as exc:
            self._kill(w)
            raise WorkerError(
                f"Ray env actor {w} died while starting ({type(exc).__name__}); "
                "run one episode with eval.backend=local to see the env error"
            ) from exc
        self._raise_reply(w, reply)
        self.nodes[w] = reply[2]
        return reply[1]

    def _kill(self, w: int) -> None:
        try:
            self.ray.kill(self.actors[w], no_restart=True)
        except Exception:  # already gone with its node
            pass

    def start(self) -> dict[str, Any]:
        """Connect to Ray, start every actor; returns the env spec the first one reports."""
        connect(self.address, self.n_workers * self.num_cpus)
        self._check_resources()
        return self._start_workers()  # a restarted actor may be placed on another node

    def request(self, msgs: dict[int, tuple]) -> tuple[dict[int, list], list[int]]:
        """Send one message to each listed actor, then gather the replies (as ``WorkerPool.request``)."""
        ray = self.ray
        refs = {w: self.actors[w].handle.remote(msg) for w, msg in msgs.items()}
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout_s)
        done = set(done)
        replies, lost = {}, []
        for w, ref in refs.items():
            if ref not in done:  # silent for timeout_s: counts as crashed
                self._kill(w)
                lost.append(w)
                continue
            try:
                reply = ray.get(ref)
            except _lost_errors(ray):
                self._kill(w)
                lost.append(w)
                continue
            self._raise_reply(w, reply)
            replies[w] = reply[1]
        for w in lost:
            self.restart(w)
        return replies, sorted(lost)

    def close(self) -> None:
        """Close the actors' envs and end the actors; the Ray session stays (module docstring)."""
        ray = self.ray
        if ray.is_initialized() and self.actors:
            refs = [actor.close.remote() for actor in self.actors.values()]
            ray.wait(refs, num_returns=len(refs), timeout=30)
            for w in self.actors:
                self._kill(w)
        self.actors = {}
