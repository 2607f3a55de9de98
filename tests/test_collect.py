"""Demo collection into the robomimic/LIBERO HDF5 layout, read back with plain h5py."""

import json

import h5py
import numpy as np
import pytest

import vla_ft.data.collect as collect
from vla_ft.config import load_config
from vla_ft.data.collect import EpisodeJob
from vla_ft.errors import ConfigError, DataError
from vla_ft.sim.env_types import CollectEnv


def _cfg(tmp_path, *extra):
    out = tmp_path / "demos.hdf5"
    overrides = [f"collect.output={out}", "collect.episodes=3", "env.image_size=32", *extra]
    return load_config("pick_place.yaml", overrides), out


def test_collect_layout_two_tasks_parallel(tmp_path):
    cfg, out = _cfg(
        tmp_path, "collect.tasks=[pick_place,push]", "collect.workers=2", "collect.valid_fraction=0.34"
    )
    assert collect.run_collect(cfg) == out
    assert not out.with_name(out.name + ".tmp").exists()
    with h5py.File(out, "r") as f:
        data = f["data"]
        env_args = json.loads(data.attrs["env_args"])
        problem = json.loads(data.attrs["problem_info"])
        assert env_args["tasks"] == ["pick_place", "push"] and env_args["env_kwargs"]["image_size"] == 32
        assert problem["language_instruction"] == data["demo_0"].attrs["language_instruction"]
        names = sorted(data, key=lambda n: int(n.split("_")[1]))
        assert names == [f"demo_{i}" for i in range(6)]
        total = 0
        for name in names:
            demo = data[name]
            steps = int(demo.attrs["num_samples"])
            total += steps
            assert demo.attrs["task"] in ("pick_place", "push") and demo.attrs["language_instruction"]
            img = demo["obs/agentview_image"]
            assert img.dtype == np.uint8 and img.shape == (steps, 32, 32, 3)
            assert img.chunks == (1, 32, 32, 3) and img.compression == "gzip"
            assert demo["obs/wrist_image"].shape == (steps, 32, 32, 3)
            assert demo["obs/ee_pos"].shape == (steps, 3) and demo["obs/gripper_qpos"].shape == (steps, 2)
            assert demo["actions"].dtype == np.float32 and demo["actions"].shape == (steps, 4)
            assert np.abs(demo["actions"][:]).max() <= 1.0
            assert demo["rewards"].shape == (steps,) and demo["rewards"][-1] == 1.0
            assert (
                demo["dones"].dtype == np.uint8 and demo["dones"][-1] == 1 and demo["dones"][:-1].sum() == 0
            )
            assert demo["states"].dtype == np.float64 and demo["states"].shape[0] == steps
        assert data.attrs["total"] == total
        assert [data[n].attrs["task"] for n in names] == ["pick_place"] * 3 + ["push"] * 3
        train = [n.decode() for n in f["mask/train"][:]]
        valid = [n.decode() for n in f["mask/valid"][:]]
        assert len(valid) == 2 and sorted(train + valid) == sorted(names) and not set(train) & set(valid)


def test_episodes_per_task_sets_a_task_own_count(tmp_path):
    cfg, out = _cfg(
        tmp_path, "collect.tasks=[reach,push]", "collect.episodes=2", "collect.episodes_per_task={push: 3}"
    )
    collect.run_collect(cfg)
    with h5py.File(out, "r") as f:
        tasks = [f["data"][f"demo_{i}"].attrs["task"] for i in range(len(f["data"]))]
    assert tasks == ["reach"] * 2 + ["push"] * 3
    # the first demos of a task are the same as with its default count: the seeds do not move
    cfg, out2 = _cfg(tmp_path / "b", "collect.tasks=[push]", "collect.episodes=3")
    collect.run_collect(cfg)
    with h5py.File(out, "r") as f, h5py.File(out2, "r") as g:
        assert [f["data"][f"demo_{i}"].attrs["seed"] for i in (2, 3, 4)] == [
            g["data"][f"demo_{i}"].attrs["seed"] for i in range(3)
        ]


def test_episodes_per_task_names_only_collected_tasks(tmp_path):
    with pytest.raises(ConfigError, match=r"collect.episodes_per_task.stack.*collect.tasks \(pick_place\)"):
        _cfg(tmp_path, "collect.episodes_per_task={stack: 5}")


def test_collect_is_independent_of_workers(tmp_path):
    files = []
    for workers in (1, 2):
        cfg, out = _cfg(tmp_path / str(workers), f"collect.workers={workers}", "collect.episodes=2")
        files.append(collect.run_collect(cfg))
    with h5py.File(files[0], "r") as a, h5py.File(files[1], "r") as b:
        for name in ("demo_0", "demo_1"):
            assert np.array_equal(a[f"data/{name}/actions"][:], b[f"data/{name}/actions"][:])
            assert a[f"data/{name}"].attrs["seed"] == b[f"data/{name}"].attrs["seed"]


def test_interrupted_collection_leaves_no_file(tmp_path, monkeypatch):
    cfg, out = _cfg(tmp_path, "collect.workers=1")
    real = collect.run_episode
    calls = []

    def flaky(job):
        calls.append(job)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(collect, "run_episode", flaky)
    with pytest.raises(KeyboardInterrupt):
        collect.run_collect(cfg)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_not_enough_successes_is_a_clear_error(tmp_path, monkeypatch):
    cfg, out = _cfg(tmp_path, "collect.workers=1", "collect.episodes=1", "collect.max_attempts_factor=2")
    real = collect.run_episode
    monkeypatch.setattr(collect, "run_episode", lambda job: {**real(job), "success": False})
    with pytest.raises(DataError, match="max_attempts_factor"):
        collect.run_collect(cfg)
    assert not out.exists()


def test_unknown_task_in_collect_lists_valid_names(tmp_path):
    cfg, _ = _cfg(tmp_path, "collect.tasks=[pick_plaec]")
    with pytest.raises(ValueError, match="valid tasks: pick_place"):
        collect.run_collect(cfg)


def test_pool_stops_early_with_thousands_of_attempts_queued(tmp_path):
    """Enough successes long before 6,000 queued attempts run out: the pool stops early and cleanly.

    The early-stop path is where the old ``Pool.terminate`` hung once (collect.py ``_results``).
    """
    cfg, out = _cfg(
        tmp_path, "collect.tasks=[reach]", "collect.workers=2", "collect.episodes=2",
        "collect.max_attempts_factor=3000",
    )  # fmt: skip
    assert collect.run_collect(cfg) == out
    with h5py.File(out, "r") as f:
        assert len(f["data"]) == 2


def test_demos_of_an_older_env_version_get_a_warning(tmp_path, capsys):
    # collect.warn_stale_env (what ensure_data calls): importing vla_ft.train here would pull in
    # triton after this file's in-process EGL renderers, which segfaults (docs/traps.md)
    cfg, out = _cfg(tmp_path, "collect.tasks=[reach]", "collect.workers=1", "collect.episodes=1")
    collect.run_collect(cfg)
    cfg = load_config("pick_place.yaml", [f"data.paths=[{out}]"])
    assert collect.warn_stale_env(cfg.data.paths) == []  # current version: silent
    assert "warning" not in capsys.readouterr().err
    with h5py.File(out, "r+") as f:
        args = json.loads(f["data"].attrs["env_args"])
        f["data"].attrs["env_args"] = json.dumps({**args, "env_version": "0.1"})
    assert collect.warn_stale_env(cfg.data.paths) == [str(out)]
    err = capsys.readouterr().err
    assert f"{out} was collected with env_version 0.1" in err and "delete it to re-collect" in err


def test_post_success_steps_record_the_release_after_the_success_step():
    """pick_place demos end at the success step with 2 open-gripper frames; post_success_steps keeps
    the expert going (gripper open, hand rising) so policies see the release."""
    import envs

    spec = CollectEnv("vla_ft", "pick_place", None, 32, ("agentview",))
    plain, more = (
        collect.run_episode(EpisodeJob(spec, 5, 0.0, 0)),
        collect.run_episode(EpisodeJob(spec, 5, 0.0, 8)),
    )
    assert plain["success"] and more["success"]
    n = len(plain["actions"])
    assert len(more["actions"]) == n + 8
    np.testing.assert_array_equal(more["actions"][:n], plain["actions"][:n])  # same episode up to success
    assert plain["rewards"][-1] == 1.0 and plain["rewards"][:-1].max() == 0.0  # success is the last step
    assert (more["actions"][n - 1 :, 3] == -1.0).all()  # open all through the extra steps
    assert more["obs"]["ee_pos"][-1, 2] > more["obs"]["ee_pos"][n - 1, 2] + 0.02  # the hand rises
    assert more["targets"]["agentview_image"].shape == (n + 8, 2, 2)
    # a failed episode gets no extra steps: an expert that never reaches success within 10 steps
    short = collect.run_episode(
        EpisodeJob(CollectEnv("vla_ft", "pick_place", 10, 32, ("agentview",)), 5, 0.0, 8)
    )
    assert not short["success"] and len(short["actions"]) == 10
    env = envs.make("pick_place", image_size=32, cameras=("agentview",))
    env.reset(seed=5)
    assert plain["instruction"] == env.unwrapped.instruction
    env.close()


@pytest.mark.parametrize("goals, split", [("seen", "pairs"), ("seen_sets", "sets")])
def test_collect_goals_seen_writes_no_held_out_combination(tmp_path, goals, split):
    """collect.goals: seen / seen_sets: the attempts whose seed draws a held-out combination of the
    split with goals=all get a seen goal instead; the file records the goal set, and demos keep the
    training wordings."""
    import envs
    from envs.env import is_held_out_state
    from envs.tasks import TASKS

    episodes = 6
    plain = envs.make("pick_place", render=False)
    held_at_all = [s for s in range(episodes) if TASKS["pick_place"].is_held_out(*_goal_at(plain, s), split)]
    plain.close()
    assert held_at_all  # these seeds would have put a held-out combination into the file
    cfg, out = _cfg(
        tmp_path, f"collect.episodes={episodes}", "collect.workers=1", f"collect.goals={goals}",
        "env.image_size=8", "env.cameras=[agentview]",
    )  # fmt: skip
    collect.run_collect(cfg)
    templates = TASKS["pick_place"].templates
    with h5py.File(out, "r") as f:
        data = f["data"]
        assert json.loads(data.attrs["env_args"])["env_kwargs"]["goals"] == goals
        seeds = sorted(int(d.attrs["seed"]) for d in data.values())
        assert set(held_at_all) <= set(seeds)  # collected, with another goal
        for demo in data.values():
            assert not is_held_out_state("pick_place", demo["states"][0], split)
            assert int(round(demo["states"][0][3])) < len(templates)  # a training wording


def _goal_at(env, seed: int) -> tuple:
    env.reset(seed=seed)
    return env.sim.layout, env.goal
