"""The environment check before training and evaluation: build the env once, as a worker would.

``finetune`` and ``evaluate`` build ONE instance of the configured env (every task of ``env.tasks``)
exactly as an evaluation worker does (``worker.EnvHost`` -> ``env_type(env_cfg).make``), in a spawned
process (forking after an EGL renderer hangs; the process never imports torch), reset it once, and
compare what it gives with what the data or the checkpoint expects (vla_ft/eval/env_match.py).

A failure to build the env (an unknown task or gymnasium id, a missing optional package, a bad key
map, any exception of the env's constructor or reset) is ONE :class:`~vla_ft.errors.VLAFTError`
whose single line names the key and the fix. :func:`probe_envs` returns an :class:`EnvSpec` per task
(cached per env config in this process: a second check of the same config costs nothing);
:class:`EnvProbe` starts the process and collects its answer later, so that the build overlaps
loading the data and the model.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import traceback
from dataclasses import dataclass
from typing import Any

from vla_ft import errors
from vla_ft.errors import EnvError, VLAFTError, from_suite
from vla_ft.sim.env_types import env_type

STARTUP_TIMEOUT_S = 180.0  # spawn + imports + one env build and reset on a loaded 2-core machine
# optional packages an env may need, and the pip extra (pyproject.toml) that installs each
EXTRAS = {"metaworld": "metaworld", "robosuite": "robosuite", "ray": "ray"}
_CACHE: dict[str, list[EnvSpec]] = {}  # env config -> its specs (successful checks only)


@dataclass(frozen=True)
class EnvSpec:
    """What one built env gives (the ``ready`` spec of a worker, plus its name).

    Attributes:
        name: the env as the config names it (``env.task``, the gym id, the robosuite env).
        task: the task the env reports at a reset ("" if none).
        instruction: the instruction the env reports at a reset ("" if none).
        obs: observation key -> (shape, dtype name) of one frame.
        action_dim: A.
        max_steps: the episode limit in force.
    """

    name: str
    task: str
    instruction: str
    obs: dict[str, tuple[tuple[int, ...], str]]
    action_dim: int
    max_steps: int

    @classmethod
    def from_worker(cls, spec: dict[str, Any], name: str) -> EnvSpec:
        return cls(
            name=name,
            task=str(spec.get("task") or ""),
            instruction=str(spec.get("instruction") or ""),
            obs={
                k: (tuple(shape), str(dtype)) for k, (shape, dtype) in (spec.get("obs_shapes") or {}).items()
            },
            action_dim=int(spec["action_dim"]),
            max_steps=int(spec["max_steps"]),
        )

    @property
    def label(self) -> str:
        """The env that ran, for messages and reports: the configured name, with the task the env
        reports when that differs (``Meta-World/MT1 (reach-v3)``)."""
        if self.task and self.task != self.name and self.task not in self.name:
            return f"{self.name} ({self.task})"
        return self.name


# ---------------------------------------------------------------------------------- building


def split_tasks(env_cfg: Any) -> list[Any]:
    """One env config per task scored: each of ``env.tasks``, else the config itself."""
    tasks = list(getattr(env_cfg, "tasks", None) or [])
    return [dataclasses.replace(env_cfg, task=t, tasks=[]) for t in tasks] if tasks else [env_cfg]


def build_error(exc: BaseException, env_cfg: Any) -> VLAFTError:
    """One line for an exception raised while building or resetting ``env_cfg``'s env."""
    exc = from_suite(exc)  # the MuJoCo suite's errors as vla_ft's EnvError
    if isinstance(exc, VLAFTError):
        return exc
    kind = env_type(env_cfg)
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        fix = f"pip install -e '.[{EXTRAS[top]}]'" if top in EXTRAS else f"install the package {top!r}"
        return EnvError(f"{kind.setting(env_cfg)} needs the {top!r} package, which is not installed: {fix}")
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    reason = (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0]
    return EnvError(
        f"{kind.setting(env_cfg)}: the env could not be built: {reason}{where}; check {kind.keys}"
    )


def _probe_main(conn: Any, env_cfgs: list[Any], max_steps: int | None) -> None:
    """Spawned process: build and reset each env as a worker does; reply with specs or one error."""
    import warnings

    from vla_ft.eval.worker import EnvHost

    warnings.simplefilter("ignore")  # the check's output is its one line; workers still warn
    cfg = env_cfgs[0]
    try:
        specs = []
        for cfg in env_cfgs:
            host = EnvHost(cfg, max_steps, [0], {"expert": None, "history": 1})
            try:
                specs.append(host.spec())
            finally:
                host.close()
        conn.send(("ok", specs))
    except BaseException as exc:  # noqa: BLE001 (every failure becomes the user's one line)
        error = build_error(exc, cfg)
        conn.send(("error", type(error).__name__, str(error)))
    finally:
        conn.close()


def _cache_key(env_cfg: Any, max_steps: int | None) -> str:
    """The env config, the step limit and the state of every file the config names (a robosuite
    env is rebuilt from a dataset file's ``env_args``)."""
    values = dataclasses.asdict(env_cfg)
    files = {
        v: (os.stat(v).st_mtime_ns, os.stat(v).st_size)
        for v in values.values()
        if isinstance(v, str) and os.path.isfile(v)
    }
    return json.dumps([values, max_steps, files], sort_keys=True, default=str)


class EnvProbe:
    """The env check of one env config, running in a spawned process until :meth:`result`.

    Use as a context manager (the process is ended on exit), or call :meth:`close`.
    """

    def __init__(self, env_cfg: Any, max_steps: int | None) -> None:
        self.cfgs = split_tasks(env_cfg)
        self.key = _cache_key(env_cfg, max_steps)
        self.specs: list[EnvSpec] | None = _CACHE.get(self.key)
        self.error: VLAFTError | None = None  # the check's failure, raised again if asked again
        self.proc = self.conn = None
        if self.specs is None:
            ctx = mp.get_context("spawn")  # forking after an EGL renderer exists hangs the child
            self.conn, child = ctx.Pipe(duplex=False)
            self.proc = ctx.Process(
                target=_probe_main, args=(child, self.cfgs, max_steps), daemon=True, name="vla-ft-env-check"
            )
            self.proc.start()
            child.close()

    def result(self, timeout_s: float = STARTUP_TIMEOUT_S) -> list[EnvSpec]:
        """The spec of each task's env, in order.

        Raises:
            VLAFTError: one line: the env cannot be built (unknown task or id, a missing package,
                a bad key map, ...), or the check process died or did not answer in time.
        """
        if self.specs is not None:
            return self.specs
        if self.error is not None:
            raise self.error
        self.error = self._receive(timeout_s)
        if self.error is not None:
            raise self.error
        return self.specs

    def _receive(self, timeout_s: float) -> VLAFTError | None:
        """Wait for the process's reply; sets :attr:`specs`, or returns the error."""
        reply = None
        try:
            if self.conn.poll(timeout_s):
                reply = self.conn.recv()
        except (EOFError, OSError):
            reply = None
        finally:
            self.close()
        if reply is None:
            what = env_type(self.cfgs[0]).setting(self.cfgs[0])
            return EnvError(
                f"{what}: the env check process (one env build and reset, as an evaluation "
                f"worker does) died or gave no answer in {timeout_s:.0f} s (exit code {self.proc.exitcode}); "
                f"run python scripts/evaluate.py --cfg <config> --policy random eval.episodes=1 "
                f"eval.workers=1 to see the env's error"
            )
        if reply[0] == "error":  # rebuilt from its type name: only this project's user errors cross
            kind = getattr(errors, reply[1], None)
            return (
                kind(reply[2])
                if isinstance(kind, type) and issubclass(kind, VLAFTError)
                else EnvError(reply[2])
            )
        names = [env_type(c).config_name(c) for c in self.cfgs]
        self.specs = [EnvSpec.from_worker(spec, n) for spec, n in zip(reply[1], names, strict=True)]
        _CACHE[self.key] = self.specs
        return None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=10)
        if self.conn is not None:
            self.conn.close()

    def __enter__(self) -> EnvProbe:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.specs is None and self.proc is not None and self.proc.is_alive():
            self.proc.kill()  # left before its result was asked for (an earlier check failed)
        self.close()


def probe_envs(env_cfg: Any, max_steps: int | None) -> list[EnvSpec]:
    """Build and reset the env of each task of ``env_cfg`` once in a spawned process (cached)."""
    with EnvProbe(env_cfg, max_steps) as probe:
        return probe.result()


def eval_max_steps(env_cfg: Any, eval_cfg: Any) -> int | None:
    """The episode limit evaluation workers are given (``eval.max_steps``, else ``env.max_steps``)."""
    return eval_cfg.max_steps if eval_cfg.max_steps is not None else env_cfg.max_steps
