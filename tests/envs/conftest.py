"""Helpers for the task-suite tests (real MuJoCo, no mocks)."""

import numpy as np
import pytest


def _rollout(env, expert, seed: int) -> tuple[dict, list[np.ndarray]]:
    """Reset with ``seed``, run ``expert`` to the end; return the final info and the actions."""
    obs, info = env.reset(seed=seed)
    expert.reset()
    actions = []
    for _ in range(env.max_steps):
        actions.append(expert.act(obs))
        obs, _, terminated, truncated, info = env.step(actions[-1])
        if terminated or truncated:
            break
    return info, actions


@pytest.fixture
def rollout():
    return _rollout
