"""A gymnasium env for the adapter tests: Reacher-v5 with a success flag in ``info``.

Importing this module registers ``ReacherGoal-v0``; the evaluator makes it as
``gym_test_envs:ReacherGoal-v0`` so that spawned workers import (and register) it too, exactly as
a user's own suite would be registered.
"""

import gymnasium as gym

SUCCESS_DIST = 0.05  # fingertip-to-target distance (m) counted as success


class ReacherGoal(gym.Wrapper):
    """Reacher-v5 whose ``info["success"]`` is True within ``SUCCESS_DIST`` of the target."""

    def __init__(self, **kwargs):
        super().__init__(gym.make("Reacher-v5", **kwargs))

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["success"] = bool(-info["reward_dist"] < SUCCESS_DIST)
        return obs, reward, terminated, truncated, info


if "ReacherGoal-v0" not in gym.registry:
    gym.register("ReacherGoal-v0", entry_point=ReacherGoal, max_episode_steps=50)
