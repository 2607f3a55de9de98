"""MetaWorld through the generic adapter: seeded episodes, scoring, and demos collected with its
scripted policies (skipped unless `metaworld` is importable).

metaworld 3.1.1 requires mujoco==3.3.0 exactly, which is this project's pin (docs/traps.md).
"""

import json

import h5py
import numpy as np
import pytest

from vla_ft.config import EnvConfig, EvalConfig, load_config
from vla_ft.data.collect import run_collect
from vla_ft.data.reader import scan_file
from vla_ft.errors import EnvError
from vla_ft.eval import evaluate
from vla_ft.eval.gym_adapter import GymAdapter
from vla_ft.eval.worker import _episode_limit
from vla_ft.sim.env_types import check_expert

pytest.importorskip("metaworld")
pytestmark = pytest.mark.sim


def _metaworld(env_name, instruction, **changes):
    fields = dict(
        type="gym",
        gym_id="Meta-World/MT1",
        gym_kwargs={"env_name": env_name, "seed": 0},
        image_size=32,
        image_map={"agentview_image": "camera:corner", "wrist_image": "camera:gripperPOV"},
        state_map={"ee_pos": "obs[0:3]", "gripper": "obs[3:4]"},
        flip_images=True,
        instruction=instruction,
        success_key="success",
    )
    return EnvConfig(**{**fields, **changes})


def _cfg():
    return _metaworld("reach-v3", "reach the goal", gym_id="metaworld:Meta-World/MT1")


def test_metaworld_observations_and_success_flag():
    env = GymAdapter(_cfg(), max_steps=3)
    try:
        obs, info = env.reset(seed=5)
        assert obs["agentview_image"].shape == (32, 32, 3) and obs["ee_pos"].shape == (3,)
        assert info["task"] == "reach-v3" and info["instruction"] == "reach the goal"
        obs, _, _, _, info = env.step(np.zeros(4, np.float32))
        assert info["is_success"] is False  # info["success"] == 0.0
        again, _ = env.reset(seed=5)
        other = GymAdapter(_cfg())
        first, _ = other.reset(seed=5)
        other.close()
        np.testing.assert_array_equal(again["ee_pos"], first["ee_pos"])  # reset(seed) is reproducible
    finally:
        env.close()


def test_metaworld_evaluation_is_reproducible_across_worker_counts():
    cfg = dict(episodes=2, num_envs=2, max_steps=15)
    one = evaluate("random", _cfg(), EvalConfig(workers=1, **cfg))
    two = evaluate("random", _cfg(), EvalConfig(workers=2, **cfg))
    assert one.outcomes == two.outcomes and len(one.outcomes) == 2


def _pick_place(**changes):
    return _metaworld("pick-place-v3", "pick up the puck and place it at the goal", **changes)


def test_reset_seed_gives_the_same_layout_whatever_ran_before():
    # Meta-World's reset ignores its seed and MT1's task-select wrapper draws the layout from the
    # env's unseeded generator: without the adapter's seed() call the layout was random; two envs
    # made with the same gym_kwargs.seed hold the same 50 layouts
    env, fresh = GymAdapter(_pick_place(), render=False), GymAdapter(_pick_place(), render=False)
    try:
        # MT1's registered limit, what evaluation reports (was 10,000)
        assert _episode_limit(env, None) == 500
        env.reset(seed=7)
        env.reset(seed=11)
        again = env.raw_obs.copy()
        fresh.reset(seed=11)
        np.testing.assert_array_equal(again, fresh.raw_obs)  # puck (obs[4:7]) and goal (obs[-3:])
        env.reset(seed=12)
        assert not np.array_equal(env.raw_obs[4:7], again[4:7])  # another seed, another layout
    finally:
        env.close()
        fresh.close()


def test_metaworld_expert_scores_and_unknown_tasks_are_named():
    result = evaluate("expert", _pick_place(), EvalConfig(episodes=2, workers=1, seed=500))
    assert [success for _, success, _, _ in result.outcomes] == [True, True]
    with pytest.raises(EnvError, match=r"env_name='pick-plce-v3' \(did you mean 'pick-place-v3'\?\)"):
        check_expert(_pick_place(gym_kwargs={"env_name": "pick-plce-v3", "seed": 0}))
    with pytest.raises(
        EnvError, match=r"^env.gym_kwargs.seed is not set: Meta-World/MT1 then draws its task"
    ):
        GymAdapter(_pick_place(gym_kwargs={"env_name": "pick-place-v3"}), render=False)


def test_collection_writes_demos_that_end_at_success_and_name_their_keys(tmp_path):
    out = tmp_path / "mw.hdf5"
    overrides = [
        "env.type=gym",
        "env.gym_id=Meta-World/MT1",
        "env.gym_kwargs={env_name: pick-place-v3, seed: 0}",
        "env.image_size=32",
        "env.image_map={agentview_image: 'camera:corner', wrist_image: 'camera:gripperPOV'}",
        "env.state_map={ee_pos: 'obs[0:3]', gripper: 'obs[3:4]'}",
        "env.flip_images=true",
        "env.instruction=pick up the puck",
        "env.success_key=success",
        f"collect.output={out}",
        f"data.paths=[{out}]",
        "collect.episodes=2",
        "collect.workers=1",
        "collect.post_success_steps=3",
    ]
    cfg = load_config("base.yaml", overrides)
    run_collect(cfg)
    with h5py.File(out, "r") as f:
        data = f["data"]
        assert json.loads(data.attrs["obs_keys"]) == {
            "image": ["agentview_image", "wrist_image"],
            "state": ["ee_pos", "gripper"],
        }
        env_args = json.loads(data.attrs["env_args"])
        assert env_args["type"] == "gym" and env_args["env_kwargs"]["gym_kwargs"] == {
            "env_name": "pick-place-v3",
            "seed": 0,
        }
        for name, seed in (("demo_0", 0), ("demo_1", 1)):
            demo = data[name]
            steps = int(demo.attrs["num_samples"])
            # the scripted policy solves pick-place in ~50-60 steps: the demo ends 3 steps past the
            # success, not at MT1's 500-step limit
            assert 20 < steps < 120 and demo.attrs["seed"] == seed and demo.attrs["success"]
            assert demo.attrs["language_instruction"] == "pick up the puck"
            assert demo["obs/agentview_image"].shape == (steps, 32, 32, 3)
            assert demo["obs/ee_pos"].shape == (steps, 3) and demo["obs/gripper"].shape == (steps, 1)
            actions = demo["actions"][:]
            assert actions.shape == (steps, 4) and np.abs(actions).max() <= 1.0
            assert demo["states"].shape[0] == steps and demo["states"].shape[1] > 10  # time, qpos, qvel
    scan = scan_file(str(out), cfg.data)  # the keys the file names, read by default
    assert scan.image_keys == ("agentview_image", "wrist_image") and scan.state_keys == ("ee_pos", "gripper")


def test_the_plain_metaworld_config_collects_fine_tunes_the_base_and_scores(tmp_path):
    # configs/metaworld_pick_place.yaml names only its data and env: the rest is base.yaml's default
    # recipe (the shipped base, full fine-tuning, the label-free task terms)
    from vla_ft.train.finetune import run_finetune

    data = tmp_path / "mw.hdf5"
    overrides = {
        "data.paths": f"[{data}]",
        "collect.output": str(data),
        "collect.episodes": 4,
        "collect.workers": 1,
        "collect.valid_fraction": 0.25,
        "env.image_size": 32,
        "env.max_steps": 100,  # the expert needs ~50-60 steps
        "train.steps": 4,
        "train.warmup_steps": 1,
        "train.batch_size": 8,
        "train.val_every": 2,
        "train.save_every": 4,
        "train.threads": 1,
        "train.out_dir": str(tmp_path / "runs"),
        "eval.episodes": 2,
        "eval.workers": 1,
        "log.wandb": "disabled",
        "log.progress": "false",
        "log.plots": "false",
    }
    cfg = load_config("metaworld_pick_place.yaml", [f"{k}={v}" for k, v in overrides.items()])
    assert cfg.model.pretrained == "checkpoints/base/tiny-suite" and cfg.model.lora.r == 0
    assert cfg.loss.task_terms == {"task_id": 1.0, "progress": 1.0, "waypoint": 5.0}
    result = run_finetune(cfg)  # collects the 4 demos first (data.collect_if_missing)
    assert data.is_file() and (result.run_dir / "last" / "model.safetensors").is_file()
    assert result.eval is not None and result.eval["episodes"] == 2
    report = json.loads(next((result.run_dir / "eval").glob("*/eval.json")).read_text())
    assert report["manifest"]["env"]["gym_kwargs"] == {"env_name": "pick-place-v3", "seed": 0}
