"""Scripted experts: each task's plan of phases (``Task.expert_plan``, built from envs/phases.py),
run by a proportional tcp controller.

Optional Gaussian action noise (std ``noise``, on xyz only) makes demos more diverse; the plan still
converges because targets are re-read from the sim.
"""

from __future__ import annotations

import numpy as np

from envs.env import TabletopEnv
from envs.phases import Phase

# Proportional gain of the tcp controller: each step commands GAIN * (target - tcp), clipped to the
# phase's max speed. 0.25 makes the commands linear within 8 cm of the target, so demos say how far
# as well as which way; a gain of 1 makes them bang-bang, a step function of "where is the object"
# that behavior cloning learns one sign at a time (see docs/experiments/2026-11-scene-and-expert-changes.md).
GAIN = 0.25


class ScriptedExpert:
    """Scripted policy for ``env`` (a ``TabletopEnv``); call :meth:`reset` after each ``env.reset``.

    Args:
        env: the unwrapped env (privileged access to ``env.sim`` and ``env.goal``).
        noise: std of Gaussian noise added to the xyz action (before clipping).
        seed: seed of the noise generator.
    """

    def __init__(self, env: TabletopEnv, noise: float = 0.0, seed: int | None = None) -> None:
        self.env = env
        self.noise = float(noise)
        self.rng = np.random.default_rng(seed)
        self.plan: list[Phase] = []
        self.phase = 0
        self._steps_in_phase = 0
        self._frozen: np.ndarray | None = None

    def reset(self) -> None:
        """Build the plan for the env's current goal."""
        self.plan = self.env.task.expert_plan(self.env)
        self.phase = 0
        self._steps_in_phase = 0
        self._frozen = None

    def act(self, obs=None) -> np.ndarray:
        """Next action, float32 (4,) in [-1, 1] (``obs`` is unused: the expert reads the sim)."""
        if not self.plan:
            self.reset()
        tcp = self.env.sim.tcp()
        while True:
            ph = self.plan[min(self.phase, len(self.plan) - 1)]
            target = self._target(ph)
            done = np.linalg.norm(target - tcp) < ph.tol and self._steps_in_phase >= ph.min_steps
            if not done or self.phase >= len(self.plan) - 1:
                break
            self.phase += 1
            self._steps_in_phase = 0
            self._frozen = None
        self._steps_in_phase += 1
        delta = np.clip(GAIN * (target - tcp) / self.env.action_scale, -ph.max_speed, ph.max_speed)
        norm = float(np.linalg.norm(delta))
        if 0.0 < norm < ph.min_speed:
            delta = delta * (ph.min_speed / norm)
        if self.noise > 0:
            delta = delta + self.rng.normal(0.0, self.noise, size=3)
        return np.clip(np.append(delta, ph.grip), -1.0, 1.0).astype(np.float32)

    def _target(self, ph: Phase) -> np.ndarray:
        if ph.track:
            return ph.target(self.env)
        if self._frozen is None:
            self._frozen = ph.target(self.env)
        return self._frozen
