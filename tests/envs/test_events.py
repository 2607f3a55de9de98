"""Task events (``info["events"]``): how far an episode got and whether the wrong object was taken."""

import numpy as np
import pytest

import envs
from envs.scene import CUBES, SLOTS
from envs.tasks import Goal

EXPECTED = {
    "pick_place": ["grasped", "grasped_other", "over_destination"],
    "lift": ["grasped", "grasped_other"],
    "stack": ["grasped", "grasped_other", "over_destination"],
    "push": ["touched", "halfway"],
}


def _first_steps(env, act, seed=None, reset=True):
    """Run to the end; return ({event: first step or None}, final info)."""
    if reset:
        env.reset(seed=seed)
    first: dict[str, int | None] = {}
    info: dict = {}
    for t in range(1, env.max_steps + 1):
        _, _, terminated, truncated, info = env.step(act())
        assert list(info["events"]) == list(first or info["events"])  # same keys every step
        for name, now in info["events"].items():
            if first.get(name) is None:
                first[name] = t if now else None
        if terminated or truncated:
            break
    return first, info


@pytest.mark.parametrize("task", envs.list_tasks())
def test_the_expert_passes_its_events_in_order(task):
    env = envs.make(task, render=False)
    expert = envs.make_expert(env)
    for seed in range(3):
        env.reset(seed=seed)
        expert.reset()
        first, info = _first_steps(env, lambda: expert.act(None), reset=False)
        assert info["is_success"]
        if task == "reach":  # the named object may be a bowl: "near" only then
            assert first["near"] is not None
            continue
        assert list(first) == EXPECTED[task]
        if "grasped" in first:
            assert first["grasped"] is not None and first["grasped_other"] is None
        if "over_destination" in first:
            assert first["grasped"] < first["over_destination"]
        if task == "push":
            assert first["touched"] < first["halfway"]
    env.close()


def test_carrying_another_cube_is_grasped_other_and_never_grasped():
    """The expert planned for another cube than the instructed one: the wrong object in the gripper."""
    env = envs.make("pick_place", render=False)
    expert = envs.make_expert(env)
    for seed in range(4):
        env.reset(seed=seed)
        true_goal = env.unwrapped.goal
        other = next(c for c in CUBES if SLOTS.index(c) != true_goal.src)
        env.unwrapped.goal = Goal(SLOTS.index(other), true_goal.dst, 0, true_goal.template)
        expert.reset()  # plans for the wrong cube
        env.unwrapped.goal = true_goal  # events and success are judged on the instructed one
        first, info = _first_steps(env, lambda: expert.act(None), reset=False)
        assert not info["is_success"]
        assert first["grasped_other"] is not None and first["grasped"] is None
        assert first["over_destination"] is None  # the named cube never moved into the bowl


def test_doing_nothing_reaches_no_event():
    env = envs.make("pick_place", render=False)
    first, info = _first_steps(env, lambda: np.zeros(4, np.float32), seed=0)
    assert not info["is_success"] and first == dict.fromkeys(EXPECTED["pick_place"])
