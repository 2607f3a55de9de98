"""Meta-World's own scripted policies as experts of ``env.type: gym`` (demo collection and
``--policy expert``).

Meta-World ships one hand-written policy per task (``metaworld.policies``, e.g.
``SawyerPickPlaceV3Policy``) that reads the env's 39-D state observation. The expert here reads that
observation from the adapter (:attr:`~vla_ft.eval.gym_adapter.GymAdapter.raw_obs`), not the mapped
images and state a learned policy sees, so it works whatever ``env.image_map`` / ``env.state_map``
say. Which policy: the task the config names, ``env.gym_kwargs.env_name`` (``pick-place-v3``).
Noise (``collect.action_noise``) is Gaussian on every action dimension, clipped to the action space.

No torch import here: collection and evaluation workers import this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vla_ft.errors import EnvError


def _policies() -> dict[str, Any]:
    try:
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError:
        return {}
    return dict(ENV_POLICY_MAP)


def expert_problem(env_cfg: Any) -> str | None:
    """Why ``env_cfg`` (an ``env`` section with ``type: gym``) has no scripted expert; None when it has.

    Only the names are read: nothing is built.
    """
    gym_id = str(env_cfg.gym_id or "")
    if "Meta-World/" not in gym_id:
        return (
            f"env.type=gym ({gym_id}) has no scripted expert: collection and --policy expert run this "
            "suite's, robosuite's or Meta-World's (env.gym_id=Meta-World/MT1); record demos with your "
            "simulator's tools and point data.paths at them"
        )
    name = (env_cfg.gym_kwargs or {}).get("env_name")
    policies = _policies()
    if not policies:
        return "Meta-World's scripted policies need metaworld: pip install -e '.[metaworld]'"
    if name not in policies:
        import difflib

        close = difflib.get_close_matches(str(name), list(policies), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (
            f"env.gym_kwargs.env_name={name!r}{hint} has no Meta-World scripted policy; set it to a "
            f"Meta-World task, e.g. {', '.join(sorted(policies)[:4])}, ..."
        )
    return None


class MetaWorldExpert:
    """A Meta-World scripted policy acting in a :class:`~vla_ft.eval.gym_adapter.GymAdapter`.

    Args:
        env: the adapter (its ``raw_obs`` is what the policy reads; its ``task`` picks the policy).
        noise: Gaussian action noise std (0: the policy as shipped).
        seed: seeds the noise.
    """

    def __init__(self, env: Any, noise: float = 0.0, seed: int | None = None) -> None:
        policies = _policies()
        if env.task not in policies:
            raise EnvError(f"env.gym_kwargs.env_name={env.task!r} has no Meta-World scripted policy")
        self.env = env
        self.policy = policies[env.task]()
        self.noise = float(noise)
        self.rng = np.random.default_rng(seed)
        space = env.action_space
        self.low, self.high = np.asarray(space.low, np.float32), np.asarray(space.high, np.float32)

    def reset(self) -> None:
        """Nothing to reset: the policies are stateless (they read the current observation)."""

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The action for the env's current state (``obs``, the mapped observation, is not read)."""
        action = np.asarray(self.policy.get_action(self.env.raw_obs), dtype=np.float32)
        if self.noise > 0:
            action = action + self.rng.normal(0.0, self.noise, action.shape).astype(np.float32)
        return np.clip(action, self.low, self.high)


def make_expert(env: Any, noise: float = 0.0, seed: int | None = None) -> MetaWorldExpert:
    """The expert for the adapter ``env`` (``EnvType.make_expert``'s signature).

    Raises:
        EnvError: the env is not a Meta-World task with a scripted policy.
    """
    problem = expert_problem(env.cfg)
    if problem is not None:
        raise EnvError(problem)
    return MetaWorldExpert(env, noise=noise, seed=seed)
