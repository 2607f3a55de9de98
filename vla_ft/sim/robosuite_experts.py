"""Scripted experts for robosuite Lift and PickPlaceCan (Panda, OSC_POSE arm controller).

Each expert is a short phase machine on privileged sim state (object and end-effector positions),
like this project's own experts (envs/experts.py): move above the object with the gripper open,
descend, close, lift (Can: carry over its bin, lower, open, rise). The arm command is position-only:
``a[:3] = clip(GAIN * (target - eef) / STEP_M, -1, 1)`` where the OSC_POSE controller maps +-1 to
+-5 cm, ``a[3:6] = 0`` (keep the initial downward orientation) and ``a[6]`` is the gripper (-1 open,
+1 closed). Optional Gaussian noise (std ``noise``) on the xyz command diversifies demos; targets are
re-read from the sim every step, so the plan still converges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

OPEN, CLOSE = -1.0, 1.0
STEP_M = 0.05  # metres of eef motion that a +-1 position command asks for (OSC_POSE delta limits)
GAIN = 0.6  # fraction of the remaining distance commanded per step (below 1: no overshoot)


@dataclass
class Phase:
    """Drive the eef towards ``target(env)`` with gripper ``grip`` until within ``tol`` (and ``min_steps``)."""

    name: str
    target: Any  # callable env -> (3,) position
    grip: float
    tol: float = 0.01
    min_steps: int = 0
    max_steps: int = 120  # a phase that cannot finish gives up: the episode then times out


def _eef(env: Any) -> np.ndarray:
    robot = env.env.robots[0]
    return np.array(env.sim.data.site_xpos[robot.eef_site_id["right"]])


def _body(env: Any, body_id: int) -> np.ndarray:
    return np.array(env.sim.data.body_xpos[body_id])


class RobosuiteExpert:
    """Runs a plan of :class:`Phase` on a :class:`~vla_ft.sim.robosuite_env.RobosuiteEnv`."""

    def __init__(self, env: Any, plan: list[Phase], noise: float = 0.0, seed: int | None = None) -> None:
        self.env = env
        self.plan = plan
        self.noise = float(noise)
        self.rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        self.phase = 0
        self.in_phase = 0

    def act(self, obs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        action = np.zeros(7, dtype=np.float32)
        eef = _eef(self.env)
        while True:
            phase = self.plan[min(self.phase, len(self.plan) - 1)]
            delta = phase.target(self.env) - eef
            finished = (
                self.phase < len(self.plan) - 1
                and self.in_phase >= phase.min_steps
                and (np.linalg.norm(delta) < phase.tol or self.in_phase >= phase.max_steps)
            )
            if not finished:
                break
            self.phase += 1
            self.in_phase = 0
        self.in_phase += 1
        cmd = GAIN * delta / STEP_M
        if self.noise > 0:
            cmd = cmd + self.rng.normal(0.0, self.noise, 3)
        action[:3] = np.clip(cmd, -1.0, 1.0)
        action[6] = phase.grip
        return action


def _lift_plan(env: Any) -> list[Phase]:
    cube = env.env.cube_body_id

    def above(e: Any) -> np.ndarray:
        return _body(e, cube) + [0, 0, 0.08]

    def grasp(e: Any) -> np.ndarray:
        return _body(e, cube) + [0, 0, -0.005]

    def hold(e: Any) -> np.ndarray:
        return _eef(e)

    def up(e: Any) -> np.ndarray:
        return _body(e, cube) * [1, 1, 0] + [0, 0, 1.0]

    return [
        Phase("above", above, OPEN, tol=0.01),
        Phase("descend", grasp, OPEN, tol=0.008),
        Phase("close", hold, CLOSE, tol=1.0, min_steps=8),
        Phase("lift", up, CLOSE, tol=0.01),
    ]


def _can_plan(env: Any) -> list[Phase]:
    inner = env.env
    can = inner.obj_body_id[inner.objects[inner.object_id].name]
    goal = np.array(inner.target_bin_placements[inner.object_id])
    carry_z = inner.bin2_pos[2] + 0.25

    def above(e: Any) -> np.ndarray:
        return _body(e, can) + [0, 0, 0.1]

    def grasp(e: Any) -> np.ndarray:
        return _body(e, can) + [0, 0, 0.0]

    def hold(e: Any) -> np.ndarray:
        return _eef(e)

    def up(e: Any) -> np.ndarray:
        p = _body(e, can)
        return np.array([p[0], p[1], carry_z])

    def over_bin(e: Any) -> np.ndarray:
        return np.array([goal[0], goal[1], carry_z])

    def lower(e: Any) -> np.ndarray:
        return np.array([goal[0], goal[1], inner.bin2_pos[2] + 0.12])

    def rise(e: Any) -> np.ndarray:
        return np.array([goal[0], goal[1], carry_z])

    return [
        Phase("above", above, OPEN, tol=0.01),
        # the controller settles ~6 mm short of the can's centre: a tighter tolerance stalls here
        Phase("descend", grasp, OPEN, tol=0.015, max_steps=40),
        Phase("close", hold, CLOSE, tol=1.0, min_steps=8),
        Phase("lift", up, CLOSE, tol=0.02),
        Phase("carry", over_bin, CLOSE, tol=0.02),
        Phase("lower", lower, CLOSE, tol=0.02),
        Phase("release", hold, OPEN, tol=1.0, min_steps=6),
        Phase("rise", rise, OPEN, tol=0.01),
    ]


PLANS = {"Lift": _lift_plan, "PickPlaceCan": _can_plan}


def make_expert(env: Any, noise: float = 0.0, seed: int | None = None) -> RobosuiteExpert:
    """The scripted expert for a RobosuiteEnv; built after ``reset`` reads the episode's layout."""
    from vla_ft.errors import EnvError

    if env.name not in PLANS:
        raise EnvError(
            f"no scripted expert for robosuite {env.name!r}; experts exist for: {', '.join(PLANS)} "
            "(collect demos with robomimic's tools or score a checkpoint instead)"
        )
    return _LazyPlanExpert(env, noise=noise, seed=seed)


class _LazyPlanExpert(RobosuiteExpert):
    """Builds the plan at ``reset`` (Can's goal bin and object id are known only after an env reset)."""

    def __init__(self, env: Any, noise: float = 0.0, seed: int | None = None) -> None:
        super().__init__(env, [], noise=noise, seed=seed)

    def reset(self) -> None:
        super().reset()
        self.plan = PLANS[self.env.name](self.env)
