"""robosuite (``env.type: robosuite``): the env rebuilt from a robomimic file's env_args, our experts
through the evaluator, collection into the robomimic layout, and collect -> fine-tune -> evaluate.

These run the real simulator (the ``robosuite`` extra is part of the test set-up, Makefile), at
32 px and with fast rendering so that each costs seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from vla_ft.config import EnvConfig, EvalConfig, load_config
from vla_ft.errors import EnvError

REPO = Path(__file__).resolve().parents[2]
SMALL = ["env.image_size=32", "env.fast_render=true"]

pytestmark = pytest.mark.sim


def _env_cfg(name: str = "Lift", **kw) -> EnvConfig:
    return EnvConfig(
        type="robosuite",
        env_name=name,
        cameras=["agentview", "robot0_eye_in_hand"],
        image_size=32,
        fast_render=True,
        **kw,
    )


def _make(name: str = "Lift", **kw):
    from vla_ft.sim.robosuite_env import RobosuiteEnv, resolve_env_args

    return RobosuiteEnv(resolve_env_args(_env_cfg(name), None), **kw)


def test_observations_use_robomimic_names_and_resets_are_seeded():
    env = _make()
    try:
        obs, info = env.reset(seed=3)
        assert obs["agentview_image"].shape == (32, 32, 3) and obs["agentview_image"].dtype == np.uint8
        assert obs["robot0_eye_in_hand_image"].shape == (32, 32, 3)
        assert obs["robot0_eef_pos"].shape == (3,) and obs["robot0_gripper_qpos"].shape == (2,)
        assert "object" in obs and "object-state" not in obs  # robomimic's name for the object state
        assert info["instruction"] == "lift the red cube" and info["task"] == "Lift"
        first = obs["object"].copy()
        again, _ = env.reset(seed=3)
        other, _ = env.reset(seed=4)
        np.testing.assert_array_equal(again["object"], first)
        assert not np.allclose(other["object"][:3], first[:3])
        assert env.action_space.shape == (7,) and env.max_steps == 150
        with pytest.raises(EnvError, match=r"actions of shape \(7,\)"):
            env.step(np.zeros(4))
    finally:
        env.close()


def test_images_are_upright_like_robomimic_files():
    """robosuite renders bottom row first (OpenGL); robomimic files store images top row first. In
    the agentview the robot stands at the far edge of the table: its (dark) base is in the top half."""
    from vla_ft.sim.robosuite_env import RobosuiteEnv, resolve_env_args

    cfg = _env_cfg()
    cfg.image_size = 64
    env = RobosuiteEnv(resolve_env_args(cfg, None))
    try:
        obs, _ = env.reset(seed=0)
        raw = env.env._get_observations(force_update=True)["agentview_image"]
        np.testing.assert_array_equal(obs["agentview_image"], raw[::-1])
        img = obs["agentview_image"].astype(float).mean(-1)
        assert img[:32].std() > 0 and img[:32].mean() != img[32:].mean()
    finally:
        env.close()


@pytest.mark.parametrize("name,episodes", [("Lift", 4), ("PickPlaceCan", 2)])
def test_scripted_experts_succeed_through_the_evaluator(name, episodes):
    from vla_ft.eval.evaluate import evaluate

    result = evaluate("expert", _env_cfg(name), EvalConfig(episodes=episodes, workers=1, num_envs=1, seed=7))
    assert result.report["manifest"]["tasks"] == [name] or name in json.dumps(result.report["manifest"])
    assert [e.success for e in result.episodes] == [True] * episodes, result.report["per_task"]
    assert all(e.task == name for e in result.episodes)


def test_unknown_env_name_and_missing_env_args_are_one_line():
    from vla_ft.sim.robosuite_env import check_env_name, resolve_env_args

    with pytest.raises(EnvError, match=r"env.env_name='Lfit'.*did you mean 'Lift'"):
        check_env_name(_env_cfg("Lfit"))
    with pytest.raises(EnvError, match="env.env_name is not set"):
        resolve_env_args(EnvConfig(type="robosuite"), None)


def test_missing_robosuite_names_the_install_command(monkeypatch):
    from vla_ft.sim import robosuite_env

    monkeypatch.setitem(sys.modules, "robosuite", None)  # `import robosuite` raises ImportError
    with pytest.raises(EnvError, match=r"pip install --no-deps robosuite==1\.5\.2"):
        robosuite_env.import_robosuite()


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_collect_writes_the_robomimic_layout_and_states_resimulate(tmp_path):
    out = tmp_path / "lift.hdf5"
    _run(
        [str(REPO / "scripts" / "collect_demos.py"), "--cfg", "robosuite_lift.yaml", *SMALL,
         "collect.episodes=3", "collect.workers=1", f"collect.output={out}"],
        tmp_path,
    )  # fmt: skip
    with h5py.File(out, "r") as f:
        args = json.loads(f["data"].attrs["env_args"])
        assert args["env_name"] == "Lift" and args["type"] == 1 and args["fast_render"] is True
        kw = args["env_kwargs"]
        assert kw["camera_names"] == ["agentview", "robot0_eye_in_hand"] and kw["camera_heights"] == 32
        assert kw["controller_configs"]["body_parts"]["right"]["type"] == "OSC_POSE"
        demo = f["data/demo_0"]
        assert demo["actions"].shape[1] == 7
        assert demo.attrs["language_instruction"] == "lift the red cube"
        assert demo.attrs["model_file"].startswith("<mujoco")
        obs = {k: demo["obs"][k][()] for k in ("object", "robot0_eef_pos", "agentview_image")}
        states = demo["states"][()]
        assert obs["agentview_image"].shape[1:] == (32, 32, 3)
    # robomimic's playback: rebuild the env from env_args, restore a recorded state, read the obs
    from vla_ft.sim.robosuite_env import RobosuiteEnv, resolve_env_args

    cfg = EnvConfig(type="robosuite", env_args_from=str(out))
    env = RobosuiteEnv(resolve_env_args(cfg, cfg.env_args_from))
    try:
        env.reset(seed=0)
        t = len(states) // 2
        env.env.sim.set_state_from_flattened(states[t])
        env.env.sim.forward()
        now = env._convert(env.env._get_observations(force_update=True))
        # robosuite samples observables during the control step's physics substeps, so a recorded obs
        # may trail the recorded state by up to one substep (2 ms; < 1 mm at these speeds)
        np.testing.assert_allclose(now["object"][:3], obs["object"][t][:3], atol=1e-3)
        np.testing.assert_allclose(now["robot0_eef_pos"], obs["robot0_eef_pos"][t], atol=1e-3)
    finally:
        env.close()


@pytest.mark.slow
def test_collect_finetune_evaluate_in_robosuite(tmp_path):
    """The shipped robosuite config end to end on a reduced budget: collect 6 Lift demos, fine-tune the
    shipped base (4-D actions) on the 7-D data for 30 steps, score 2 episodes in robosuite."""
    data = tmp_path / "lift.hdf5"
    proc = _run(
        [str(REPO / "scripts" / "finetune.py"), "--cfg", "robosuite_lift.yaml", *SMALL,
         f"data.paths=[{data}]", f"collect.output={data}", "collect.episodes=6",
         "train.steps=30", "train.warmup_steps=5", "train.val_every=30", "train.save_every=30",
         "eval.episodes=2", f"train.out_dir={tmp_path}/runs", "train.run_name=ft",
         "log.wandb=disabled", "log.plots=false", "log.progress=false"],
        REPO,
    )  # fmt: skip
    assert "on Lift" in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "runs" / "ft" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["params"]["trainable_pct"] == 100.0
    report = json.loads(next((tmp_path / "runs" / "ft" / "eval").glob("final_*/eval.json")).read_text())
    assert list(report["per_task"]) == ["Lift"] and len(report["episodes"]) == 2
    assert {e["instruction"] for e in report["episodes"]} == {"lift the red cube"}


def test_shipped_robosuite_configs_load():
    for name, env_name in (("robosuite_lift.yaml", "Lift"), ("robosuite_can.yaml", "PickPlaceCan")):
        cfg = load_config(name)
        assert cfg.env.type == "robosuite" and cfg.env.env_name == env_name
        assert cfg.env.env_args_from == cfg.data.paths[0]
        assert cfg.loss.task_terms.get("grounding", 0) == 0  # robosuite data has no grounding labels
