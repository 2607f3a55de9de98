"""The training loop on the tiny preset and a small generated dataset (CPU)."""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from vla_ft import constants as K
from vla_ft.config_checks import check_config
from vla_ft.data.dataset import build_datasets
from vla_ft.errors import CheckpointError, ConfigError
from vla_ft.losses import ActionTaskLoss
from vla_ft.models import VLAPolicy, load_tokenizer, load_vla, param_info
from vla_ft.train import checkpoint as ckpt_io
from vla_ft.train.finetune import run_finetune
from vla_ft.train.logging import read_metrics
from vla_ft.train.loop import TrainingDiverged, fit
from vla_ft.train.optim import build_optimizer, build_param_groups
from vla_ft.train.step import autocast, train_step

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _setup(cfg):
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    train_ds, val_ds, info = build_datasets(cfg.data, tok, cfg.seed)
    policy = load_vla(cfg.model, info)
    policy.set_normalizer(info.normalizer)
    return policy, train_ds, val_ds, info


def _losses(run_dir: Path, split: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == split}


def test_training_reduces_loss_and_writes_run_dir(tiny_cfg):
    extra = {"train.steps": 60, "train.lr": 2e-3, "train.batch_size": 16, "data.augment.enabled": "false"}
    # without pick_place.yaml's waypoint term: it is half the total loss on this synthetic file and
    # learned more slowly over 60 steps (seed 0: total loss -24% with it, -54% without)
    extra["loss.task_terms"] = "{task_id: 1.0, progress: 1.0}"
    cfg = tiny_cfg(**extra, **{"train.val_every": 20, "train.save_every": 20})
    result = run_finetune(cfg)
    losses = _losses(result.run_dir)
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(56, 61)) / 5
    assert last < 0.7 * first, (first, last)
    run = result.run_dir
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    for name in ("last", "best"):
        assert (run / name / "model.safetensors").is_file()
        assert (run / name / "normalization.json").is_file()
        assert (run / name / "training_state" / "optimizer.pt").is_file()
    val = _losses(run, "val")
    assert sorted(val) == [20, 40, 60]
    assert result.fit.best_step in (20, 40, 60)
    reloaded = VLAPolicy.from_pretrained(run / "best")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in result_params(run))


def result_params(run: Path):
    return VLAPolicy.from_pretrained(run / "last").parameters()


def test_every_parameter_changes_under_full_fine_tuning(tiny_cfg):
    cfg = tiny_cfg(**{"train.warmup_steps": 0, "train.lr": 1e-3, "train.schedule": "constant"})
    policy, train_ds, _, info = _setup(cfg)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = build_optimizer(build_param_groups(policy, param_info(policy), cfg.train), cfg.train, CPU)
    loss_fn = ActionTaskLoss(cfg.loss, info.action_dim)
    batch = torch.utils.data.default_collate([train_ds[i] for i in range(8)])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    # Two steps: timm ResNets zero-init the last norm of each residual block, so the layers before it
    # get their first non-zero gradient only once that norm has moved (step 1).
    for _ in range(2):
        _, stepped = train_step(policy, loss_fn, [batch], opt, scaler, lambda: autocast(CPU, "fp32"), 1.0)
        assert stepped
    unchanged = [n for n, p in policy.named_parameters() if torch.equal(before[n], p.detach())]
    assert not unchanged, f"parameters not updated by a full-parameter step: {unchanged[:10]}"


def test_gradient_accumulation_equals_one_big_batch(tiny_cfg):
    cfg = tiny_cfg(**{"train.warmup_steps": 0, "train.schedule": "constant", "train.grad_clip": 0.0})
    policy, train_ds, _, info = _setup(cfg)
    policy.eval()  # batch-norm statistics would differ between micro-batches and the full batch
    twin = copy.deepcopy(policy)
    loss_fn = ActionTaskLoss(cfg.loss, info.action_dim)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    amp = lambda: autocast(CPU, "fp32")  # noqa: E731
    samples = [train_ds[i] for i in range(8)]
    full = torch.utils.data.default_collate(samples)
    micro = [torch.utils.data.default_collate(samples[i : i + 2]) for i in range(0, 8, 2)]
    opts = [
        build_optimizer(build_param_groups(m, param_info(m), cfg.train), cfg.train, CPU)
        for m in (policy, twin)
    ]
    m_full, _ = train_step(policy, loss_fn, [full], opts[0], scaler, amp, 0.0)
    m_acc, _ = train_step(twin, loss_fn, micro, opts[1], scaler, amp, 0.0)
    torch.testing.assert_close(m_full["loss"], m_acc["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_full["grad_norm"], m_acc["grad_norm"], rtol=1e-4, atol=1e-6)
    # Compare the accumulated gradients (what accumulation must get right). Parameters after the
    # AdamW step are not compared: Adam's first step moves each weight by ~lr * sign(grad), so a
    # gradient at float-noise level may flip sign between the two summation orders.
    scale = max(p.grad.abs().max().item() for p in policy.parameters() if p.grad is not None)
    for (name, a), b in zip(policy.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5 * scale, msg=name)


def _finetune_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "finetune.py"), "--cfg", "pick_place.yaml", *overrides]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(reach_file, tmp_path, tiny_overrides):
    extra = {"train.steps": 16, "train.save_every": 4, "train.val_every": 8, "train.deterministic": "true"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = tiny_overrides(reach_file, tmp_path / "ref", **extra)
    subprocess.run(_finetune_cmd(ref), check=True, env=env, capture_output=True, timeout=600)
    expected = _losses(tmp_path / "ref" / "t")
    assert sorted(expected) == list(range(1, 17))

    run = tiny_overrides(reach_file, tmp_path / "kill", **extra)
    kill_after = random.Random(os.getpid()).randint(5, 13)
    proc = subprocess.Popen(_finetune_cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "kill" / "t" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(tmp_path / "kill" / "t"))
    assert killed_at < 16
    subprocess.run(
        _finetune_cmd([*run, "train.resume=auto"]), check=True, env=env, capture_output=True, timeout=600
    )
    resumed = _losses(tmp_path / "kill" / "t")
    assert sorted(resumed) == list(range(1, 17))
    for step in range(1, 17):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, killed_at)


def test_crash_mid_save_leaves_last_loadable(tiny_cfg):
    cfg = tiny_cfg(**{"train.steps": 4, "train.save_every": 2, "train.val_every": 0})
    result = run_finetune(cfg)
    run = result.run_dir
    before = (run / "last").resolve()

    def broken_save(path: Path) -> None:
        path.mkdir(parents=True)
        (path / "config.json").write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    with pytest.raises(
        CheckpointError,
        match=r"checkpoints: disk full while saving step_0000099; a checkpoint needs about [\d.]+ MiB",
    ) as err:
        ckpt_io.save_checkpoint(run, 99, broken_save, {"step": 99}, {})
    assert "step_0000004 is intact" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert (run / "last").resolve() == before
    VLAPolicy.from_pretrained(run / "last")
    state, tensors = ckpt_io.load_training_state(run / "last")
    assert state["step"] == 4 and "optimizer" in tensors


def test_nan_loss_is_skipped_then_stops_with_last_good_state(tiny_cfg):
    cfg = tiny_cfg(
        **{"train.steps": 20, "train.max_bad_steps": 3, "train.val_every": 0, "train.save_every": 0}
    )
    policy, train_ds, val_ds, info = _setup(cfg)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] > 2:
            output = dict(output)
            output[K.OUT_ACTION] = output[K.OUT_ACTION] * float("nan")
        return output

    policy.register_forward_hook(poison)
    run_dir = Path(cfg.train.out_dir) / "nan"
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        fit(
            cfg,
            policy,
            param_info(policy),
            train_ds,
            val_ds,
            run_dir,
            CPU,
            "fp32",
            loss_kwargs={"action_dim": 4},
        )
    good = {n: p.detach().clone() for n, p in policy.named_parameters()}
    saved = VLAPolicy.from_pretrained(run_dir / "last")
    for name, p in saved.named_parameters():
        torch.testing.assert_close(p, good[name], msg=name)
    state, _ = ckpt_io.load_training_state(run_dir / "last")
    assert state["skipped"] == 3 and state["step"] == 5
    assert all(torch.isfinite(p).all() for p in good.values())


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"train.best_metric": "success_rate"}, "train.eval_every > 0"),
        ({"train.parallel": "fsdp", "model.lora.r": 4}, "lora.r=4 with train.parallel=fsdp"),
        ({"data.collect_if_missing": "true", "collect.output": "other.hdf5"}, "same file"),
    ],
)
def test_cross_section_config_errors_before_data_loads(tiny_cfg, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        check_config(tiny_cfg(**override))


class _Recorder:
    """A loopback TCP listener that counts connections (stands in for the wandb server)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except TimeoutError:
                continue

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_offline_or_disabled_touches_no_server(reach_file, tmp_path, mode, tiny_overrides):
    server = _Recorder()
    try:
        env = {**os.environ, "WANDB_BASE_URL": server.url, "WANDB_API_KEY": "x" * 40}
        env.pop("WANDB_MODE", None)
        overrides = tiny_overrides(reach_file, tmp_path, **{"train.steps": 3, "log.wandb": mode})
        subprocess.run(_finetune_cmd(overrides), check=True, env=env, capture_output=True, timeout=600)
    finally:
        server.close()
    assert server.connections == 0
    wandb_dir = tmp_path / "t" / "wandb"
    assert wandb_dir.exists() == (mode == "offline")
    if mode == "offline":
        runs = list(wandb_dir.glob("offline-run-*"))
        assert runs, "offline mode should leave a local run to sync later"
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] == 3


@pytest.mark.sim
def test_periodic_sim_eval_early_stops_on_success_rate_with_ema_and_unfreezing(tiny_cfg):
    extra = {
        "train.steps": 12,
        "train.eval_every": 3,
        "train.best_metric": "success_rate",
        "train.patience": 1,
        "train.val_every": 0,
        "train.ema": 0.9,
        "train.unfreeze_steps": 6,
        "model.gradient_checkpointing": "true",
        "eval.episodes": 2,
        "eval.num_envs": 2,
        "eval.workers": 1,
        "eval.max_steps": 5,
    }
    result = run_finetune(tiny_cfg(**extra))
    evals = [r for r in read_metrics(result.run_dir) if r["split"] == "eval"]
    # An untrained policy scores 0 at step 3 (the best so far) and again at step 6: patience 1 stops it.
    assert [r["step"] for r in evals] == [3, 6]
    assert result.fit.stopped_early and result.fit.step == 6
    assert (result.run_dir / "best").resolve().name == "step_0000003"
    assert (result.run_dir / "eval" / "step_0000003" / "eval.json").is_file()
    assert result.eval is not None and result.eval["episodes"] == 2
    state, tensors = ckpt_io.load_training_state(result.run_dir / "last")
    assert "raw_model" in tensors and state["ema_n_averaged"] > 0


def test_logged_learning_rates_are_the_base_rate_and_each_modules(tiny_cfg):
    """``lr`` is train.lr after the schedule; ``lr/<module>`` the rate of that module's parameter
    groups (train.module_lr multiplies it)."""
    extra = {"train.steps": 6, "train.warmup_steps": 2, "train.schedule": "linear", "train.val_every": 0}
    cfg = tiny_cfg(**extra, **{"train.save_every": 0, "train.module_lr": "{vision: 3.0, language: 0.5}"})
    rows = [r for r in read_metrics(run_finetune(cfg).run_dir) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    multiplier = {"vision": 3.0, "language": 0.5, "projector": 1.0, "heads": 1.0}
    for row in rows:
        step = row["step"]
        schedule = step / 2 if step < 2 else (6 - step) / 4  # linear: 2 warmup steps, then down to 0
        assert row["lr"] == pytest.approx(cfg.train.lr * schedule), step
        assert sorted(k for k in row if k.startswith("lr/")) == sorted(f"lr/{m}" for m in multiplier)
        for module, mult in multiplier.items():
            assert row[f"lr/{module}"] == pytest.approx(cfg.train.lr * mult * schedule), (step, module)


def test_resume_with_ema_from_a_checkpoint_path_continues_exactly(resume_check):
    resume_check(
        **{"train.steps": 6, "train.save_every": 3, "train.val_every": 0, "train.ema": 0.9},
        **{"train.deterministic": "true"},
    )


def test_grounding_term_refuses_a_model_without_heat_maps_or_a_file_without_targets(
    reach_file, tmp_path, tiny_cfg, tiny_overrides
):
    import shutil

    import h5py

    from vla_ft.config import load_config

    with pytest.raises(ConfigError, match="keypoints >= 2"):
        run_finetune(tiny_cfg(**{"model.preset": "tiny-vlm"}))
    plain = shutil.copy(reach_file, tmp_path / "plain.hdf5")
    with h5py.File(plain, "a") as f:
        for grp in f["data"].values():
            del grp["targets"]
    cfg = load_config("pick_place.yaml", tiny_overrides(plain, tmp_path / "runs"))
    with pytest.raises(ConfigError, match=r"plain\.hdf5 has none for cameras.*re-collect"):
        run_finetune(cfg)
