"""Env contract: registration, determinism, reset_to, images, action checks, physics errors."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import envs
from envs.scene import COLOR_NAMES, CUBES, SLOTS, Layout
from envs.tasks import GOAL_DIM


@pytest.fixture
def env():
    e = envs.make("pick_place", image_size=64)
    yield e
    e.close()


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="pick_place, reach, lift, push, stack") as info:
        envs.make("pick_and_place")
    assert isinstance(info.value, envs.EnvError)


def test_at_least_five_tasks_registered_with_gymnasium():
    assert len(envs.list_tasks()) >= 5
    for task in envs.list_tasks():
        e = gym.make(envs.gym_id(task), image_size=32, cameras=["agentview"])
        obs, info = e.reset(seed=1)
        assert obs["agentview_image"].shape == (32, 32, 3) and info["task"] == task
        obs, reward, terminated, truncated, info = e.step(e.action_space.sample())
        assert set(info) >= {"is_success", "instruction", "task", "physics_error"}
        e.close()
    assert envs.gym_id("pick_place") == "vla_ft/PickPlace-v0"


def test_observation_contract(env):
    obs, info = env.reset(seed=0)
    assert obs["agentview_image"].dtype == np.uint8 and obs["agentview_image"].shape == (64, 64, 3)
    assert obs["wrist_image"].shape == (64, 64, 3)
    assert obs["ee_pos"].dtype == np.float32 and obs["ee_pos"].shape == (3,)
    assert obs["gripper_qpos"].dtype == np.float32 and obs["gripper_qpos"].shape == (2,)
    assert env.observation_space.contains(obs)
    assert info["instruction"] == env.unwrapped.instruction != ""


def test_same_seed_same_bytes_and_trajectory(env):
    other = envs.make("pick_place", image_size=64)
    a, b = env.reset(seed=7)[0], other.reset(seed=7)[0]
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    action = np.array([0.5, -0.3, -0.2, 1.0], dtype=np.float32)
    for _ in range(5):
        a, b = env.step(action)[0], other.step(action)[0]
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    other.close()
    assert env.reset(seed=8)[0]["agentview_image"].tobytes() != b["agentview_image"].tobytes()


def test_reset_to_reproduces_episode(env, rollout):
    expert = envs.make_expert(env)
    env.reset(seed=3)
    state = env.unwrapped.get_state()
    instruction = env.unwrapped.instruction
    _, actions = rollout(env, expert, seed=3)
    env.reset(seed=99)  # something else in between
    obs, info = env.unwrapped.reset_to(state)
    assert info["instruction"] == instruction
    for action in actions:
        obs, _, terminated, truncated, info = env.step(action)
    assert info["is_success"] and terminated
    obs2, _ = env.reset(options={"state": state})
    assert env.unwrapped.get_state().tobytes() == state.tobytes()
    with pytest.raises(envs.EnvError, match="shape"):
        env.unwrapped.reset_to(state[:-1])


def test_images_not_blank_and_right_side_up(env):
    obs, _ = env.reset(seed=0)
    for key in ("agentview_image", "wrist_image"):
        assert obs[key].std() > 10, key
    # Put a red cube far from the camera (world -x): it must appear in the upper half of agentview.
    colors = np.full(len(SLOTS), COLOR_NAMES.index("green"))
    colors[SLOTS.index("cube_0")] = COLOR_NAMES.index("red")
    xy = np.array([[-0.18, 0.0], [0.15, 0.0], [0.15, 0.2], [0.0, 0.25], [0.0, -0.2], [0.05, 0.12]])
    layout = Layout(colors=colors, xy=xy, yaw=np.zeros(len(SLOTS)), hand=np.array([0.1, -0.2, 0.2]))
    env.unwrapped.sim.apply_layout(layout)
    state = env.unwrapped.get_state()
    img = env.unwrapped.reset_to(state)[0]["agentview_image"].astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 80) & (img[..., 2] < 80)
    rows = np.nonzero(red)[0]
    assert len(rows) > 4 and rows.mean() < 32


def test_images_differ_between_colors(env):
    env.reset(seed=0)
    state = env.unwrapped.get_state()
    base = env.unwrapped.reset_to(state)[0]
    k = GOAL_DIM + SLOTS.index(CUBES[0]) * 4  # color entry of cube_0
    state[k] = (state[k] + 1) % len(COLOR_NAMES)
    recolored = env.unwrapped.reset_to(state)[0]
    diff = np.abs(base["agentview_image"].astype(int) - recolored["agentview_image"].astype(int)).sum(-1)
    assert (diff > 60).sum() >= 4  # the cube's pixels changed
    assert (diff > 60).mean() < 0.2  # and not the whole image


def test_nan_action_raises_and_range_is_clipped(env):
    env.reset(seed=0)
    with pytest.raises(envs.InvalidActionError, match="NaN"):
        env.step(np.array([np.nan, 0, 0, 0]))
    with pytest.raises(envs.InvalidActionError, match="4 values"):
        env.step(np.zeros(3))
    state = env.unwrapped.get_state()
    big = env.step(np.array([5.0, -7.0, 3.0, 9.0]))[0]
    env.unwrapped.reset_to(state)
    clipped = env.step(np.array([1.0, -1.0, 1.0, 1.0]))[0]
    assert all(big[k].tobytes() == clipped[k].tobytes() for k in big)


def test_physics_error_ends_episode(env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo appends its warning to ./MUJOCO_LOG.TXT
    env.reset(seed=0)
    env.unwrapped.sim.data.qvel[:] = np.nan  # MuJoCo flags the bad state and resets the data
    obs, reward, terminated, truncated, info = env.step(np.zeros(4))
    assert info["physics_error"] and terminated and not info["is_success"]


def test_render_false_and_camera_subset():
    e = envs.make("lift", render=False)
    assert set(e.reset(seed=0)[0]) == {"ee_pos", "gripper_qpos"}
    e.close()
    e = envs.make("lift", image_size=48, cameras=("wrist",))
    assert e.reset(seed=0)[0]["wrist_image"].shape == (48, 48, 3)
    e.close()
    with pytest.raises(envs.EnvError, match="cameras"):
        envs.make("lift", cameras=("top",))


def test_envs_and_writer_do_not_import_torch():
    code = (
        "import sys, envs, vla_ft.data.writer, vla_ft.data.collect; e = envs.make('pick_place'); "
        "e.reset(seed=0); e.close(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
