"""Score policies in robosuite, the simulator robomimic and LIBERO data comes from (``env.type: robosuite``).

The env is rebuilt from the description a robomimic HDF5 file carries in ``data.attrs["env_args"]``
(JSON ``{"env_name", "type": 1, "env_version", "env_kwargs"}``; ``env_kwargs`` are the keyword
arguments of ``robosuite.make``), the way robomimic's own tools do it::

    env:
      type: robosuite
      env_name: null            # null: the dataset's env_args.env_name (Lift, PickPlaceCan, ...)
      env_kwargs: {}            # override any field of the dataset's env_args.env_kwargs

Precedence, lowest first: this module's defaults (Panda, its default composite controller with
OSC_POSE for the arm, 20 Hz, offscreen rendering), the dataset's ``env_kwargs``, then
``env.env_kwargs``. Camera names and sizes come from the dataset's ``camera_names`` /
``camera_heights`` / ``camera_widths``; with no dataset (collection) from ``env.cameras`` and
``env.image_size``.

Observations keep robosuite's names, which are the names robomimic files use, except
``object-state`` -> ``object``. Images are flipped to the upright (OpenCV) convention robomimic files
store (robosuite renders in the OpenGL convention, bottom row first, unless its macro says otherwise).
Success is the env's own ``_check_success()``; the episode limit is ``env.max_steps`` or a per-task
default (:data:`DEFAULT_MAX_STEPS`). Seeds: ``reset(seed=s)`` reseeds the generator robosuite's
placement samplers and robot init noise draw from, so an episode is a function of its seed.

robosuite is an optional extra; its dependency ``mink`` (whole-body IK, unused here) pins
``numpy<2``, so the extra installs robosuite's other runtime dependencies and robosuite itself with
``--no-deps`` (docs/robosuite.md). The ``robosuite`` record of vla_ft/sim/env_types.py builds it for
evaluation and collection, with the experts of vla_ft/sim/robosuite_experts.py. This module must not
import torch (it runs in eval workers).
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from vla_ft.errors import EnvError

ROBOSUITE_VERSION = "1.5.2"
INSTALL = f"pip install -e '.[robosuite]' && pip install --no-deps robosuite=={ROBOSUITE_VERSION}"
ROBOSUITE_ENV_TYPE = 1  # robomimic's EnvType.ROBOSUITE_TYPE in env_args["type"]

# Episode limits (20 Hz control steps) when env.max_steps is null, with room for a hesitant policy:
# our experts take ~40 steps on Lift (limit x3.5) and 110-145 on PickPlaceCan (x2).
DEFAULT_MAX_STEPS = {"Lift": 150, "PickPlaceCan": 300}
FALLBACK_MAX_STEPS = 500
# What the demos we collect say, and what evaluation says when the dataset has no instruction.
INSTRUCTIONS = {
    "Lift": "lift the red cube",
    "PickPlaceCan": "pick up the can and put it in the bin at the back right",
}
OBS_RENAME = {"object-state": "object"}  # robosuite observable -> robomimic file key


def import_robosuite() -> Any:
    """``robosuite``, or one EnvError saying how to install it."""
    import sys

    if sys.modules.get("robosuite") is not None:
        return sys.modules["robosuite"]
    # robosuite's import logs advice about optional parts this adapter does not use (a private macro
    # file, robosuite_models, mink's whole-body IK): swallow those lines, keep its later warnings
    import contextlib
    import io
    import logging

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import robosuite
    except ImportError as exc:
        raise EnvError(
            f"env.type=robosuite needs robosuite {ROBOSUITE_VERSION} ({exc}); install it with: {INSTALL}"
        ) from None
    logger = logging.getLogger("robosuite_logs")
    logger.setLevel(logging.WARNING)  # not "Loading controller configuration from ..." per env
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setStream(sys.stderr)
    return robosuite


def dataset_env_args(path: str | Path) -> dict[str, Any] | None:
    """The robosuite ``env_args`` of an HDF5 file, or None (no file, not robomimic/robosuite data)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            raw = f["data"].attrs.get("env_args") if "data" in f else None
    except OSError:
        return None
    if raw is None:
        return None
    try:
        args = json.loads(raw if isinstance(raw, str) else bytes(raw).decode())
    except (ValueError, TypeError):
        raise EnvError(
            f"{path}: data attrs 'env_args' is not valid JSON; fix it or set env.env_name"
        ) from None
    if not isinstance(args, dict) or args.get("type") not in (ROBOSUITE_ENV_TYPE, "robosuite"):
        return None
    return args


def default_kwargs(cameras: list[str], image_size: int) -> dict[str, Any]:
    """``robosuite.make`` keyword arguments of our collection (and robomimic's conventions)."""
    robosuite = import_robosuite()
    from robosuite.controllers import load_composite_controller_config

    return {
        "robots": ["Panda"],
        "controller_configs": load_composite_controller_config(robot="Panda"),
        "has_renderer": False,
        "has_offscreen_renderer": True,
        "ignore_done": True,
        "use_object_obs": True,
        "use_camera_obs": True,
        "camera_depths": False,
        "camera_names": list(cameras),
        "camera_heights": int(image_size),
        "camera_widths": int(image_size),
        "reward_shaping": False,
        "control_freq": 20,
        # reset in place instead of rebuilding the MuJoCo model every episode (seconds each)
        "hard_reset": False,
        "_robosuite_version": robosuite.__version__,
    }


def resolve_env_args(env_cfg: Any, data_path: str | Path | None) -> dict[str, Any]:
    """``{"env_name", "type", "env_version", "env_kwargs"}`` for ``env_cfg`` (see the module docstring)."""
    file_args = dataset_env_args(data_path) if data_path else None
    name = _env_name(env_cfg, file_args, data_path)
    kwargs = default_kwargs(list(env_cfg.cameras), int(env_cfg.image_size))
    version = kwargs.pop("_robosuite_version")
    if file_args:
        kwargs.update(copy.deepcopy(file_args.get("env_kwargs") or {}))
    kwargs.update(copy.deepcopy(dict(env_cfg.env_kwargs)))
    if isinstance(kwargs.get("camera_names"), str):
        kwargs["camera_names"] = [kwargs["camera_names"]]
    fast = (file_args or {}).get("fast_render", False) if env_cfg.fast_render is None else env_cfg.fast_render
    return {
        "env_name": str(name),
        "type": ROBOSUITE_ENV_TYPE,
        "env_version": version,
        "env_kwargs": kwargs,
        "fast_render": bool(fast),
    }


def check_env_name(env_cfg: Any) -> None:
    """robosuite imports and the env name in force is one of its environments (no env is built)."""
    path = env_cfg.env_args_from
    _check_known(import_robosuite(), _env_name(env_cfg, dataset_env_args(path) if path else None, path))


def _env_name(env_cfg: Any, file_args: dict[str, Any] | None, data_path: str | Path | None) -> str:
    """``env.env_name``, else the file's ``env_args.env_name``; one error when neither says."""
    name = env_cfg.env_name or (file_args or {}).get("env_name")
    if not name:
        where = f"{data_path} has no robosuite env_args" if data_path else "no dataset is configured"
        raise EnvError(f"env.env_name is not set and {where}: set env.env_name (e.g. Lift, PickPlaceCan)")
    return str(name)


def _check_known(robosuite: Any, name: str) -> None:
    """One error naming the closest robosuite environment when ``name`` is none of them."""
    if name not in robosuite.ALL_ENVIRONMENTS:
        close = difflib.get_close_matches(name, list(robosuite.ALL_ENVIRONMENTS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise EnvError(
            f"env.env_name={name!r} is not a robosuite environment{hint}; valid: "
            f"{', '.join(sorted(robosuite.ALL_ENVIRONMENTS))}"
        )


def _box(value: np.ndarray) -> gym.spaces.Box:
    if value.dtype == np.uint8:
        return gym.spaces.Box(0, 255, value.shape, np.uint8)
    return gym.spaces.Box(-np.inf, np.inf, value.shape, np.float32)


class RobosuiteEnv(gym.Env):
    """A robosuite env seen through this project's conventions (robomimic observation names).

    Observation: every robosuite observable (``object-state`` renamed ``object``; proprio
    ``robot0_*``; ``<camera>_image`` uint8 (H, W, 3), upright). Info: ``is_success``,
    ``instruction``, ``task`` (the robosuite env name) and ``physics_error`` (False: robosuite
    reports none).

    Args:
        env_args: from :func:`resolve_env_args`.
        max_steps: episode step limit (None: :data:`DEFAULT_MAX_STEPS` for the env).
        render: False builds the env without cameras (state-only; robosuite then runs ~15x faster).
        instruction: the language instruction reported in ``info`` (None: :data:`INSTRUCTIONS`).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        env_args: dict[str, Any],
        max_steps: int | None = None,
        render: bool = True,
        instruction: str | None = None,
    ) -> None:
        robosuite = import_robosuite()
        from robosuite import macros

        self.env_args = copy.deepcopy(env_args)
        self.name = str(env_args["env_name"])
        kwargs = copy.deepcopy(env_args["env_kwargs"])
        if not render:
            kwargs.update(use_camera_obs=False, has_offscreen_renderer=False)
        _check_known(robosuite, self.name)
        try:
            self.env = robosuite.make(self.name, **kwargs)
        except (TypeError, ValueError, AssertionError, KeyError) as exc:
            raise EnvError(
                f"robosuite.make({self.name!r}) failed with the env kwargs in force ({type(exc).__name__}: {exc}); "
                "fix env.env_kwargs or the dataset's env_args"
            ) from None
        self.fast_render = bool(env_args.get("fast_render", False))
        if self.fast_render and render:
            self._fast_render()
        self._flip = macros.IMAGE_CONVENTION == "opengl"
        self.cameras = list(kwargs.get("camera_names") or []) if kwargs.get("use_camera_obs", True) else []
        self.max_steps = int(max_steps or DEFAULT_MAX_STEPS.get(self.name, FALLBACK_MAX_STEPS))
        self.instruction = instruction or INSTRUCTIONS.get(self.name, self.name)
        self.task = self.name
        low, high = self.env.action_spec
        self.action_space = gym.spaces.Box(low.astype(np.float32), high.astype(np.float32))
        self._steps = 0
        obs = self._convert(self.env.reset())
        self.observation_space = gym.spaces.Dict({k: _box(v) for k, v in obs.items()})

    def _fast_render(self) -> None:
        """No shadows, reflections, skybox or multisampling: ~3x the env steps/s with two cameras on a
        CPU (software EGL), at a plainer look. Demos and evaluation must agree on it: collection
        writes it into env_args, and evaluation reads it from there."""
        import mujoco

        ctx = self.env.sim._render_context_offscreen
        if ctx is None:
            return
        for flag in (
            mujoco.mjtRndFlag.mjRND_SHADOW,
            mujoco.mjtRndFlag.mjRND_REFLECTION,
            mujoco.mjtRndFlag.mjRND_SKYBOX,
        ):
            ctx.scn.flags[flag] = 0
        ctx.model.vis.quality.offsamples = 0  # read when the MjrContext is made: make it again
        ctx.con.free()
        ctx._set_mujoco_context_and_buffers()

    @property
    def sim(self) -> Any:
        return self.env.sim

    def _convert(self, raw: dict[str, Any]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for key, value in raw.items():
            value = np.asarray(value)
            if key.endswith("_image"):
                img = value[::-1] if self._flip else value  # OpenGL rows run bottom-up
                out[key] = np.ascontiguousarray(img, dtype=np.uint8)
            elif key.endswith("_depth"):
                continue
            else:
                out[OBS_RENAME.get(key, key)] = value.astype(np.float32).reshape(-1)
        return out

    def _info(self, success: bool) -> dict[str, Any]:
        return {
            "is_success": bool(success),
            "instruction": self.instruction,
            "task": self.task,
            "physics_error": False,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            # robosuite draws object placements and robot init noise from env.rng, a Generator its
            # placement samplers hold by reference: reseed it in place
            self.env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self._steps = 0
        obs = self._convert(self.env.reset())
        return obs, self._info(False)

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != self.action_space.shape:
            raise EnvError(
                f"robosuite {self.name} takes actions of shape {self.action_space.shape}, got {action.shape}"
            )
        if not np.isfinite(action).all():
            raise EnvError(f"robosuite {self.name}: action has NaN/Inf values: {action.tolist()}")
        raw, reward, _, _ = self.env.step(np.clip(action, self.action_space.low, self.action_space.high))
        self._steps += 1
        success = bool(self.env._check_success())
        truncated = (not success) and self._steps >= self.max_steps
        return self._convert(raw), float(reward), success, truncated, self._info(success)

    def get_state(self) -> np.ndarray:
        """MuJoCo state ``[time, qpos, qvel]`` as robomimic stores it in ``data/demo_i/states``."""
        return np.asarray(self.env.sim.get_state().flatten(), dtype=np.float64)

    def demo_attrs(self) -> dict[str, str]:
        """Per-demo HDF5 attributes robomimic writes: ``model_file``, the MuJoCo XML of the episode
        (robomimic's playback resets to it before restoring ``states``)."""
        return {"model_file": self.env.sim.model.get_xml()}

    def target_uv(self) -> dict[str, np.ndarray]:
        """No grounding labels: robosuite data is trained with the label-free recipe."""
        return {}

    def close(self) -> None:
        self.env.close()
