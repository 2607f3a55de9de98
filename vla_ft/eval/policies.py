"""What the evaluator can score, and the checks it runs on a policy before any rollout.

A policy is anything with ``action_dim`` and
``predict_action(obs_batch: dict[str, ndarray (N, ...)], instructions: list[str]) -> ndarray (N, H, A)``
returning env-unit action chunks (``VLAPolicy`` does). Optional: ``obs_spec`` (an object with
``image_keys``, ``state_keys`` and ``history``) tells which observation keys it reads.

Two built-ins take the same rollout and scoring path:

* :class:`RandomPolicy`: uniform actions in the env's bounds, seeded per observation so that an
  episode's actions never depend on which other episodes share its batch.
* :class:`ExpertPolicy`: the task's scripted expert. It needs privileged sim state, so the worker
  that owns the env computes its actions (``runs_in_worker``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vla_ft.errors import CheckpointError, EnvError


@runtime_checkable
class Policy(Protocol):
    """The evaluator's view of a policy."""

    action_dim: int

    def predict_action(self, obs: dict[str, np.ndarray], instructions: list[str]) -> np.ndarray:
        """Batched observations (leading N) + N instructions -> (N, H, A) env-unit actions."""
        ...


class RandomPolicy:
    """Uniform random action chunks within ``[low, high]``.

    The generator for each row is seeded from a hash of that row's observation and instruction,
    so results are reproducible and independent of batch composition and worker count.

    Args:
        action_dim: A.
        low: lower bounds, shape (A,).
        high: upper bounds, shape (A,).
        chunk: H, actions per prediction.
        seed: mixed into every per-row seed.
    """

    def __init__(self, action_dim: int, low: np.ndarray, high: np.ndarray, chunk: int = 4, seed: int = 0):
        self.action_dim = int(action_dim)
        self.low = np.asarray(low, dtype=np.float32).reshape(self.action_dim)
        self.high = np.asarray(high, dtype=np.float32).reshape(self.action_dim)
        self.chunk = int(chunk)
        self.seed = int(seed)

    def _row_seed(self, obs: dict[str, np.ndarray], i: int, instruction: str) -> int:
        h = hashlib.blake2b(digest_size=8)
        h.update(self.seed.to_bytes(8, "little", signed=True))
        h.update(instruction.encode())
        for key in sorted(obs):
            h.update(key.encode())
            h.update(np.ascontiguousarray(obs[key][i]).tobytes())
        return int.from_bytes(h.digest(), "little")

    def predict_action(self, obs: dict[str, np.ndarray], instructions: list[str]) -> np.ndarray:
        """Returns float32 (N, H, A)."""
        out = np.empty((len(instructions), self.chunk, self.action_dim), dtype=np.float32)
        for i, instr in enumerate(instructions):
            rng = np.random.default_rng(self._row_seed(obs, i, instr))
            out[i] = rng.uniform(self.low, self.high, size=(self.chunk, self.action_dim))
        return out


@dataclass
class ExpertPolicy:
    """The scripted expert of the task, run inside the worker that owns the env.

    Attributes:
        noise: Gaussian action noise std given to ``envs.make_expert``.
        steps_per_call: env steps a worker runs per round trip (does not change results: the
            expert acts closed-loop at every step).
    """

    noise: float = 0.0
    steps_per_call: int = 8
    runs_in_worker: bool = True
    action_dim: int | None = None


def runs_in_worker(policy: Any) -> bool:
    return bool(getattr(policy, "runs_in_worker", False))


def check_policy(policy: Any, env_spec: dict[str, Any], env_name: str) -> None:
    """Fail before any rollout when the policy cannot drive this env.

    Args:
        policy: the policy to score.
        env_spec: what a worker reported: ``action_dim`` and ``obs_keys``.
        env_name: task or gym id, for the message.

    Raises:
        CheckpointError: the policy's action dimension differs from the env's.
        EnvError: the env lacks an observation key the policy reads.
    """
    if runs_in_worker(policy):
        return
    if not hasattr(policy, "predict_action"):
        raise TypeError(f"policy {type(policy).__name__} has no predict_action(obs_batch, instructions)")
    adim = getattr(policy, "action_dim", None)
    if adim is None or int(adim) != int(env_spec["action_dim"]):
        raise CheckpointError(
            f"policy action_dim={adim} does not match env {env_name!r} action dim {env_spec['action_dim']}: "
            "evaluate on the task the checkpoint was trained for (env.task / env.gym_id)"
        )
    spec = getattr(policy, "obs_spec", None)
    if spec is None:
        return
    wanted = [*getattr(spec, "image_keys", ()), *getattr(spec, "state_keys", ())]
    missing = [k for k in wanted if k not in env_spec["obs_keys"]]
    if missing:
        raise EnvError(
            f"env {env_name!r} observations lack {missing} that the policy reads (env has "
            f"{sorted(env_spec['obs_keys'])}): set env.cameras / env.image_map / env.state_map to provide them"
        )
