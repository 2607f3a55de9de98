"""Score policies on any registered gymnasium env: map its observations to this project's format.

``env.type: gym`` in the config selects this adapter::

    env:
      type: gym
      gym_id: Meta-World/MT1           # "module:Id-v0" imports `module` first (registers the id)
      gym_kwargs: {env_name: reach-v3, camera_name: corner}
      image_map: {agentview_image: render}   # our key -> "render" | "camera:<name>" | obs key
      state_map: {state: "obs[0:4]"}          # our key -> "obs" | "obs[a:b]" | "<key>" | "<key>[a:b]"
      flip_images: true                      # rotate 180 degrees (cameras mounted upside down)
      instruction: reach the goal
      success_key: success                   # info key whose truth value means success

Image sources: ``render`` is ``env.render()`` (the env is made with ``render_mode="rgb_array"``
unless ``gym_kwargs`` says otherwise); ``camera:<name>`` renders a named MuJoCo camera of
``env.unwrapped.model``/``data`` with this adapter's own renderer, with shadows, reflections, skybox
and multisampling off (MetaWorld at 32 px: 360 ms -> 25 ms per frame on a 2-core CPU with EGL); anything else is a key of a dict
observation. Images are resized (bilinear) to ``env.image_size`` when their size differs.

Seeding: ``reset(seed=s)`` gives the same episode whatever ran before it. Meta-World's envs ignore
``reset``'s seed (they are seeded by their own ``seed()`` method) and its task-select wrapper draws
the episode's layout (one of MT1's 50 tasks) from the env's generator before resetting, so a plain
``reset(seed=s)`` gave an unseeded layout. For envs with such a wrapper (found by its
``sample_tasks_on_reset`` attribute) and a ``seed()`` method the adapter calls ``seed(s)`` first.
Which layouts there are (MT1: 50 per task) is drawn when the env is made, from
``gym_kwargs.seed``; without it every process would draw its own, so the adapter requires it.

Collection (vla_ft/data/collect.py) also reads :meth:`GymAdapter.get_state` (the MuJoCo state,
robomimic's ``states``) and :attr:`GymAdapter.raw_obs` (the env's own observation, what a scripted
policy such as Meta-World's reads; vla_ft/sim/metaworld_experts.py).
"""

from __future__ import annotations

import re
from typing import Any

import gymnasium as gym
import numpy as np

from vla_ft.errors import EnvError

_SLICE = re.compile(r"^(?P<key>[^\[\]]+)(\[(?P<a>-?\d*):(?P<b>-?\d*)\])?$")


def _parse_state_source(source: str) -> tuple[str, slice]:
    match = _SLICE.match(source.strip())
    if match is None:
        raise EnvError(f"env.state_map: source {source!r} is not 'key' or 'key[a:b]' (e.g. 'obs[0:3]')")
    a, b = match.group("a"), match.group("b")
    return match.group("key"), slice(int(a) if a else None, int(b) if b else None)


def _box(value: np.ndarray) -> gym.spaces.Box:
    if value.dtype == np.uint8:
        return gym.spaces.Box(0, 255, value.shape, np.uint8)
    return gym.spaces.Box(-np.inf, np.inf, value.shape, np.float32)


class GymAdapter(gym.Env):
    """A gymnasium env seen through the project's observation/info conventions.

    Observation: ``{our_image_key: uint8 (S, S, 3), our_state_key: float32 (D,)}`` with
    ``S = env_cfg.image_size``. Info gains ``is_success`` (bool), ``instruction``, ``task`` and
    ``physics_error`` (False unless the wrapped env reports one).

    Args:
        env_cfg: the ``env`` config section (``type: gym``).
        max_steps: episode step limit (None: the env's registered limit).
        render: False skips every image source (state-only rollouts).
    """

    metadata = {"render_modes": []}

    def __init__(self, env_cfg: Any, max_steps: int | None = None, render: bool = True) -> None:
        self.cfg = env_cfg
        kwargs = dict(env_cfg.gym_kwargs)
        needs_render = render and any(v == "render" for v in env_cfg.image_map.values())
        if needs_render:
            kwargs.setdefault("render_mode", "rgb_array")
        if max_steps is not None:
            kwargs["max_episode_steps"] = max_steps
        try:
            self.env = gym.make(env_cfg.gym_id, **kwargs)
        except gym.error.Error as exc:
            raise EnvError(f"env.gym_id={env_cfg.gym_id!r} cannot be made: {exc}") from exc
        self.image_map = dict(env_cfg.image_map) if render else {}
        self.state_map = {k: _parse_state_source(v) for k, v in env_cfg.state_map.items()}
        self.size = int(env_cfg.image_size)
        self.task = str(kwargs.get("env_name", env_cfg.gym_id))
        self.instruction = env_cfg.instruction or self.task
        self.action_space = self.env.action_space
        # the wrapped id's spec: its max_episode_steps (ours, else the registered limit) is the
        # episode limit evaluation enforces and reports (vla_ft/eval/worker.py)
        self.spec = self.env.spec
        self._renderers: dict[str, Any] = {}
        self._seeds_by_method = _seeded_by_method(self.env)
        if self._seeds_by_method and env_cfg.gym_kwargs.get("seed") is None:
            self.env.close()
            raise EnvError(
                f"env.gym_kwargs.seed is not set: {env_cfg.gym_id} then draws its task layouts at random "
                "in every process, so no episode can be reproduced; set it (e.g. env.gym_kwargs.seed=0; "
                "another seed gives layouts the demos never saw)"
            )
        self.raw_obs: Any = None
        obs, _ = self.reset_raw(seed=0)  # probe: check the key mapping before any rollout
        self.observation_space = gym.spaces.Dict({k: _box(v) for k, v in self._convert(obs).items()})

    # ------------------------------------------------------------------ observations

    def _image(self, our_key: str, source: str, obs: Any) -> np.ndarray:
        if source == "render":
            img = self.env.render()
        elif source.startswith("camera:"):
            img = self._render_camera(source.split(":", 1)[1])
        elif isinstance(obs, dict) and source in obs:
            img = np.asarray(obs[source])
        else:
            keys = sorted(obs) if isinstance(obs, dict) else "(array observation, no keys)"
            raise EnvError(
                f"env.image_map.{our_key}={source!r}: not 'render', 'camera:<name>' or an obs key; "
                f"obs keys: {keys}"
            )
        if img is None or np.ndim(img) != 3:
            raise EnvError(f"env.image_map.{our_key}={source!r} gave no (H, W, 3) image; check render_mode")
        img = np.asarray(img, dtype=np.uint8)
        if self.cfg.flip_images:
            # A camera rolled upside down: rotate 180 degrees. A vertical flip alone would mirror
            # the scene (MetaWorld's corner cameras render identically via mujoco.Renderer, so
            # their images are rolled, not mirrored; a mirror reverses rotation senses).
            img = img[::-1, ::-1]
        if img.shape[:2] != (self.size, self.size):
            from PIL import Image

            img = np.asarray(Image.fromarray(img).resize((self.size, self.size), Image.BILINEAR))
        return np.ascontiguousarray(img)  # (S, S, 3)

    def _render_camera(self, name: str) -> np.ndarray:
        if name not in self._renderers:
            import mujoco

            model = getattr(self.env.unwrapped, "model", None)
            if model is None or mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name) < 0:
                cams = [model.camera(i).name for i in range(model.ncam)] if model is not None else []
                raise EnvError(
                    f"env.image_map: camera {name!r} not in env {self.cfg.gym_id}; cameras: {cams}"
                )
            model.vis.quality.offsamples = 0  # no multisampling (must be set before the GL context)
            renderer = mujoco.Renderer(model, self.size, self.size)
            for flag in (
                mujoco.mjtRndFlag.mjRND_SHADOW,
                mujoco.mjtRndFlag.mjRND_REFLECTION,
                mujoco.mjtRndFlag.mjRND_SKYBOX,
            ):
                renderer.scene.flags[flag] = 0
            self._renderers[name] = renderer
        renderer = self._renderers[name]
        renderer.update_scene(self.env.unwrapped.data, camera=name)
        return renderer.render()

    def _state(self, our_key: str, key: str, sl: slice, obs: Any) -> np.ndarray:
        if isinstance(obs, dict):
            if key not in obs:
                raise EnvError(f"env.state_map.{our_key}: obs key {key!r} not found; obs keys: {sorted(obs)}")
            value = obs[key]
        elif key == "obs":
            value = obs
        else:
            raise EnvError(f"env.state_map.{our_key}: the observation is an array; use 'obs' or 'obs[a:b]'")
        return np.asarray(value, dtype=np.float32).reshape(-1)[sl].copy()

    def _convert(self, obs: Any) -> dict[str, np.ndarray]:
        out = {k: self._image(k, src, obs) for k, src in self.image_map.items()}
        out.update({k: self._state(k, key, sl, obs) for k, (key, sl) in self.state_map.items()})
        return out

    def _info(self, info: dict[str, Any]) -> dict[str, Any]:
        out = dict(info)
        out["is_success"] = bool(info.get(self.cfg.success_key, False))
        out["instruction"] = self.instruction
        out["task"] = self.task
        out["physics_error"] = bool(info.get("physics_error", False))
        return out

    # ------------------------------------------------------------------ gymnasium API

    def reset_raw(self, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        """Reset the wrapped env (seeded through its ``seed()`` where its reset ignores the seed); its
        own observation and info."""
        if seed is not None and self._seeds_by_method:
            self.env.unwrapped.seed(seed)  # Meta-World: reset ignores its seed
            seed = None
        obs, info = self.env.reset(seed=seed, options=options)
        self.raw_obs = obs
        return obs, info

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.reset_raw(seed=seed, options=options)
        return self._convert(obs), self._info(info)

    def step(self, action: np.ndarray):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.raw_obs = obs
        return self._convert(obs), float(reward), bool(terminated), bool(truncated), self._info(info)

    def get_state(self) -> np.ndarray:
        """The flattened MuJoCo state ``[time, qpos, qvel]`` (robomimic's ``states``); empty for an
        env without MuJoCo data."""
        data = getattr(self.env.unwrapped, "data", None)
        if data is None or not hasattr(data, "qpos"):
            return np.zeros(0, dtype=np.float64)
        return np.concatenate([[data.time], data.qpos, data.qvel]).astype(np.float64)

    def target_uv(self) -> dict[str, np.ndarray]:
        """No projected object positions (the ``grounding`` term's labels) from a generic env."""
        return {}

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()
        self.env.close()


def _seeded_by_method(env: gym.Env) -> bool:
    """Whether ``env`` is seeded by its ``seed()`` method, not by ``reset(seed=...)``, and a wrapper
    samples the episode from that generator on reset (Meta-World's ``RandomTaskSelectWrapper`` /
    ``PseudoRandomTaskSelectWrapper``)."""
    if not callable(getattr(env.unwrapped, "seed", None)):
        return False
    while isinstance(env, gym.Wrapper):
        if getattr(env, "sample_tasks_on_reset", False):
            return True
        env = env.env
    return False
