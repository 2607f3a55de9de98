"""Building a task's env and its scripted expert by name, and the tasks' gymnasium registration."""

from __future__ import annotations

import gymnasium as gym

from envs.env import TabletopEnv
from envs.experts import ScriptedExpert
from envs.tasks import TASKS, get_task


def gym_id(name: str) -> str:
    """``pick_place`` -> ``vla_ft/PickPlace-v0``."""
    return "vla_ft/" + "".join(p.capitalize() for p in name.split("_")) + "-v0"


def make(task: str, image_size: int = 64, cameras=("agentview", "wrist"), max_steps=None, render=True, **kw):
    """Build the env for ``task`` (no gymnasium wrappers; see ``TabletopEnv`` for kwargs)."""
    get_task(task)
    return TabletopEnv(task, image_size=image_size, cameras=cameras, max_steps=max_steps, render=render, **kw)


def make_expert(env, noise: float = 0.0, seed: int | None = None):
    """The scripted expert for ``env``'s task (privileged state); see ``envs.experts``."""
    return ScriptedExpert(env.unwrapped, noise=noise, seed=seed)


def register_all() -> None:
    """Register every task as ``vla_ft/<CamelName>-v0`` (idempotent)."""
    for name in TASKS:
        if gym_id(name) not in gym.registry:
            gym.register(id=gym_id(name), entry_point="envs.env:TabletopEnv", kwargs={"task": name})
