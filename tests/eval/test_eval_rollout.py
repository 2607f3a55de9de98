"""The evaluator on the real MuJoCo pick_place task: expert ceiling, random floor, determinism, crashes."""

import json

import numpy as np
import pytest

from vla_ft.config import EnvConfig, EvalConfig
from vla_ft.errors import CheckpointError, ConfigError, EnvError
from vla_ft.eval import evaluate
from vla_ft.eval.worker import CRASH_ENV_VAR, HANG_ENV_VAR

pytestmark = pytest.mark.sim

ENV = EnvConfig(task="pick_place", image_size=32)


class CountingPolicy:
    """Zero actions; records every call so tests can count replanning."""

    def __init__(self, action_dim=4, chunk=4, obs_spec=None):
        self.action_dim, self.chunk, self.obs_spec = action_dim, chunk, obs_spec
        self.calls = []

    def predict_action(self, obs, instructions):
        self.calls.append({k: v.shape for k, v in obs.items()})
        return np.zeros((len(instructions), self.chunk, self.action_dim), np.float32)


def test_expert_scores_at_least_95_percent(tmp_path):
    result = evaluate(
        "expert", ENV, EvalConfig(episodes=20, workers=2, num_envs=4, video=1), out_dir=tmp_path
    )
    assert result.success_rate >= 0.95
    assert len(result.episodes) == 20 and [e.seed for e in result.episodes] == list(range(100_000, 100_020))
    assert all(e.instruction and e.task == "pick_place" for e in result.episodes)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["manifest"]["versions"]["mujoco"] and report["manifest"]["episodes"] == 20
    assert report["manifest"]["max_steps"] > 0  # the task default, as the env applied it
    assert report["overall"]["mean_steps_to_success"] > 0
    assert any("success" in v for v in result.videos) and all(v.endswith(".mp4") for v in result.videos)
    assert "| **all** |" in (tmp_path / "eval.md").read_text()
    # the expert takes the named cube in every episode and never another object; the first step of
    # each event is recorded per episode
    events = report["per_task"]["pick_place"]["events"]
    assert events["grasped"] >= 19 and events["grasped_other"] == 0
    for e in result.episodes:
        if e.success:
            assert 0 < e.events["grasped"] < e.events["over_destination"] <= e.steps
    assert "## Events per task" in (tmp_path / "eval.md").read_text()


def test_random_policy_scores_about_zero():
    result = evaluate("random", ENV, EvalConfig(episodes=6, workers=2, num_envs=6, max_steps=60))
    assert result.success_rate <= 1 / 6
    assert {e.reason for e in result.episodes if not e.success} <= {"timeout", "physics_error"}


def test_same_seed_same_results_and_worker_count_does_not_matter():
    cfg = dict(episodes=6, num_envs=3, max_steps=40, seed=7)
    one = evaluate("random", ENV, EvalConfig(workers=1, **cfg))
    again = evaluate("random", ENV, EvalConfig(workers=1, **cfg))
    two = evaluate("random", ENV, EvalConfig(workers=2, **cfg))
    assert one.outcomes == again.outcomes == two.outcomes
    expert_1 = evaluate("expert", ENV, EvalConfig(episodes=6, num_envs=3, workers=1))
    expert_2 = evaluate("expert", ENV, EvalConfig(episodes=6, num_envs=3, workers=2))
    assert expert_1.outcomes == expert_2.outcomes
    assert [e.instruction for e in expert_1.episodes] == [e.instruction for e in expert_2.episodes]


def test_killed_worker_is_a_failure_and_the_run_completes(monkeypatch):
    monkeypatch.setenv(CRASH_ENV_VAR, "3")  # the worker resetting episode 3 SIGKILLs itself
    result = evaluate("expert", ENV, EvalConfig(episodes=10, workers=2, num_envs=4))
    assert [e.index for e in result.episodes] == list(range(10))
    by_index = {e.index: e for e in result.episodes}
    assert by_index[3].reason == "worker_crash" and not by_index[3].success
    crashed = [e for e in result.episodes if e.reason == "worker_crash"]
    assert 1 <= len(crashed) <= 4  # episode 3 and whatever else that worker had in flight
    assert all(e.success for e in result.episodes if e.reason != "worker_crash")
    assert result.report["timing"]["worker_restarts"] == 1
    assert result.report["overall"]["failure_reasons"] == {"worker_crash": len(crashed)}


def test_silent_worker_times_out_as_a_crash(monkeypatch):
    monkeypatch.setenv(HANG_ENV_VAR, "1")  # the worker resetting episode 1 sleeps for an hour
    result = evaluate("expert", ENV, EvalConfig(episodes=3, workers=1, num_envs=1, worker_timeout_s=3))
    assert [(e.index, e.reason) for e in result.episodes] == [
        (0, "success"),
        (1, "worker_crash"),
        (2, "success"),
    ]


def test_zero_episodes_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.episodes=0"):
        evaluate("expert", ENV, EvalConfig(episodes=0))


def test_action_dim_mismatch_fails_before_any_rollout():
    policy = CountingPolicy(action_dim=7)
    with pytest.raises(CheckpointError, match=r"action_dim=7 does not match env 'pick_place' action dim 4"):
        evaluate(policy, ENV, EvalConfig(episodes=2, workers=1))
    assert policy.calls == []


def test_missing_observation_key_fails_before_any_rollout():
    class Spec:
        image_keys, state_keys, history = ("agentview_image", "top_image"), ("ee_pos",), 1

    policy = CountingPolicy(obs_spec=Spec())
    with pytest.raises(EnvError, match="top_image"):
        evaluate(policy, ENV, EvalConfig(episodes=1, workers=1))
    assert policy.calls == []


@pytest.mark.parametrize("replan_every, ensemble, calls", [(None, None, 5), (2, None, 10), (None, 0.1, 20)])
def test_open_loop_chunks_and_replanning(replan_every, ensemble, calls):
    policy = CountingPolicy(chunk=4)
    cfg = EvalConfig(
        episodes=1, workers=1, max_steps=20, replan_every=replan_every, temporal_ensemble=ensemble
    )
    result = evaluate(policy, ENV, cfg)
    assert result.episodes[0].steps == 20 and result.episodes[0].reason == "timeout"
    assert len(policy.calls) == calls


def test_history_frames_are_stacked_for_the_policy():
    class Spec:
        image_keys, state_keys, history = ("agentview_image",), ("ee_pos",), 2

    policy = CountingPolicy(obs_spec=Spec())
    evaluate(policy, ENV, EvalConfig(episodes=2, workers=1, num_envs=2, max_steps=8))
    assert policy.calls[0]["agentview_image"] == (2, 2, 32, 32, 3)  # (N, T, H, W, 3)
    assert policy.calls[0]["ee_pos"] == (2, 2, 3)


def test_user_errors_in_workers_reach_the_caller_as_themselves():
    with pytest.raises(EnvError, match="no_such_task"):
        evaluate("expert", EnvConfig(task="no_such_task"), EvalConfig(episodes=1, workers=1))

    class NaNPolicy(CountingPolicy):
        def predict_action(self, obs, instructions):
            return np.full((len(instructions), 4, 4), np.nan, np.float32)

    with pytest.raises(EnvError, match="(?i)nan"):
        evaluate(NaNPolicy(), ENV, EvalConfig(episodes=1, workers=1))
