"""The generic gymnasium adapter on a real gymnasium MuJoCo env (Reacher-v5 with a success flag)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from vla_ft.config import EnvConfig, EvalConfig
from vla_ft.errors import EnvError
from vla_ft.eval import evaluate
from vla_ft.eval.gym_adapter import GymAdapter

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers inherit sys.path and import it too

pytestmark = pytest.mark.sim

GYM_ID = "gym_test_envs:ReacherGoal-v0"


def _cfg(**kw):
    base = dict(
        type="gym",
        gym_id=GYM_ID,
        image_size=24,
        gym_kwargs={"width": 32, "height": 32},
        image_map={"agentview_image": "render"},
        state_map={"state": "obs", "fingertip": "obs[8:10]"},
        instruction="reach the red dot",
        success_key="success",
    )
    base.update(kw)
    return EnvConfig(**base)


def test_adapter_maps_images_state_and_info():
    env = GymAdapter(_cfg(), max_steps=5)
    try:
        obs, info = env.reset(seed=3)
        assert set(obs) == {"agentview_image", "state", "fingertip"}
        assert obs["agentview_image"].shape == (24, 24, 3) and obs["agentview_image"].dtype == np.uint8
        assert obs["state"].shape == (10,) and obs["state"].dtype == np.float32
        np.testing.assert_array_equal(obs["fingertip"], obs["state"][8:10])
        assert info["instruction"] == "reach the red dot" and info["task"] == GYM_ID
        steps = 0
        truncated = False
        while not truncated:
            obs, _, _, truncated, info = env.step(np.zeros(2, np.float32))
            steps += 1
            assert isinstance(info["is_success"], bool) and info["physics_error"] is False
        assert steps == 5  # eval max_steps overrides the registered 50
        assert env.observation_space["agentview_image"].shape == (24, 24, 3)
    finally:
        env.close()


def test_adapter_flips_images_and_renders_named_cameras():
    plain = GymAdapter(_cfg(image_size=32))
    flipped = GymAdapter(_cfg(image_size=32, flip_images=True))
    try:
        a, _ = plain.reset(seed=1)
        b, _ = flipped.reset(seed=1)
        np.testing.assert_array_equal(a["agentview_image"][::-1, ::-1], b["agentview_image"])  # 180 deg
    finally:
        plain.close()
        flipped.close()
    with pytest.raises(EnvError, match="camera 'corner' not in env"):
        GymAdapter(_cfg(image_map={"agentview_image": "camera:corner"}))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"image_map": {"agentview_image": "pixels"}}, r"env.image_map.agentview_image='pixels'"),
        ({"state_map": {"state": "qpos"}}, r"env.state_map.state: the observation is an array; use 'obs'"),
        ({"state_map": {"state": "obs[1:x]"}}, r"env.state_map: source 'obs\[1:x\]'"),
        ({"gym_id": "NoSuchEnv-v0"}, r"env.gym_id='NoSuchEnv-v0' cannot be made"),
    ],
)
def test_adapter_bad_mapping_is_one_clear_error(kw, match):
    with pytest.raises(EnvError, match=match):
        GymAdapter(_cfg(**kw))


def test_evaluate_on_gym_env_is_reproducible_across_worker_counts(tmp_path):
    cfg = dict(episodes=6, num_envs=3, max_steps=30, video=1)
    one = evaluate("random", _cfg(), EvalConfig(workers=1, **cfg), out_dir=tmp_path / "one")
    two = evaluate("random", _cfg(), EvalConfig(workers=2, **cfg), out_dir=tmp_path / "two")
    assert one.outcomes == two.outcomes
    assert all(e.instruction == "reach the red dot" for e in one.episodes)
    report = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert report["manifest"]["env"]["gym_id"] == GYM_ID
    assert set(report["per_task"]) == {GYM_ID}
    assert one.videos and all("reach_the_red_dot" in v for v in one.videos)


def test_expert_needs_an_env_with_a_scripted_expert():
    with pytest.raises(EnvError, match=r"has no scripted expert: collection and --policy expert run"):
        evaluate("expert", _cfg(), EvalConfig(episodes=1, workers=1))
