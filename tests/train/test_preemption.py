"""SIGTERM/SIGINT: finish the step, save, exit 75; resume continues with the identical loss curve."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vla_ft.errors import PREEMPTED_EXIT
from vla_ft.integrity import verify
from vla_ft.train import preempt
from vla_ft.train.logging import read_metrics

REPO = Path(__file__).resolve().parents[2]
STEPS = 16
RUN = {"train.steps": STEPS, "train.save_every": 6, "train.val_every": 8, "train.deterministic": "true"}
# as tests/train/test_distributed.py: no batch norm and no action padding, so ranks agree exactly
EXACT = {
    "data.chunk": 1,
    "data.augment.enabled": "false",
    "model.preset": "tiny-vlm",
    "loss.task_terms": "{task_id: 1.0, progress: 1.0, waypoint: 5.0}",
}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


def _cmd(overrides: list[str], nproc: int = 0) -> list[str]:
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(REPO / "scripts" / "finetune.py"), "--cfg", "pick_place.yaml", *overrides]


def _interrupt(cmd: list[str], run_dir: Path, after: int, sig: int) -> tuple[int, str]:
    """Start ``cmd``, send ``sig`` once ``after`` training steps are logged; (exit status, stderr)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(_losses(run_dir)) >= after:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal: " + proc.stderr.read()[-2000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _check_resume(run: list[str], run_dir: Path, expected: dict[int, float], nproc: int = 0) -> None:
    done = subprocess.run(_cmd([*run, "train.resume=auto"], nproc), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # bit-for-bit: same data order, RNG, optimizer and schedule
        assert resumed[step] == expected[step], step


@pytest.fixture(scope="module")
def uninterrupted(reach_file, tmp_path_factory, tiny_overrides) -> dict[int, float]:
    out = tmp_path_factory.mktemp("ref")
    subprocess.run(_cmd(tiny_overrides(reach_file, out, **RUN)), check=True, env=ENV, capture_output=True)
    return _losses(out / "t")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_current_step_exits_75_and_resumes_identically(
    reach_file, tmp_path, tiny_overrides, uninterrupted, sig
):
    expected = uninterrupted

    run = tiny_overrides(reach_file, tmp_path / "stop", **RUN)
    run_dir = tmp_path / "stop" / "t"
    after = random.Random(os.getpid()).randint(3, 12)
    code, err = _interrupt(_cmd(run), run_dir, after, sig)
    assert code == PREEMPTED_EXIT, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"preempted: stopped by {signal.Signals(sig).name} after step "), err[-3000:]
    assert "train.resume=auto" in line and "Traceback" not in err
    stopped = int(line.split("after step ")[1].split()[0])
    assert after <= stopped < STEPS and max(_losses(run_dir)) == stopped
    last = (run_dir / "last").resolve()
    assert last.name == f"step_{stopped:07d}" and verify(last)  # complete, with its manifest
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    _check_resume(run, run_dir, expected)


@pytest.mark.dist
@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_and_resumes_identically(
    reach_file, tmp_path, tiny_overrides
):
    extra = {**EXACT, **RUN, "train.parallel": "ddp", "train.batch_size": 8}
    ref = tiny_overrides(reach_file, tmp_path / "ref", **extra)
    done = subprocess.run(_cmd(ref, nproc=2), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = _losses(tmp_path / "ref" / "t")

    run = tiny_overrides(reach_file, tmp_path / "stop", **extra)
    run_dir = tmp_path / "stop" / "t"
    # the agent forwards SIGTERM to both workers, as a scheduler's SIGTERM to the job would
    code, err = _interrupt(
        _cmd(run, nproc=2), run_dir, random.Random(os.getpid()).randint(3, 12), signal.SIGTERM
    )
    assert code != 0
    assert err.count("preempted: stopped by SIGTERM after step ") == 1, err[-3000:]  # rank 0 reports
    stopped = max(_losses(run_dir))
    last = (run_dir / "last").resolve()
    assert last.name == f"step_{stopped:07d}" and verify(last)
    assert (last / "training_state" / "rng_rank1.pt").is_file()  # rank 1 saved its part too
    _check_resume(run, run_dir, expected, nproc=2)


def test_second_sigint_aborts_and_handlers_are_restored(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(preempt, "REPEAT_S", 0.0)
    with preempt.StopRequest(report=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.signal == signal.SIGTERM and stop.requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_repeated_delivery_of_one_ctrl_c_counts_once():
    with preempt.StopRequest(report=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's forwarded copy, within REPEAT_S
        time.sleep(0.01)
        assert stop.signal == signal.SIGINT
