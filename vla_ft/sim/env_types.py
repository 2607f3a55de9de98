"""The env types ``env.type`` chooses from, one record each: how to build, check, name and collect.

* ``vla_ft``: this repository's MuJoCo suite (``envs.make(task)``), its scripted experts, collection.
* ``gym``: any gymnasium id through vla_ft/eval/gym_adapter.py; Meta-World's scripted policies as
  experts (vla_ft/sim/metaworld_experts.py) and collection for Meta-World tasks.
* ``robosuite``: a robosuite env (vla_ft/sim/robosuite_env.py), our experts
  (vla_ft/sim/robosuite_experts.py), collection into the robomimic layout.

Evaluation workers, demo collection, the checks before training and the error messages ask
:func:`env_type` for the record of a config instead of testing the type string::

    kind = env_type(cfg.env)
    env = kind.make(cfg.env, max_steps=None, render=True)
    expert = kind.make_expert(env, noise=0.0, seed=0) if kind.make_expert is not None else None

A new env type is one more :class:`EnvType` subclass in :data:`ENV_TYPES` (and its name in
``EnvConfig.type``). This module must not import torch: evaluation workers import it.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vla_ft.errors import ConfigError, DataError, EnvError, suite_errors


@dataclass(frozen=True)
class CollectEnv:
    """The env a collection worker builds for one task.

    Hashable (a worker keeps one env per value across attempts) and picklable (it travels to the
    spawned collection workers).

    Attributes:
        type: the ``env.type`` whose record builds it.
        task: what the demos are of: this suite's task, or the robosuite env name.
        max_steps: the episode limit (None: the env's own default).
        image_size: camera size in pixels (this suite).
        cameras: camera names (this suite).
        goals: the goal set episodes sample (this suite's ``collect.goals``).
        env_args: the ``env_args`` JSON the env is rebuilt from (robosuite).
    """

    type: str
    task: str
    max_steps: int | None = None
    image_size: int = 64
    cameras: tuple[str, ...] = ("agentview", "wrist")
    goals: str = "all"
    env_args: str | None = None


@dataclass(frozen=True)
class CollectTask:
    """One task of a collection: the env it runs in and where its reset seeds start.

    Attributes:
        env: what the workers build.
        seed_slot: attempt ``i`` resets with ``collect.seed + TASK_SEED_STRIDE * seed_slot + i``
            (vla_ft/data/collect.py): this suite's task index in ``envs.list_tasks()``, 0 for robosuite.
    """

    env: CollectEnv
    seed_slot: int = 0


@dataclass
class CollectPlan:
    """What a collection writes: the file's ``env_args``, the tasks in order, and the observation
    keys the file names as its defaults (``data.attrs["obs_keys"]``; None: the layout's own)."""

    env_args: dict[str, Any]
    tasks: list[CollectTask]
    obs_keys: dict[str, list[str]] | None = None


class EnvType:
    """The record of one ``env.type`` (see the module docstring); subclasses fill it in.

    Attributes:
        name: the ``env.type`` value.
        keys: the ``env.*`` keys that describe this env, named when it cannot be built.
        checked_by_build: the env check (one build in a spawned process, vla_ft/eval/env_check.py)
            already checks the names, so the cheap :meth:`check_names` before it is skipped.
        make_expert: ``(env, noise, seed) -> expert`` with ``reset()`` and ``act(obs)``; None when
            the type has no scripted expert (no ``--policy expert``, no collection).
    """

    name: str = ""
    keys: str = "the env section"
    checked_by_build: bool = False
    make_expert: Callable[..., Any] | None = None

    def make(self, env_cfg: Any, max_steps: int | None, render: bool = True) -> Any:
        """Build the env an ``env`` config section describes, as an evaluation worker does."""
        raise NotImplementedError

    def check_names(self, env_cfg: Any) -> None:
        """The names the config gives exist (tasks, gymnasium id, robosuite env); nothing is built.

        Raises:
            EnvError: one line naming the unknown name (and the closest valid one).
        """
        raise NotImplementedError

    def config_name(self, env_cfg: Any) -> str:
        """The env as the config names it (a task, a gymnasium id, a robosuite env)."""
        raise NotImplementedError

    def display_name(self, env_cfg: Any) -> str:
        """The env in messages and reports (the config's name, or what stands in for it)."""
        return self.config_name(env_cfg)

    def setting(self, env_cfg: Any) -> str:
        """The setting that chose the env, for the start of a message (``env.task='reach'``)."""
        return f"env.type={self.name} ({self.config_name(env_cfg)})"

    def expert_problem(self, env_cfg: Any) -> str | None:
        """Why ``env_cfg`` has no scripted expert (one line), or None when it has one."""
        if self.make_expert is None:
            return (
                f"--policy expert needs a task of this suite; env.type={self.name} "
                f"({self.config_name(env_cfg)}) has none"
            )
        return None

    def demo_attrs(self, env: Any) -> dict[str, Any]:
        """Per-demo HDF5 attributes the env adds to a collected demo (none by default)."""
        return {}

    def collect_plan(self, cfg: Any) -> CollectPlan:
        """The ``env_args`` and tasks a collection of ``cfg`` (a whole :class:`~vla_ft.config.Config`) runs.

        Raises:
            DataError: this type cannot collect (it has no scripted expert).
        """
        raise DataError(
            f"collection runs this suite's, robosuite's or Meta-World's scripted experts; "
            f"env.type={self.name} has none: record demos with your simulator's tools and point "
            "data.paths at them"
        )

    def make_collect_env(self, spec: CollectEnv) -> Any:
        """Build the env a collection worker runs ``spec``'s episodes in."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- this suite (envs/)


class SuiteType(EnvType):
    """``env.type: vla_ft``: this repository's MuJoCo task suite, with scripted experts."""

    name = "vla_ft"
    keys = "env.task / env.cameras / env.image_size"

    def make(self, env_cfg: Any, max_steps: int | None, render: bool = True) -> Any:
        import envs

        return envs.make(
            env_cfg.task,
            image_size=env_cfg.image_size,
            cameras=tuple(env_cfg.cameras),
            max_steps=max_steps,
            render=render,
            goals=env_cfg.goals,
            instructions=env_cfg.instructions,
        )

    @staticmethod
    def make_expert(env: Any, noise: float = 0.0, seed: int | None = None) -> Any:
        import envs

        return envs.make_expert(env, noise=noise, seed=seed)

    def check_names(self, env_cfg: Any) -> None:
        """Every task ``env_cfg`` names (``env.tasks``, else ``env.task``) is one of this suite's and
        can sample ``env.goals``, so that a bad name fails before training, or before the first task
        of a multi-task evaluation runs rather than after it.

        Raises:
            EnvError: one line naming the unknown tasks (with the closest names) and the valid ones,
                or the task without the goal set asked for.
        """
        from envs.env import check_goal_options
        from envs.tasks import list_tasks

        valid = list_tasks()
        names = list(getattr(env_cfg, "tasks", None) or []) or [env_cfg.task]
        unknown = [t for t in names if t not in valid]
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, valid, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            if getattr(env_cfg, "tasks", None):
                which = "is not a task" if len(hints) == 1 else "are not tasks"
                raise EnvError(
                    f"env.tasks names {', '.join(hints)}, which {which} of this suite; valid tasks: "
                    f"{', '.join(valid)}"
                )
            raise EnvError(
                f"env.task={hints[0]} is not a task of this suite; valid tasks: {', '.join(valid)} (or "
                "env.type=gym with env.gym_id)"
            )
        for name in names:
            with suite_errors():
                check_goal_options(name, env_cfg.goals, env_cfg.instructions, prefix="env.")

    def config_name(self, env_cfg: Any) -> str:
        return str(env_cfg.task)

    def setting(self, env_cfg: Any) -> str:
        return f"env.task={env_cfg.task!r}"

    def collect_plan(self, cfg: Any) -> CollectPlan:
        """``collect.tasks`` in order, each on its own seed range; ``env_args`` are the first task's
        env's, with the task list and ``ENV_VERSION`` (what ``warn_stale_env`` compares)."""
        import envs
        from envs.env import ENV_VERSION
        from envs.tasks import get_task

        c, e = cfg.collect, cfg.env
        for task in c.tasks:
            get_task(task)  # unknown names fail before any work, listing valid ones
        env = envs.make(
            c.tasks[0], image_size=e.image_size, cameras=tuple(e.cameras), render=False, goals=c.goals
        )
        args = env.env_args()
        env.close()
        args["tasks"] = list(c.tasks)
        args["env_version"] = ENV_VERSION
        tasks = [
            CollectTask(
                CollectEnv(self.name, task, e.max_steps, e.image_size, tuple(e.cameras), c.goals),
                envs.list_tasks().index(task),
            )
            for task in c.tasks
        ]
        return CollectPlan(args, tasks)

    def make_collect_env(self, spec: CollectEnv) -> Any:
        import envs

        return envs.make(
            spec.task,
            image_size=spec.image_size,
            cameras=tuple(spec.cameras),
            max_steps=spec.max_steps,
            goals=spec.goals,
        )


# --------------------------------------------------------------------------------- gymnasium ids

# Run in a fresh interpreter, as a spawned evaluation worker starts: an id registered in this
# process by an earlier import (metaworld imported by the user's script, say) is not there.
_GYM_PROBE = """
import sys
try:
    import envs  # this suite's vla_ft/... ids, registered as in a worker
except Exception:
    pass
from vla_ft.errors import VLAFTError
from vla_ft.eval.gym_ids import resolve_gym_id
try:
    resolve_gym_id(sys.argv[1])
except VLAFTError as exc:
    print(str(exc).splitlines()[0])
    sys.exit(3)
"""


def check_gym_id(gym_id: str) -> None:
    """A gymnasium id that :func:`gymnasium.make` will find in every evaluation worker: the module
    of its ``module:`` prefix or of its namespace imported as a worker imports it
    (:func:`vla_ft.eval.gym_ids.resolve_gym_id`), checked in a fresh interpreter (about a second).
    Building the env is the env check's (vla_ft/eval/env_check.py)."""
    from vla_ft.config import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run(
        [sys.executable, "-c", _GYM_PROBE, gym_id], capture_output=True, text=True, env=env, timeout=300
    )
    if probe.returncode == 0:
        return
    if probe.returncode == 3:
        raise EnvError(probe.stdout.strip().splitlines()[-1])
    reason = (probe.stderr.strip().splitlines() or ["no output"])[-1][-300:]
    raise EnvError(f"env.gym_id={gym_id!r} could not be checked: {reason}")


# the env section fields a gym collection worker rebuilds its adapter from (and the file records)
_GYM_FIELDS = (
    "gym_id",
    "gym_kwargs",
    "image_map",
    "state_map",
    "flip_images",
    "instruction",
    "success_key",
    "image_size",
)


class GymType(EnvType):
    """``env.type: gym``: any registered gymnasium id through the key-mapping adapter; Meta-World
    tasks have their scripted policies as experts (vla_ft/sim/metaworld_experts.py), so they can be
    collected and scored with ``--policy expert``."""

    name = "gym"
    keys = "env.gym_id / env.gym_kwargs / env.image_map / env.state_map"
    checked_by_build = True  # the env check imports the id's module and makes the env itself

    def make(self, env_cfg: Any, max_steps: int | None, render: bool = True) -> Any:
        from vla_ft.eval.gym_adapter import GymAdapter
        from vla_ft.eval.gym_ids import resolve_gym_id

        resolve_gym_id(env_cfg.gym_id)  # imports the module registering the id (e.g. Meta-World/...)
        return GymAdapter(env_cfg, max_steps=max_steps, render=render)

    def check_names(self, env_cfg: Any) -> None:
        check_gym_id(env_cfg.gym_id)

    def config_name(self, env_cfg: Any) -> str:
        return str(env_cfg.gym_id)

    def setting(self, env_cfg: Any) -> str:
        return f"env.gym_id={env_cfg.gym_id!r}"

    @staticmethod
    def make_expert(env: Any, noise: float = 0.0, seed: int | None = None) -> Any:
        from vla_ft.sim.metaworld_experts import make_expert

        return make_expert(env, noise=noise, seed=seed)

    def expert_problem(self, env_cfg: Any) -> str | None:
        from vla_ft.sim.metaworld_experts import expert_problem

        return expert_problem(env_cfg)

    def collect_plan(self, cfg: Any) -> CollectPlan:
        """One task, the env the config describes, run by its scripted expert (Meta-World's policy
        for ``env.gym_kwargs.env_name``); attempt ``i`` resets with seed ``collect.seed + i``. The
        file's default observation keys are ``env.image_map``'s and ``env.state_map``'s, so the
        dataset reads what evaluation feeds.

        Raises:
            DataError: the env has no scripted expert, or maps no camera.
        """
        problem = self.expert_problem(cfg.env)
        if problem is not None:
            raise DataError(problem)
        if not cfg.env.image_map:
            raise DataError(
                f"env.image_map is empty: name the cameras to record, e.g. "
                f"{{agentview_image: 'camera:corner'}} ({self.setting(cfg.env)})"
            )
        fields = {key: getattr(cfg.env, key) for key in _GYM_FIELDS}
        task = str(fields["gym_kwargs"].get("env_name", cfg.env.gym_id))
        env = CollectEnv(self.name, task, cfg.env.max_steps, cfg.env.image_size, env_args=json.dumps(fields))
        args = {"type": self.name, "env_name": task, "env_kwargs": fields}
        keys = {"image": list(cfg.env.image_map), "state": list(cfg.env.state_map)}
        return CollectPlan(args, [CollectTask(env)], obs_keys=keys)

    def make_collect_env(self, spec: CollectEnv) -> Any:
        from vla_ft.config import EnvConfig

        return self.make(EnvConfig(type="gym", **json.loads(spec.env_args)), max_steps=spec.max_steps)


# ------------------------------------------------------------------------------------- robosuite


class RobosuiteType(EnvType):
    """``env.type: robosuite``: a robosuite env rebuilt from a robomimic file's ``env_args``, with
    our scripted experts for Lift and PickPlaceCan (docs/robosuite.md)."""

    name = "robosuite"
    keys = "env.env_name / env.env_kwargs"

    def make(self, env_cfg: Any, max_steps: int | None, render: bool = True) -> Any:
        from vla_ft.sim.robosuite_env import RobosuiteEnv, resolve_env_args

        args = resolve_env_args(env_cfg, env_cfg.env_args_from)
        return RobosuiteEnv(args, max_steps=max_steps, render=render, instruction=env_cfg.instruction)

    @staticmethod
    def make_expert(env: Any, noise: float = 0.0, seed: int | None = None) -> Any:
        from vla_ft.sim.robosuite_experts import make_expert

        return make_expert(env, noise=noise, seed=seed)

    def check_names(self, env_cfg: Any) -> None:
        from vla_ft.sim.robosuite_env import check_env_name

        check_env_name(env_cfg)

    def config_name(self, env_cfg: Any) -> str:
        return str(getattr(env_cfg, "env_name", None) or "robosuite")

    def display_name(self, env_cfg: Any) -> str:
        return env_cfg.env_name or f"robosuite ({env_cfg.env_args_from})"

    def demo_attrs(self, env: Any) -> dict[str, Any]:
        return env.demo_attrs()

    def collect_plan(self, cfg: Any) -> CollectPlan:
        """One task, the env in force (``env.env_name``, ``env.cameras``, ...): the file being
        written is its dataset, so no file's ``env_args`` are read; attempt ``i`` resets with seed
        ``collect.seed + i``."""
        from vla_ft.sim.robosuite_env import resolve_env_args

        args = resolve_env_args(cfg.env, None)
        env = CollectEnv(self.name, args["env_name"], cfg.env.max_steps, env_args=json.dumps(args))
        return CollectPlan(args, [CollectTask(env)])

    def make_collect_env(self, spec: CollectEnv) -> Any:
        from vla_ft.sim.robosuite_env import RobosuiteEnv

        return RobosuiteEnv(json.loads(spec.env_args), max_steps=spec.max_steps)


ENV_TYPES: dict[str, EnvType] = {kind.name: kind for kind in (SuiteType(), GymType(), RobosuiteType())}


def env_type(env_cfg: Any) -> EnvType:
    """The record of ``env_cfg.type`` (an ``env`` config section, or a :class:`CollectEnv`).

    Raises:
        ConfigError: the type is none of :data:`ENV_TYPES`.
    """
    kind = ENV_TYPES.get(env_cfg.type)
    if kind is None:
        raise ConfigError(f"env.type={env_cfg.type!r} is not one of {', '.join(ENV_TYPES)}")
    return kind


def check_expert(env_cfg: Any) -> None:
    """Raise when ``env_cfg``'s type has no scripted expert (``--policy expert``, in-worker experts).

    Raises:
        EnvError: one line naming the env.
    """
    problem = env_type(env_cfg).expert_problem(env_cfg)
    if problem is not None:
        raise EnvError(problem)
