"""The env-type registry (vla_ft/sim/env_types.py): one record per ``env.type`` builds, checks, names
and collects its envs; evaluation workers, collection and the checks before training ask it.

The suite and gymnasium records are exercised on real envs; robosuite's when the extra is installed.
"""

from __future__ import annotations

import json
import pickle
import typing
from types import SimpleNamespace

import numpy as np
import pytest

from vla_ft.config import EnvConfig, load_config
from vla_ft.data.collect import EpisodeJob, attempt_seed, episode_seed
from vla_ft.errors import ConfigError, DataError, EnvError
from vla_ft.eval.policies import ExpertPolicy
from vla_ft.eval.worker import EnvHost
from vla_ft.sim.env_types import ENV_TYPES, CollectEnv, CollectTask, check_expert, env_type

CARTPOLE = EnvConfig(type="gym", gym_id="CartPole-v1", state_map={"state": "obs"})


def test_every_env_type_of_the_config_has_one_record():
    literal = typing.get_type_hints(EnvConfig)["type"]
    assert set(ENV_TYPES) == set(typing.get_args(literal))
    for name, kind in ENV_TYPES.items():
        assert kind.name == name
    assert env_type(EnvConfig()) is ENV_TYPES["vla_ft"] and env_type(CARTPOLE) is ENV_TYPES["gym"]
    with pytest.raises(ConfigError, match=r"env.type='mujoco' is not one of vla_ft, gym, robosuite"):
        env_type(SimpleNamespace(type="mujoco"))


def test_names_and_settings_in_messages():
    suite, gym = EnvConfig(task="reach"), CARTPOLE
    robo = EnvConfig(type="robosuite", env_args_from="lift.hdf5")
    assert [env_type(c).config_name(c) for c in (suite, gym, robo)] == ["reach", "CartPole-v1", "robosuite"]
    assert [env_type(c).display_name(c) for c in (suite, gym, robo)] == [
        "reach", "CartPole-v1", "robosuite (lift.hdf5)",
    ]  # fmt: skip
    assert [env_type(c).setting(c) for c in (suite, gym, robo)] == [
        "env.task='reach'", "env.gym_id='CartPole-v1'", "env.type=robosuite (robosuite)",
    ]  # fmt: skip
    named = EnvConfig(type="robosuite", env_name="Lift")
    assert env_type(named).display_name(named) == "Lift" and env_type(named).setting(named).endswith("(Lift)")
    # the env check already resolves and makes a gym id: the cheap check before it is skipped
    assert [env_type(c).checked_by_build for c in (suite, gym, robo)] == [False, True, False]


@pytest.mark.sim
def test_suite_env_and_its_expert():
    cfg = EnvConfig(task="reach", image_size=16, cameras=["agentview"])
    kind = env_type(cfg)
    env = kind.make(cfg, 7, render=False)
    try:
        obs, info = env.reset(seed=3)
        assert info["task"] == "reach" and "agentview_image" not in obs  # render=False: state only
        expert = kind.make_expert(env, noise=0.0, seed=3)
        expert.reset()
        action = expert.act(obs)
        assert np.asarray(action).shape == env.action_space.shape
        env.step(action)
        assert kind.demo_attrs(env) == {}
    finally:
        env.close()
    check_expert(cfg)  # the suite has experts: no error


def test_suite_name_check_names_the_closest_task():
    kind = ENV_TYPES["vla_ft"]
    kind.check_names(EnvConfig(task="pick_place"))
    with pytest.raises(
        EnvError, match=r"env.task='pick_plase' \(did you mean 'pick_place'\?\) is not a task"
    ):
        kind.check_names(EnvConfig(task="pick_plase"))
    with pytest.raises(EnvError, match=r"env.tasks names 'lfit' \(did you mean 'lift'\?\), which is not"):
        kind.check_names(EnvConfig(tasks=["reach", "lfit"]))


def test_suite_collect_plan_and_jobs():
    import envs
    from envs.env import ENV_VERSION

    cfg = load_config(
        "pick_place.yaml",
        [
            "collect.tasks=[push,pick_place]",
            "env.image_size=16",
            "env.cameras=[agentview]",
            "collect.goals=seen",
        ],
    )
    plan = env_type(cfg.env).collect_plan(cfg)
    assert plan.env_args["tasks"] == ["push", "pick_place"] and plan.env_args["env_version"] == ENV_VERSION
    assert plan.env_args["env_kwargs"]["goals"] == "seen"
    envs_of = {
        t: CollectEnv("vla_ft", t, cfg.env.max_steps, 16, ("agentview",), "seen")
        for t in ("push", "pick_place")
    }
    assert plan.tasks == [CollectTask(envs_of[t], envs.list_tasks().index(t)) for t in ("push", "pick_place")]
    task = plan.tasks[1]
    assert attempt_seed(cfg.collect.seed, task.seed_slot, 4) == episode_seed(
        cfg.collect.seed, "pick_place", 4
    )
    job = EpisodeJob(task.env, 5, 0.1, 8)
    again = pickle.loads(pickle.dumps(job))  # what the spawn pool sends
    assert again == job and hash(again.env) == hash(job.env)
    with pytest.raises(ValueError, match="valid tasks: pick_place"):  # before any env is built
        env_type(cfg.env).collect_plan(load_config("pick_place.yaml", ["collect.tasks=[pick_plaec]"]))


def test_gym_type_builds_the_adapter_and_has_no_expert_or_collection_outside_metaworld():
    kind = env_type(CARTPOLE)
    env = kind.make(CARTPOLE, 5, render=False)
    try:
        obs, info = env.reset(seed=0)
        assert obs["state"].shape == (4,) and info["task"] == "CartPole-v1"
    finally:
        env.close()
    assert kind.demo_attrs(env) == {} and env.target_uv() == {} and env.get_state().shape == (0,)
    expected = (
        r"^env.type=gym \(CartPole-v1\) has no scripted expert: collection and --policy expert run "
        r"this suite's, robosuite's or Meta-World's .*record demos with your simulator's tools"
    )
    with pytest.raises(EnvError, match=expected):
        check_expert(CARTPOLE)
    cfg = load_config("pick_place.yaml", ["env.type=gym", "env.gym_id=CartPole-v1"])
    with pytest.raises(DataError, match=expected):
        kind.collect_plan(cfg)


def test_gym_name_check_resolves_the_id_in_a_fresh_interpreter():
    kind = ENV_TYPES["gym"]
    kind.check_names(CARTPOLE)
    with pytest.raises(EnvError, match=r"^env\.gym_id='CartPol-v1': Environment `CartPol` doesn't exist"):
        kind.check_names(EnvConfig(type="gym", gym_id="CartPol-v1"))


@pytest.mark.sim
def test_worker_runs_the_registrys_expert_and_refuses_one_for_gym():
    cfg = EnvConfig(task="reach", image_size=16, cameras=["agentview"])
    host = EnvHost(cfg, 60, [0], {"expert": ExpertPolicy(), "history": 1})
    try:
        [(slot, obs, instruction, task)] = host.handle(("reset", [(0, 0, 11, False)]))
        assert task == "reach" and instruction and "agentview_image" in obs
        [(_, _, done)] = host.handle(("step", [(0, None, 60)]))  # the in-worker expert acts
        assert done is not None and done["success"], done
    finally:
        host.close()
    with pytest.raises(EnvError, match=r"^env.type=gym \(CartPole-v1\) has no scripted expert"):
        EnvHost(CARTPOLE, 5, [0], {"expert": ExpertPolicy(), "history": 1})


@pytest.mark.sim
def test_robosuite_type_builds_checks_and_collects():
    pytest.importorskip("robosuite")
    cfg = EnvConfig(type="robosuite", env_name="Lift", cameras=["agentview"], image_size=32)
    kind = env_type(cfg)
    kind.check_names(cfg)
    with pytest.raises(EnvError, match=r"env.env_name='Lfit'.*did you mean 'Lift'"):
        kind.check_names(EnvConfig(type="robosuite", env_name="Lfit"))
    env = kind.make(cfg, 5, render=False)
    try:
        obs, info = env.reset(seed=2)
        assert info["task"] == "Lift"
        expert = kind.make_expert(env, noise=0.0, seed=2)
        expert.reset()
        env.step(expert.act(obs))
        assert kind.demo_attrs(env)["model_file"].startswith("<mujoco")
    finally:
        env.close()
    run = load_config("robosuite_lift.yaml", ["env.image_size=32"])
    plan = kind.collect_plan(run)
    assert plan.env_args["env_name"] == "Lift"
    assert plan.tasks == [
        CollectTask(CollectEnv("robosuite", "Lift", run.env.max_steps, env_args=json.dumps(plan.env_args)))
    ]
    assert json.loads(plan.tasks[0].env.env_args)["env_kwargs"]["camera_heights"] == 32
