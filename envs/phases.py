"""The building blocks of the scripted experts' plans: a :class:`Phase` and the usual sequences.

A plan is a list of phases; each drives the tool-centre point (tcp) to a target computed from the
live sim (privileged state) with a fixed gripper command, and ends when the tcp is within ``tol``
and at least ``min_steps`` have passed. Each task class builds its own plan from these
(``Task.expert_plan`` in envs/tasks.py); :class:`envs.experts.ScriptedExpert` runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

OPEN, CLOSE = -1.0, 1.0  # gripper commands
GRASP_DZ = -0.008  # tcp below the object centre when grasping (fingertips 1.7 cm above the table)
CARRY_Z = 0.14  # travel height with an object (m)

Target = Callable[[Any], np.ndarray]  # env (a TabletopEnv) -> tcp target (3,)


@dataclass
class Phase:
    """Drive the tcp to ``target(env)`` with gripper ``grip`` until within ``tol`` (and ``min_steps``)."""

    target: Target
    grip: float
    tol: float = 0.01
    min_steps: int = 0
    max_speed: float = 1.0  # cap on |action| per axis
    track: bool = True  # re-evaluate the target every step (False: freeze at phase start)
    min_speed: float = 0.0  # floor on the norm of the xyz command until the phase is done


def at(env: Any, slot: str, offset=(0.0, 0.0, 0.0)) -> np.ndarray:
    """The object in ``slot`` plus ``offset`` (m)."""
    return env.sim.pos(slot) + np.asarray(offset)


def xy_at(env: Any, slot: str, z: float) -> np.ndarray:
    """Above (or below) the object in ``slot`` at height ``z``."""
    p = env.sim.pos(slot)
    return np.array([p[0], p[1], z])


def grasp(slot: str) -> list[Phase]:
    """Over the object, down, close, up to the carry height."""
    return [
        Phase(lambda e: at(e, slot, (0, 0, 0.1)), OPEN, tol=0.012),
        Phase(lambda e: at(e, slot, (0, 0, GRASP_DZ)), OPEN, tol=0.006, max_speed=0.7),
        Phase(lambda e: e.sim.tcp(), CLOSE, tol=1.0, min_steps=6, track=False),
        Phase(lambda e: xy_at(e, slot, CARRY_Z), CLOSE, tol=0.015, track=False),
    ]


def release_above(place: Target, tol: float = 0.008, min_speed: float = 0.0) -> list[Phase]:
    """Carry over ``place``, lower onto it, open, rise again."""

    def above(e: Any) -> np.ndarray:
        p = place(e)
        return np.array([p[0], p[1], CARRY_Z])

    return [
        Phase(above, CLOSE, tol=0.012),
        Phase(place, CLOSE, tol=tol, max_speed=0.6, min_speed=min_speed),
        Phase(lambda e: e.sim.tcp(), OPEN, tol=1.0, min_steps=5, track=False),
        Phase(above, OPEN, tol=0.02, track=False),
    ]
