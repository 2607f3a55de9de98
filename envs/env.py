"""``TabletopEnv``: one gymnasium env class for every task of the suite.

Action (float32 (4,), documented in docs/envs.md): ``[dx, dy, dz, gripper]`` in [-1, 1]. The first
three move the hand target by up to ``action_scale`` metres (default 2 cm) per control step relative
to the current tool-centre point, clipped to the workspace box; the gripper maps linearly from
-1 (fully open, 5 cm per finger) to +1 (closed). Values outside [-1, 1] are clipped; NaN/Inf raise
:class:`InvalidActionError`. Control runs at ``control_hz`` (default 20 Hz) with 2 ms physics steps.

``goals`` picks which goals are sampled (``all``; ``seen``: never one of the task's held-out
combinations; ``held_out``: only those; ``seen_sets`` / ``held_out_sets``: the same for the split
that holds color sets out in both orders) and ``instructions`` which wordings (``train``: the templates
demos are collected with; ``paraphrase``: wordings never collected); envs/tasks.py lists both.

Episodes end (``terminated``) on success or on a physics error (MuJoCo's bad-qpos/qvel/qacc
warnings or a non-finite state: ``info["physics_error"] = True``); they are truncated at
``max_steps``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from envs.errors import EnvError, InvalidActionError
from envs.rendering import MultiCameraRenderer, project
from envs.scene import LAYOUT_DIM, WORKSPACE_HI, WORKSPACE_LO, Layout, Sim, sample_layout
from envs.tasks import GOAL_DIM, GOAL_SETS, GOAL_SPLITS, INSTRUCTION_SETS, TASKS, Goal, get_task

# Written into every collected file (data.attrs["env_args"]). 0.2: the hand starts anywhere over the
# table (envs/scene.py HAND_START_LO/HI); files of 0.1 start it near the centre (see
# docs/experiments/2026-11-scene-and-expert-changes.md).
ENV_VERSION = "0.2"
VALID_CAMERAS = ("agentview", "wrist")
FINGER_OPEN = 0.05
_BADQPOS, _BADQVEL, _BADQACC = (
    int(w)
    for w in (
        mujoco.mjtWarning.mjWARN_BADQPOS,
        mujoco.mjtWarning.mjWARN_BADQVEL,
        mujoco.mjtWarning.mjWARN_BADQACC,
    )
)


def check_goal_options(task: str, goals: str, instructions: str, prefix: str = "") -> tuple[str, str]:
    """``(goals, instructions)`` if ``task`` can sample them, else one EnvError naming the value and fix.

    ``prefix`` is put before the option names in the message (``env.`` when they come from a config).
    """
    if goals not in GOAL_SETS:
        raise EnvError(f"{prefix}goals={goals!r} is invalid: use one of {', '.join(GOAL_SETS)}")
    if instructions not in INSTRUCTION_SETS:
        raise EnvError(
            f"{prefix}instructions={instructions!r} is invalid: use one of {', '.join(INSTRUCTION_SETS)}"
        )
    split, held_out = GOAL_SPLITS.get(goals, ("", False))
    if held_out and not TASKS[task].has_split(split):
        with_held_out = ", ".join(name for name, t in TASKS.items() if t.has_split(split))
        raise EnvError(
            f"{prefix}goals={goals!r}: task '{task}' has no held-out combinations (only {with_held_out} "
            f"have); use {prefix}goals=all or {'seen_sets' if split == 'sets' else 'seen'}"
        )
    return goals, instructions


def is_held_out_state(task: str, state: np.ndarray, split: str = "pairs") -> bool:
    """Whether a ``get_state()`` vector of ``task`` (e.g. a demo's ``states[0]``) holds one of the
    task's held-out combinations of ``split`` ("pairs" or "sets"); reads only the goal and the colors
    (no sim is built)."""
    state = np.asarray(state, dtype=np.float64)
    goal = Goal.from_vector(state[:GOAL_DIM])
    layout = Layout.from_vector(state[GOAL_DIM : GOAL_DIM + LAYOUT_DIM])
    return TASKS[task].is_held_out(layout, goal, split)


class TabletopEnv(gym.Env):
    """Language-conditioned tabletop manipulation (see module docstring for the action space).

    Args:
        task: a name from ``envs.list_tasks()``.
        image_size: square camera resolution in pixels.
        cameras: any of ``("agentview", "wrist")``.
        max_steps: episode length limit (None: the task's default).
        render: render camera images into observations (False: proprio only, much faster).
        control_hz: control frequency; physics substeps = 1 / (control_hz * 0.002).
        action_scale: metres moved per unit of the xyz action per control step.
        goals: ``all`` | ``seen`` (no held-out combination) | ``held_out`` (only those) |
            ``seen_sets`` / ``held_out_sets`` (the same for held-out color sets); tasks without
            held-out combinations accept ``all``, ``seen`` and ``seen_sets`` (the same goals).
        instructions: ``train`` (the task's templates) | ``paraphrase`` (its paraphrases).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        task: str = "pick_place",
        image_size: int = 64,
        cameras: tuple[str, ...] | list[str] = VALID_CAMERAS,
        max_steps: int | None = None,
        render: bool = True,
        control_hz: float = 20.0,
        action_scale: float = 0.02,
        render_mode: str | None = None,
        goals: str = "all",
        instructions: str = "train",
    ) -> None:
        self.task = get_task(task)
        self.goals, self.instructions = check_goal_options(self.task.name, goals, instructions)
        self.cameras = tuple(cameras)
        bad = [c for c in self.cameras if c not in VALID_CAMERAS]
        if bad or not self.cameras and render:
            raise EnvError(
                f"cameras={list(cameras)} is invalid: use a non-empty subset of {list(VALID_CAMERAS)}"
            )
        if image_size < 8:
            raise EnvError(f"image_size={image_size} is invalid: use at least 8 px")
        self.image_size = int(image_size)
        self.max_steps = int(max_steps or self.task.max_steps)
        self.control_hz = float(control_hz)
        self.action_scale = float(action_scale)
        self.render_mode = render_mode
        self.sim = Sim()
        self.n_substeps = max(1, int(round(1.0 / (self.control_hz * self.sim.model.opt.timestep))))
        self._renderer = (
            MultiCameraRenderer(self.sim.model, self.image_size, self.cameras) if render else None
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        self.observation_space = self._obs_space(render)
        self.goal: Goal | None = None
        self.instruction = ""
        self._steps = 0

    def _obs_space(self, render: bool) -> gym.spaces.Dict:
        s = self.image_size
        spaces: dict[str, gym.Space] = {}
        if render:
            for cam in self.cameras:
                spaces[f"{cam}_image"] = gym.spaces.Box(0, 255, shape=(s, s, 3), dtype=np.uint8)
        spaces["ee_pos"] = gym.spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
        spaces["gripper_qpos"] = gym.spaces.Box(0.0, FINGER_OPEN, shape=(2,), dtype=np.float32)
        return gym.spaces.Dict(spaces)

    # ----- gymnasium API -----------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Sample a layout and goal from the seed (or restore ``options["state"]``)."""
        super().reset(seed=seed)
        if options and options.get("state") is not None:
            self.reset_to(options["state"])
        else:
            while True:  # tasks may reject a layout (push: no clear corridor; no goal of the set)
                layout = sample_layout(self.np_random)
                goal = self.task.sample(layout, self.np_random, self.goals, self.instructions)
                if goal is not None:
                    break
            self.sim.apply_layout(layout)
            self._set_goal(goal)
        return self._obs(), self._info(False, False)

    def reset_to(self, state: np.ndarray):
        """Restore a state from :meth:`get_state` (goal, colors, poses); returns ``(obs, info)``."""
        state = np.asarray(state, dtype=np.float64)
        expected = GOAL_DIM + self.sim.state_dim
        if state.shape != (expected,):
            raise EnvError(f"state has shape {state.shape}; this env's get_state() gives ({expected},)")
        goal = Goal.from_vector(state[:GOAL_DIM])
        if not 0 <= goal.template < len(self.task.wordings):
            raise EnvError(
                f"state's wording index {goal.template} is out of range: task '{self.task.name}' has "
                f"{len(self.task.wordings)} wordings (was the state recorded by another task?)"
            )
        self.sim.set_state(state[GOAL_DIM:])
        self._set_goal(goal)
        return self._obs(), self._info(False, False)

    def get_state(self) -> np.ndarray:
        """Flat float64 ``[goal (4), layout, mj integration state]``."""
        return np.concatenate([self.goal.to_vector(), self.sim.get_state()])

    def step(self, action):
        action = self._check_action(action)
        d, m = self.sim.data, self.sim.model
        target = np.clip(self.sim.tcp() + action[:3] * self.action_scale, WORKSPACE_LO, WORKSPACE_HI)
        d.mocap_pos[self.sim.mocap_id] = target
        d.ctrl[:] = FINGER_OPEN * (1.0 - action[3]) / 2.0
        warnings_before = self._bad_warnings()
        mujoco.mj_step(m, d, nstep=self.n_substeps)
        self._steps += 1
        # MuJoCo answers a bad qpos/qvel/qacc with a warning and mj_resetData; catch both signs.
        physics_error = self._bad_warnings() > warnings_before or not np.isfinite(d.qvel).all()
        success = (not physics_error) and self.task.success(self.sim, self.sim.layout, self.goal)
        obs = self._obs()
        terminated = success or physics_error
        truncated = (not terminated) and self._steps >= self.max_steps
        return obs, float(success), terminated, truncated, self._info(success, physics_error)

    def target_uv(self) -> dict[str, np.ndarray]:
        """Where the instruction's objects are in each camera image (training labels, not observations).

        Returns:
            ``{"<camera>_image": float32 (2, 2)}``: rows are the named object (``src``) and the
            destination (``dst``: the bowl of pick_place, the lower cube of stack), columns image
            ``(x, y)`` in [-1, 1] (x right, y down; see ``envs.rendering.project``). A row is NaN when
            the instruction names no such object or it is behind the camera; outside [-1, 1] means out
            of view. The collector stores these per frame as ``targets/<camera>_image`` for the
            ``grounding`` loss term (docs/data.md).
        """
        goal, sim = self.goal, self.sim
        points = np.full((2, 3), np.nan)
        points[0] = sim.pos(goal.src_slot)
        if goal.dst >= 0:
            points[1] = sim.pos(goal.dst_slot)
        known = np.isfinite(points[:, 0])
        out = {}
        for cam in self.cameras:
            uv = np.full((2, 2), np.nan)
            uv[known] = project(sim.model, sim.data, cam, points[known])
            out[f"{cam}_image"] = uv.astype(np.float32)
        return out

    def render(self):
        if self._renderer is None or "agentview" not in self.cameras:
            raise EnvError("render() needs render=True and the agentview camera")
        return self._renderer.render(self.sim.data)["agentview"]

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # ----- helpers -----------------------------------------------------------------------
    def _bad_warnings(self) -> int:
        w = self.sim.data.warning
        return w[_BADQPOS].number + w[_BADQVEL].number + w[_BADQACC].number

    def _set_goal(self, goal: Goal) -> None:
        self.goal = goal
        self.instruction = self.task.instruction(self.sim.layout, goal)
        self._steps = 0

    def _check_action(self, action) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (4,):
            raise InvalidActionError(
                f"action has shape {np.shape(action)}: pass 4 values (dx, dy, dz, gripper)"
            )
        if not np.isfinite(a).all():
            raise InvalidActionError(f"action {a.tolist()} contains NaN/Inf: check the policy output")
        return np.clip(a, -1.0, 1.0)

    def _obs(self) -> dict[str, np.ndarray]:
        obs: dict[str, np.ndarray] = {}
        if self._renderer is not None:
            for cam, img in self._renderer.render(self.sim.data).items():
                obs[f"{cam}_image"] = img
        obs["ee_pos"] = self.sim.tcp().astype(np.float32)
        obs["gripper_qpos"] = np.clip(self.sim.fingers(), 0.0, FINGER_OPEN).astype(np.float32)
        return obs

    def _info(self, success: bool, physics_error: bool) -> dict[str, Any]:
        return {
            "is_success": bool(success),
            "instruction": self.instruction,
            "task": self.task.name,
            "physics_error": bool(physics_error),
            # what holds now on the way to success (Task.events): grasped, grasped_other, ...
            "events": self.task.events(self.sim, self.sim.layout, self.goal),
        }

    def env_args(self) -> dict[str, Any]:
        """JSON-able description written into HDF5 ``data.attrs["env_args"]``."""
        return {
            "env_name": self.task.name,
            "type": "vla_ft",
            "env_version": ENV_VERSION,
            "env_kwargs": {
                "task": self.task.name,
                "image_size": self.image_size,
                "cameras": list(self.cameras),
                "max_steps": self.max_steps,
                "control_hz": self.control_hz,
                "action_scale": self.action_scale,
                "goals": self.goals,
                "instructions": self.instructions,
            },
            "state_dim": GOAL_DIM + LAYOUT_DIM + self.sim.state_size,
        }
