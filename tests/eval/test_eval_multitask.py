"""``env.tasks``: one evaluation over several tasks of the suite, on real MuJoCo envs with the expert."""

import json
import sys

import pytest

from vla_ft.config import EnvConfig, EvalConfig
from vla_ft.errors import EnvError
from vla_ft.eval import evaluate
from vla_ft.eval.run import summary
from vla_ft.eval.worker import CRASH_ENV_VAR

pytestmark = pytest.mark.sim

TASKS = ["reach", "push"]  # the two shortest expert episodes (~20 and ~45 steps)
EVAL = dict(episodes=3, workers=2, num_envs=2)


def _outcome(e, offset=0):
    """What must match between the multi-task evaluation and a single-task one (index shifted)."""
    return (e.index - offset, e.seed, e.task, e.instruction, e.success, e.steps, e.reason, e.events)


def test_each_task_gets_its_episodes_on_the_same_seeds_as_alone(tmp_path):
    both = evaluate("expert", EnvConfig(tasks=TASKS, image_size=16), EvalConfig(video=1, **EVAL), tmp_path)
    alone = {t: evaluate("expert", EnvConfig(task=t, image_size=16), EvalConfig(**EVAL)) for t in TASKS}

    n = EVAL["episodes"]
    assert [e.index for e in both.episodes] == list(range(2 * n))  # unique, task after task
    for k, task in enumerate(TASKS):
        mine = [e for e in both.episodes if e.task == task]
        assert [e.seed for e in mine] == list(range(100_000, 100_000 + n))  # paired layouts
        assert [_outcome(e, k * n) for e in mine] == [_outcome(e) for e in alone[task].episodes]

    report = json.loads((tmp_path / "eval.json").read_text())
    assert list(report["per_task"]) == sorted(TASKS)
    for task in TASKS:
        group = report["per_task"][task]
        assert group["episodes"] == n and group["successes"] == alone[task].report["overall"]["successes"]
        assert group["ci95"] == alone[task].report["overall"]["ci95"]
        assert group["events"] == alone[task].report["per_task"][task]["events"]
    assert report["overall"]["episodes"] == 2 * n and both.success_rate == report["overall"]["success_rate"]
    manifest = report["manifest"]
    assert (
        manifest["tasks"] == TASKS and manifest["episodes"] == n and manifest["seeds"] == [100_000, 100_002]
    )
    assert set(manifest["max_steps"]) == set(TASKS) and manifest["env"]["tasks"] == TASKS
    assert set(report["timing"]["per_task_s"]) == set(TASKS) and report["timing"]["worker_restarts"] == 0

    md = (tmp_path / "eval.md").read_text()
    assert f"{n} episodes of each of 2 tasks (reach, push; {2 * n} in all)" in md
    for task in TASKS:  # a row per task with its Wilson interval, and a table of its events
        g = report["per_task"][task]
        lo, hi = (f"{100 * x:.1f}%" for x in g["ci95"])
        assert f"| {task} | {g['successes']}/{n} | {100 * g['success_rate']:.1f}% | [{lo}, {hi}] |" in md
        assert f"| {task} | " + " | ".join(g["events"]) + " |" in md

    assert len(both.videos) == len(set(both.videos)) >= 2  # each task's own, named by unique index
    lines = summary(both).splitlines()
    assert lines[0].startswith(f"success {report['overall']['successes']}/{2 * n} ")
    assert [line.split(":")[0].strip() for line in lines[1:3]] == sorted(TASKS)  # one line per task
    assert all("95% CI" in line for line in lines[1:3])


def test_a_crashed_worker_loses_only_its_episodes_of_that_task(monkeypatch):
    monkeypatch.setenv(CRASH_ENV_VAR, "3")  # episode 3: push's first (reach has 0..2)
    result = evaluate("expert", EnvConfig(tasks=TASKS, image_size=16), EvalConfig(**EVAL))
    by_index = {e.index: e for e in result.episodes}
    assert sorted(by_index) == list(range(6)) and by_index[3].reason == "worker_crash"
    assert by_index[3].task == "push" and by_index[3].seed == 100_000
    assert all(e.success for e in result.episodes if e.task == "reach")
    assert result.report["timing"]["worker_restarts"] == 1


def test_an_unknown_task_fails_before_any_task_runs(monkeypatch):
    def no_pool(*args, **kwargs):
        raise AssertionError("a pool was started")

    module = sys.modules["vla_ft.eval.evaluate"]  # vla_ft.eval.evaluate is also the function's name
    monkeypatch.setattr(module, "make_pool", no_pool)
    message = (
        r"env\.tasks names 'pussh' \(did you mean 'push'\?\), which is not a task .*valid tasks: pick_place"
    )
    with pytest.raises(EnvError, match=message):
        evaluate("expert", EnvConfig(tasks=["reach", "pussh"]), EvalConfig(episodes=1))
