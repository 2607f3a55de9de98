"""Held-out goal combinations and paraphrased instructions (the env's `goals` / `instructions` options).

Real envs with ``render=False``: resets only, no physics steps beyond the reset's ``mj_forward``.
"""

import re
import string

import numpy as np
import pytest
from gymnasium.utils.seeding import np_random

import envs
from envs.env import is_held_out_state
from envs.scene import COLOR_NAMES, sample_layout
from envs.tasks import GOAL_DIM, TASKS

SEEDS = range(200)
# the named color and the destination color, read back from the instruction text itself
NAMED_PAIR = re.compile(rf"({'|'.join(COLOR_NAMES)}) cube\b.*\b({'|'.join(COLOR_NAMES)}) (bowl|cube)")


def _env(task: str, **kw):
    return envs.make(task, render=False, **kw)


def _pairs(task: str, goals: str, instructions: str = "train") -> list[tuple[str, str]]:
    """(named color, destination color) of each seed's instruction."""
    env = _env(task, goals=goals, instructions=instructions)
    pairs = []
    t = TASKS[task]
    for seed in SEEDS:
        _, info = env.reset(seed=seed)
        match = NAMED_PAIR.search(info["instruction"])
        assert match, info["instruction"]
        pairs.append(match.group(1, 2))
        assert t.is_held_out(env.sim.layout, env.goal) == (pairs[-1] in t.held_out)
        assert t.is_held_out(env.sim.layout, env.goal, "sets") == (frozenset(pairs[-1]) in t.held_out_sets)
    env.close()
    return pairs


@pytest.mark.parametrize("task, n_pairs", [("pick_place", 16), ("stack", 12)])
def test_seen_and_held_out_goals_never_cross(task, n_pairs):
    held_out = TASKS[task].held_out
    assert len(held_out) == 4
    # Latin-square-like: every color once as the named color and once as the destination
    assert sorted(a for a, _ in held_out) == sorted(b for _, b in held_out) == sorted(COLOR_NAMES)
    if task == "stack":
        assert all(a != b for a, b in held_out)
    seen = _pairs(task, "seen")
    only = _pairs(task, "held_out")
    assert not set(seen) & held_out and set(only) <= held_out
    assert set(only) == held_out and len(set(seen)) == n_pairs - 4  # every pair of each set occurs
    everything = _pairs(task, "all")
    assert 0.15 < np.mean([p in held_out for p in everything]) < 0.45  # 1/4 (pick_place), 1/3 (stack)


@pytest.mark.parametrize("task, n_pairs", [("pick_place", 16), ("stack", 12)])
def test_held_out_color_sets_are_never_named_together_in_seen_goals(task, n_pairs):
    sets = TASKS[task].held_out_sets
    # two sets that together name every color once: each color keeps partners in the demos
    assert len(sets) == 2 and sorted(c for s in sets for c in s) == sorted(COLOR_NAMES)
    both_orders = {(a, b) for s in sets for a in s for b in s - {a}}
    seen = _pairs(task, "seen_sets")
    only = _pairs(task, "held_out_sets")
    assert not set(seen) & both_orders and set(only) == both_orders  # both orders occur, and only they
    assert len(set(seen)) == n_pairs - 4  # every other pair does
    for color in COLOR_NAMES:  # each color is still named, and still a destination, in seen goals
        assert sum(a == color for a, _ in set(seen)) >= 2 and sum(b == color for _, b in set(seen)) >= 2
    everything = _pairs(task, "all")
    assert 0.15 < np.mean([p in both_orders for p in everything]) < 0.45  # 1/4 (pick_place), 1/3 (stack)


def test_pick_place_and_stack_hold_out_different_color_pairs():
    assert not TASKS["pick_place"].held_out & TASKS["stack"].held_out
    assert ("red", "green") in TASKS["pick_place"].held_out and ("red", "yellow") in TASKS["stack"].held_out
    assert not TASKS["pick_place"].held_out_sets & TASKS["stack"].held_out_sets


def test_goal_sets_are_deterministic_per_seed():
    for goals in ("all", "seen", "held_out", "seen_sets", "held_out_sets"):
        a, b = _env("pick_place", goals=goals), _env("pick_place", goals=goals)
        for seed in (0, 5, 17):
            a.reset(seed=seed)
            b.reset(seed=99)  # another episode in between
            b.reset(seed=seed)
            assert a.get_state().tobytes() == b.get_state().tobytes(), (goals, seed)
        a.close()
        b.close()


def test_default_options_draw_the_episodes_of_before():
    """goals=all, instructions=train: the layout and goal that sample_layout + sample_goal give for the
    seed's generator, so demo files and evaluation seeds keep their episodes."""
    env, task = _env("pick_place"), TASKS["pick_place"]
    for seed in range(20):
        env.reset(seed=seed)
        rng, _ = np_random(seed)
        layout = sample_layout(rng)
        assert env.goal == task.sample_goal(layout, rng)
        assert np.array_equal(env.sim.layout.to_vector(), layout.to_vector())
    env.close()


@pytest.mark.parametrize("task", list(TASKS))
def test_paraphrases_never_give_a_training_instruction(task):
    t = TASKS[task]
    fields = {name for w in t.templates for _, name, _, _ in string.Formatter().parse(w) if name}
    assert len(t.paraphrases) >= 3 and not set(t.paraphrases) & set(t.templates)
    for p in t.paraphrases:  # the same placeholders: the paraphrase names what the template names
        assert {name for _, name, _, _ in string.Formatter().parse(p) if name} == fields, p
    train, para = _env(task), _env(task, instructions="paraphrase")
    used = set()
    for seed in range(60):
        _, info_train = train.reset(seed=seed)
        _, info = para.reset(seed=seed)
        goal = para.goal
        assert goal.template >= len(t.templates)
        used.add(goal.template)
        as_trained = {
            t.instruction(para.sim.layout, type(goal)(goal.src, goal.dst, goal.aux, k))
            for k in range(len(t.templates))
        }
        assert info["instruction"] not in as_trained and info_train["instruction"] in as_trained
        # the same layout and goal as the training wording's episode: only the words differ
        a, b = train.get_state(), para.get_state()
        assert np.array_equal(a[: GOAL_DIM - 1], b[: GOAL_DIM - 1]) and np.array_equal(
            a[GOAL_DIM:], b[GOAL_DIM:]
        )
    assert used == set(range(len(t.templates), len(t.wordings)))  # every paraphrase is drawn
    train.close()
    para.close()


def test_state_round_trip_restores_a_paraphrase_and_a_held_out_goal():
    para = _env("pick_place", goals="held_out", instructions="paraphrase")
    _, info = para.reset(seed=3)
    state = para.get_state()
    assert is_held_out_state("pick_place", state)
    plain = _env("pick_place", goals="seen")  # the state wins over the env's sampling options
    _, restored = plain.reset_to(state)
    assert restored["instruction"] == info["instruction"] and plain.goal == para.goal
    assert plain.get_state().tobytes() == state.tobytes()
    plain.reset(seed=3)
    assert not is_held_out_state("pick_place", plain.get_state())
    sets = _env("pick_place", goals="held_out_sets")
    sets.reset(seed=3)
    assert is_held_out_state("pick_place", sets.get_state(), "sets")
    sets.close()
    bad = state.copy()
    bad[GOAL_DIM - 1] = len(TASKS["pick_place"].wordings)
    with pytest.raises(envs.EnvError, match="wording index 7 is out of range: task 'pick_place' has 7"):
        plain.reset_to(bad)
    para.close()
    plain.close()


@pytest.mark.parametrize(
    "task, kwargs, message",
    [
        ("reach", {"goals": "held_out"}, "goals='held_out': task 'reach' has no held-out combinations"),
        ("push", {"goals": "held_out"}, "only pick_place, stack have"),
        (
            "lift",
            {"goals": "held_out_sets"},
            "goals='held_out_sets': task 'lift' has no held-out combinations",
        ),
        (
            "pick_place",
            {"goals": "unseen"},
            "goals='unseen' is invalid: use one of all, seen, held_out, seen_sets, held_out_sets",
        ),
        (
            "pick_place",
            {"instructions": "para"},
            "instructions='para' is invalid: use one of train, paraphrase",
        ),
    ],
)
def test_bad_goal_options_are_one_env_error(task, kwargs, message):
    with pytest.raises(envs.EnvError, match=re.escape(message)):
        _env(task, **kwargs)


@pytest.mark.parametrize("goals", ["seen", "seen_sets"])
def test_tasks_without_held_out_combinations_accept_seen_and_paraphrases(goals):
    env = _env("reach", goals=goals, instructions="paraphrase")
    _, info = env.reset(seed=0)
    assert env.goal.template >= len(TASKS["reach"].templates)
    assert any(info["instruction"].startswith(p.split("{")[0]) for p in TASKS["reach"].paraphrases)
    kwargs = env.env_args()["env_kwargs"]  # written into collected files
    assert (kwargs["goals"], kwargs["instructions"]) == (goals, "paraphrase")
    env.close()


def test_gymnasium_make_passes_the_options():
    import gymnasium as gym

    env = gym.make(envs.gym_id("stack"), render=False, goals="held_out", instructions="paraphrase")
    _, info = env.reset(seed=1)
    u = env.unwrapped
    assert TASKS["stack"].is_held_out(u.sim.layout, u.goal) and u.goal.template >= 3
    assert info["instruction"] == TASKS["stack"].instruction(u.sim.layout, u.goal)
    env.close()
