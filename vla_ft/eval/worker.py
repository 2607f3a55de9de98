"""The rollout worker: a process that owns a few envs and steps them on request.

:class:`EnvHost` holds the envs and answers requests; :func:`worker_main` serves it over a pipe in a
spawned process (``eval.backend: local``), ``vla_ft.eval.ray_pool`` from a Ray actor
(``eval.backend: ray``). Protocol (every request gets exactly one reply):

* on start: ``("ready", spec)`` with ``action_dim``, ``action_low``/``action_high``, ``obs_keys``,
  ``obs_shapes`` (key -> (shape, dtype)), ``max_steps`` (the episode limit in force) and the
  ``instruction`` and ``task`` the env reports at a reset.
* ``("reset", [(slot, index, seed, record), ...])`` -> ``("obs", [(slot, obs, instruction, task), ...])``;
  ``record`` asks for the episode's frames (only episodes that may still get a video).
* ``("step", [(slot, actions (k, A) | None, k), ...])`` -> ``("obs", [(slot, obs, done), ...])``:
  executes up to ``k`` actions open-loop (``None``: the in-worker expert acts at every step) and stops
  early when the episode ends; ``done`` is None or ``{success, steps, reason, frames}``.
* ``("close",)`` -> the worker closes its envs and exits (no reply).

Observations sent back are the last ``history`` frames stacked on a leading T axis when
``history > 1``, else a single frame. A user error in a worker (a ``VLAFTError``: unknown task, bad
key map, NaN action) is sent back as ``("user_error", exc)`` and re-raised in the main process; any
other exception is a bug: the worker replies ``("error", traceback)`` and the evaluator raises it.
The envs and the in-worker experts are built by the record of ``env.type``
(vla_ft/sim/env_types.py).

This module must not import torch: workers only run the simulator.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections import deque
from typing import Any

import numpy as np

from vla_ft.data.layout import history_indices
from vla_ft.errors import VLAFTError, from_suite
from vla_ft.eval.scoring import REASON_PHYSICS, REASON_SUCCESS, REASON_TERMINATED, REASON_TIMEOUT
from vla_ft.sim.env_types import EnvType, check_expert, env_type

# Test hooks: the worker asked to reset episode number N kills itself with SIGKILL / stops answering.
CRASH_ENV_VAR = "VLA_FT_EVAL_CRASH_AT_EPISODE"
HANG_ENV_VAR = "VLA_FT_EVAL_HANG_AT_EPISODE"
HARD_STEP_CAP = 10_000  # safety net for envs that never truncate


class _Slot:
    """One env and the episode running in it."""

    def __init__(self, env: Any, history: int) -> None:
        self.env = env
        self.history = history
        self.record = False
        self.frames: deque = deque(maxlen=history)
        self.video: list[dict[str, np.ndarray]] = []
        self.expert: Any = None
        self.obs: dict[str, np.ndarray] = {}
        self.steps = 0
        self.limit = HARD_STEP_CAP
        self.events: dict[str, int | None] = {}  # event -> first step it held (None: not yet)

    def note_events(self, events: dict[str, bool]) -> None:
        for name, now in events.items():
            if self.events.get(name) is None:
                self.events[name] = self.steps if now else None

    def push(self, obs: dict[str, np.ndarray]) -> None:
        self.obs = obs
        self.frames.append(obs)
        if self.record:
            self.video.append({k: v for k, v in obs.items() if np.ndim(v) == 3})

    def model_obs(self) -> dict[str, np.ndarray]:
        if self.history == 1:
            return self.obs
        frames = list(self.frames)
        frames = [frames[i] for i in history_indices(len(frames) - 1, self.history)]  # the first repeats
        return {k: np.stack([f[k] for f in frames]) for k in self.obs}  # (T, ...)


def _episode_limit(env: Any, max_steps: int | None) -> int:
    if max_steps is not None:
        return max_steps
    own = getattr(getattr(env, "unwrapped", env), "max_steps", None)  # our suite's tasks truncate themselves
    if isinstance(own, int) and own > 0:
        return own
    spec = getattr(env, "spec", None)
    limit = getattr(spec, "max_episode_steps", None) if spec is not None else None
    return int(limit) if limit else HARD_STEP_CAP


def _reset(
    slot: _Slot, index: int, seed: int, record: bool, expert: Any, max_steps: int | None, kind: EnvType
):
    if os.environ.get(CRASH_ENV_VAR) == str(index):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(HANG_ENV_VAR) == str(index):
        time.sleep(3600)
    obs, info = slot.env.reset(seed=seed)
    slot.video = []
    slot.record = record
    slot.frames.clear()
    slot.steps = 0
    slot.events = {}
    slot.limit = _episode_limit(slot.env, max_steps)
    slot.push(obs)
    if expert is not None:
        slot.expert = kind.make_expert(slot.env, noise=expert.noise, seed=seed)
        slot.expert.reset()
    instruction = info.get("instruction") or getattr(slot.env.unwrapped, "instruction", "") or ""
    task = info.get("task") or getattr(slot.env.unwrapped, "task", "") or ""
    return slot.model_obs(), str(instruction), str(task)


def _step(slot: _Slot, actions: np.ndarray | None, k: int) -> dict[str, Any] | None:
    for j in range(k):
        act = slot.expert.act(slot.obs) if actions is None else actions[j]
        obs, _, terminated, truncated, info = slot.env.step(np.asarray(act, dtype=np.float32))
        slot.steps += 1
        slot.push(obs)
        slot.note_events(info.get("events") or {})
        reason = None
        if info.get("is_success", False):
            reason = REASON_SUCCESS
        elif info.get("physics_error", False):
            reason = REASON_PHYSICS
        elif terminated:
            reason = REASON_TERMINATED
        elif truncated or slot.steps >= slot.limit:
            reason = REASON_TIMEOUT
        if reason is not None:
            frames = None
            if slot.record:
                frames = {
                    key: np.stack([f[key] for f in slot.video]) for key in slot.video[0]
                }  # (T, H, W, 3)
            slot.video = []
            return {
                "success": reason == REASON_SUCCESS,
                "steps": slot.steps,
                "reason": reason,
                "frames": frames,
                "events": dict(slot.events),
            }
    return None


class EnvHost:
    """The env slots of one worker and the requests on them.

    Shared by the spawned worker process (:func:`worker_main`, over a pipe) and the Ray actor
    (``vla_ft.eval.ray_pool``): both build their envs and answer requests through this class.
    """

    def __init__(self, env_cfg: Any, max_steps: int | None, slots: list[int], options: dict) -> None:
        self.max_steps = max_steps
        self.expert = options["expert"]
        self.kind = env_type(env_cfg)  # builds the envs and their in-worker experts
        if self.expert is not None:
            check_expert(env_cfg)
        self.slots: dict[int, _Slot] = {}
        try:
            for s in slots:
                self.slots[s] = _Slot(self.kind.make(env_cfg, max_steps, render=True), options["history"])
        except BaseException:
            self.close()  # renderers must be closed explicitly (docs/traps.md)
            raise

    def spec(self) -> dict[str, Any]:
        """The ``ready`` payload: action dim and bounds, observation keys with their shapes and
        dtypes, the episode limit, and the instruction and task the env reports at a reset."""
        env = next(iter(self.slots.values())).env
        probe, info = env.reset(seed=0)
        return {
            "action_dim": int(np.prod(env.action_space.shape)),
            "action_low": np.asarray(env.action_space.low, dtype=np.float32).reshape(-1),
            "action_high": np.asarray(env.action_space.high, dtype=np.float32).reshape(-1),
            "obs_keys": sorted(probe),
            "obs_shapes": {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in probe.items()},
            "max_steps": _episode_limit(env, self.max_steps),
            "instruction": str(info.get("instruction") or getattr(env.unwrapped, "instruction", "") or ""),
            "task": str(info.get("task") or getattr(env.unwrapped, "task", "") or ""),
        }

    def handle(self, msg: tuple) -> list:
        """The payload of the ``("obs", payload)`` reply to a ``reset`` or ``step`` request."""
        if msg[0] == "reset":
            return [
                (s, *_reset(self.slots[s], i, seed, rec, self.expert, self.max_steps, self.kind))
                for s, i, seed, rec in msg[1]
            ]
        if msg[0] == "step":
            out = []
            for s, actions, k in msg[1]:
                done = _step(self.slots[s], actions, k)
                out.append((s, self.slots[s].model_obs(), done))
            return out
        raise ValueError(f"unknown worker request {msg[0]!r}")

    def close(self) -> None:
        for slot in self.slots.values():
            slot.env.close()
        self.slots = {}


def error_reply() -> tuple:
    """The reply for the exception being handled: a user error as itself, anything else as a traceback."""
    exc = from_suite(sys.exc_info()[1])  # the MuJoCo suite's errors as vla_ft's EnvError
    if isinstance(exc, VLAFTError):  # unknown task, bad key map, NaN action: re-raised as is
        return ("user_error", exc)
    return ("error", traceback.format_exc())


def worker_main(conn: Any, env_cfg: Any, max_steps: int | None, slots: list[int], options: dict) -> None:
    """Entry point of a spawned worker (see the module docstring for the protocol)."""
    host = None
    try:
        host = EnvHost(env_cfg, max_steps, slots, options)
        conn.send(("ready", host.spec()))
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                break
            conn.send(("obs", host.handle(msg)))
    except Exception:
        conn.send(error_reply())
    finally:
        if host is not None:
            host.close()
        conn.close()
