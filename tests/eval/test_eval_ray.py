"""``eval.backend: ray`` on the real MuJoCo pick_place task, on a local Ray with 2 actors.

The same episodes as the local pool, a killed or silent actor as ``worker_crash`` with its node, and
the errors for a missing Ray or an actor no node can hold. One local Ray serves the module: the
first evaluation starts it, as an evaluation without a running Ray does, and the later ones reuse it.
"""

import sys

import pytest

from vla_ft.config import EnvConfig, EvalConfig
from vla_ft.errors import ConfigError, EnvError
from vla_ft.eval import evaluate
from vla_ft.eval.worker import CRASH_ENV_VAR, HANG_ENV_VAR

pytestmark = pytest.mark.sim

ENV = EnvConfig(task="pick_place", image_size=32)


def _ray():
    return pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def ray_session():
    ray = _ray()
    from vla_ft.eval.ray_pool import connect

    connect(None, 2)  # the Ray the first test's evaluation started, or a new one like it
    yield ray
    ray.shutdown()


def _events(result):
    return [(e.instruction, e.events) for e in result.episodes]


def test_missing_ray_is_one_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(ConfigError, match=r"eval.backend=ray needs Ray.*pip install -e '\.\[ray\]'"):
        EvalConfig(backend="ray")
    from vla_ft.eval.ray_pool import import_ray

    with pytest.raises(ConfigError, match=r"pip install -e '\.\[ray\]'"):
        import_ray()
    EvalConfig(backend="local")  # the local backend never needs it


def test_bad_ray_keys_are_config_errors():
    with pytest.raises(ConfigError, match="eval.ray_num_cpus=0"):
        EvalConfig(ray_num_cpus=0)
    with pytest.raises(ConfigError, match="eval.ray_num_gpus=-1"):
        EvalConfig(ray_num_gpus=-1)
    with pytest.raises(ConfigError, match="eval.backend='rey'"):
        EvalConfig(backend="rey")


def test_an_address_nothing_answers_at_fails_at_once():
    _ray()
    from vla_ft.eval.ray_pool import _check_reachable

    with pytest.raises(EnvError, match=r"cannot join .*'127.0.0.1:1'.*nothing answers.*RAY_AUTH_MODE=token"):
        _check_reachable("127.0.0.1:1", "cannot join '127.0.0.1:1': {}. RAY_AUTH_MODE=token")
    _check_reachable("auto", "{}")  # left to Ray


def test_expert_on_its_own_local_ray_matches_the_local_pool(monkeypatch):
    ray = _ray()
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = dict(episodes=6, workers=2, num_envs=4)
    on_ray = evaluate("expert", ENV, EvalConfig(backend="ray", **cfg))
    assert ray.is_initialized()  # the local Ray it started stays for later evaluations, until exit
    assert ray.cluster_resources()["CPU"] >= 2
    local = evaluate("expert", ENV, EvalConfig(**cfg))
    assert on_ray.outcomes == local.outcomes and _events(on_ray) == _events(local)
    assert on_ray.success_rate >= 5 / 6
    timing = on_ray.report["timing"]
    assert timing["backend"] == "ray" and len(timing["nodes"]) == 1
    assert all(e.node == timing["nodes"][0] for e in on_ray.episodes)
    assert local.report["timing"]["backend"] == "local" and all(e.node is None for e in local.episodes)


def test_policy_on_the_driver_gives_the_local_pools_episodes(ray_session):
    cfg = dict(episodes=6, num_envs=3, max_steps=40, seed=7, workers=2)
    on_ray = evaluate("random", ENV, EvalConfig(backend="ray", **cfg))
    local = evaluate("random", ENV, EvalConfig(**cfg))
    assert on_ray.outcomes == local.outcomes and _events(on_ray) == _events(local)


def test_several_tasks_on_ray_give_the_local_pools_episodes(ray_session):
    env = EnvConfig(tasks=["reach", "push"], image_size=16)  # env.tasks: a pool of actors per task
    cfg = dict(episodes=2, num_envs=2, workers=2)
    on_ray = evaluate("expert", env, EvalConfig(backend="ray", **cfg))
    local = evaluate("expert", env, EvalConfig(**cfg))
    assert on_ray.outcomes == local.outcomes and _events(on_ray) == _events(local)
    assert [e.task for e in on_ray.episodes] == ["reach", "reach", "push", "push"]
    assert on_ray.report["per_task"] == local.report["per_task"]


def test_killed_actor_is_a_failure_on_its_node_and_the_run_completes(ray_session, monkeypatch, tmp_path):
    monkeypatch.setenv(CRASH_ENV_VAR, "3")  # the actor resetting episode 3 SIGKILLs its process
    result = evaluate(
        "expert", ENV, EvalConfig(episodes=10, workers=2, num_envs=4, backend="ray"), out_dir=tmp_path
    )
    assert [e.index for e in result.episodes] == list(range(10))
    by_index = {e.index: e for e in result.episodes}
    assert by_index[3].reason == "worker_crash" and not by_index[3].success
    crashed = [e for e in result.episodes if e.reason == "worker_crash"]
    assert 1 <= len(crashed) <= 4  # episode 3 and whatever else that actor had in flight
    assert all(e.success for e in result.episodes if e.reason != "worker_crash")
    assert result.report["timing"]["worker_restarts"] == 1
    node = by_index[3].node
    assert node and node in result.report["timing"]["nodes"]
    assert result.report["episodes"][3]["node"] == node
    md = (tmp_path / "eval.md").read_text()
    assert "## Lost workers" in md and node in md


def test_silent_actor_times_out_as_a_crash(ray_session, monkeypatch):
    monkeypatch.setenv(HANG_ENV_VAR, "1")  # the actor resetting episode 1 sleeps for an hour
    cfg = EvalConfig(episodes=3, workers=1, num_envs=1, worker_timeout_s=3, backend="ray")
    result = evaluate("expert", ENV, cfg)
    assert [(e.index, e.reason) for e in result.episodes] == [
        (0, "success"),
        (1, "worker_crash"),
        (2, "success"),
    ]


def test_user_errors_in_actors_reach_the_caller_as_themselves(ray_session):
    with pytest.raises(EnvError, match="no_such_task"):
        evaluate("expert", EnvConfig(task="no_such_task"), EvalConfig(episodes=1, workers=1, backend="ray"))


def test_an_actor_no_node_can_hold_fails_at_once(ray_session):
    with pytest.raises(ConfigError, match=r"eval.ray_num_gpus=1000: the Ray cluster has \d+ GPUs in all"):
        evaluate("expert", ENV, EvalConfig(episodes=1, workers=1, backend="ray", ray_num_gpus=1000))


def test_a_local_ray_started_here_grows_for_more_actors(ray_session):
    need = float(ray_session.cluster_resources()["CPU"]) + 1  # two actors that do not fit now
    cfg = EvalConfig(episodes=2, workers=2, num_envs=2, backend="ray", ray_num_cpus=need / 2)
    result = evaluate("expert", ENV, cfg)
    assert [e.reason for e in result.episodes] == ["success", "success"]
    assert ray_session.cluster_resources()["CPU"] >= need


def test_ray_started_early_serves_the_evaluation_and_sigterm_stays_the_callers(ray_session):
    import signal
    import socket

    from vla_ft.eval.ray_pool import start_early

    def ours(signum, frame):  # a training run's StopRequest handler, say
        pass

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        ray_session.shutdown()
        cfg = EvalConfig(episodes=2, workers=2, num_envs=2, backend="ray")
        start_early(cfg)  # returns at once; the evaluation waits for the start
        result = evaluate("expert", ENV, cfg)
        assert [e.reason for e in result.episodes] == ["success", "success"]
        assert signal.getsignal(signal.SIGTERM) is ours
        ray_session.shutdown()  # and Ray started by the evaluation itself, in this (main) thread
        assert evaluate("expert", ENV, cfg).success_rate == 1.0
        assert signal.getsignal(signal.SIGTERM) is ours

        # a start that fails raises its one-line error in the evaluation, not in the caller's thread
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again: nothing listens there
        ray_session.shutdown()
        bad = EvalConfig(episodes=1, workers=1, backend="ray", ray_address=f"127.0.0.1:{port}")
        start_early(bad)
        with pytest.raises(EnvError, match=rf"cannot join the Ray cluster at '127.0.0.1:{port}'"):
            evaluate("expert", ENV, bad)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_checkpoint_scored_on_ray_started_while_it_loads(ray_session, tmp_path):
    from vla_ft.config import ModelConfig, load_config
    from vla_ft.eval.run import run_evaluate
    from vla_ft.models import ModelDims, build_policy, save_pretrained

    keys = dict(image_keys=["agentview_image", "wrist_image"], state_keys=["ee_pos", "gripper_qpos"])
    dims = ModelDims(action_dim=4, state_dim=5, image_size=(32, 32), **keys)
    save_pretrained(build_policy(ModelConfig(preset="tiny"), dims), tmp_path / "ckpt")
    overrides = [
        "env.image_size=32",
        "eval.episodes=2",
        "eval.workers=2",
        "eval.num_envs=2",
        "eval.max_steps=8",
    ]
    results = {}
    for backend in ("local", "ray"):
        ray_session.shutdown()  # the ray run starts its own Ray while the checkpoint loads
        cfg = load_config(
            "pick_place.yaml", [*overrides, f"eval.backend={backend}", f"eval.out_dir={tmp_path / backend}"]
        )
        results[backend] = run_evaluate(cfg, ckpt=tmp_path / "ckpt", policy="checkpoint")
    assert results["ray"].outcomes == results["local"].outcomes
    assert results["ray"].report["timing"]["backend"] == "ray" and ray_session.is_initialized()


SIGTERM_SCRIPT = r"""
import os, signal, sys, time
from vla_ft.config import EnvConfig, EvalConfig
from vla_ft.eval import evaluate
from vla_ft.eval.ray_pool import start_early

got = []
if sys.argv[1] == "handler":  # a training run's StopRequest, say; Ray starts in this (main) thread
    signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
cfg = EvalConfig(episodes=1, workers=1, num_envs=1, backend="ray")
if sys.argv[1] == "early":  # no handler of its own; Ray starts in a background thread
    start_early(cfg)
evaluate("expert", EnvConfig(task="pick_place", image_size=32), cfg)
me = str(os.getpid())
children = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1] == me:
            children.append(pid)
    except OSError:
        pass
print("children", *children, flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)  # longer than the 3 s after which Ray's own handler aborts the process
print("survived", got, flush=True)
"""


def _run_sigterm_script(mode):
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_SCRIPT, mode], capture_output=True, text=True, timeout=300
    )
    lines = proc.stdout.splitlines()
    children = next(line.split()[1:] for line in lines if line.startswith("children"))
    return proc, lines, [int(pid) for pid in children]


def test_sigterm_after_a_ray_evaluation_reaches_the_callers_handler():
    _ray()
    proc, lines, _ = _run_sigterm_script("handler")
    assert proc.returncode == 0, proc.stderr[-2000:]  # not Ray's abort (-6) 3 s after the signal
    assert "survived [15]" in lines


def test_sigterm_without_a_handler_exits_and_shuts_ray_down():
    import os
    import time

    _ray()
    proc, lines, children = _run_sigterm_script("early")
    assert proc.returncode == 128 + 15, proc.stderr[-2000:]
    assert not any(line.startswith("survived") for line in lines)
    assert children  # the GCS, the raylet and the rest of the Ray this process started

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"

    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(alive(pid) for pid in children)
