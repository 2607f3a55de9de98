"""TrainState's state_dict round trip through a checkpoint, and the Checkpointer that writes it.

A small linear policy stands in for the VLA (it writes its weights the way ``save_pretrained`` does),
so these run in about a second; the loop's own resume tests train the real tiny model.
"""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vla_ft.errors import CheckpointError
from vla_ft.train.checkpoint import load_training_state
from vla_ft.train.checkpointer import Checkpointer
from vla_ft.train.distributed import DistContext
from vla_ft.train.state import TrainState, make_ema
from vla_ft.train.step import ema_update


class _Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def save_pretrained(self, out: Path, manifest: bool = True) -> None:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, out / "model.safetensors")


def _state(ema: float | None = 0.9, seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    policy = _Policy()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu = torch.device("cpu")
    aug_gen = torch.Generator().manual_seed(seed + 1)
    return TrainState(
        policy, optimizer, scheduler, scaler, make_ema(policy, ema, cpu), ema, aug_gen, DistContext()
    )


def _train(state: TrainState, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(8, 4) + torch.rand((), generator=state.aug_gen)
        state.optimizer.zero_grad()
        state.policy.net(x).square().mean().backward()
        state.optimizer.step()
        state.scheduler.step()
        if state.ema is not None:
            ema_update(state.ema, state.policy, state.ema_decay, torch.tensor(True))
        state.step += 1


def _draws(state: TrainState) -> list[float]:
    """One draw from every RNG a checkpoint restores."""
    aug = torch.rand((), generator=state.aug_gen).item()
    return [torch.rand(()).item(), random.random(), float(np.random.rand()), aug]


def test_a_saved_state_resumes_every_value_weight_and_rng(tmp_path):
    state = _state()
    _train(state, 3)
    state.epoch, state.pos, state.skipped = 2, 16, 1
    state.best, state.best_step, state.stale = 0.5, 2, 1
    state.history.append({"step": 2, "val_loss": 0.5})
    state.wandb_id = "run-1"
    random.seed(3)
    np.random.seed(4)
    path = Checkpointer(tmp_path, state.ctx, keep_last=2).save(state)
    expected = _draws(state)
    _train(state, 2)

    resumed = _state(seed=7)  # other weights and RNGs until the checkpoint is loaded
    random.seed(8)
    np.random.seed(9)
    resumed.policy.load_state_dict(load_file(path / "model.safetensors"))  # as from_pretrained does
    resumed.load_state_dict(*load_training_state(path))
    assert (resumed.step, resumed.epoch, resumed.pos, resumed.skipped) == (3, 2, 16, 1)
    assert (resumed.best, resumed.best_step, resumed.stale) == (0.5, 2, 1)
    assert resumed.history == [{"step": 2, "val_loss": 0.5}] and resumed.wandb_id == "run-1"
    assert resumed.scheduler.last_epoch == 3 and int(resumed.ema.n_averaged) == 3
    assert _draws(resumed) == expected
    _train(resumed, 2)
    for name, value in state.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[name], value), name
    for name, value in state.ema.module.state_dict().items():
        assert torch.equal(resumed.ema.module.state_dict()[name], value), name
    for a, b in zip(state.optimizer.state.values(), resumed.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_checkpoint_format_holds_the_training_state_files_and_keys(tmp_path):
    state = _state()
    _train(state, 1)
    path = Checkpointer(tmp_path, state.ctx, keep_last=2).save(state)
    names = sorted(p.name for p in (path / "training_state").iterdir())
    assert names == ["optimizer.pt", "raw_model.safetensors", "rng.pt", "scheduler.pt", "state.json"]
    values = json.loads((path / "training_state" / "state.json").read_text())
    assert list(values) == [
        "step", "epoch", "pos", "world_size", "skipped", "best", "best_step", "stale", "history",
        "wandb_id", "ema_n_averaged", "rng_host",
    ]  # fmt: skip
    assert set(values["rng_host"]) == {"python", "numpy"}
    assert set(torch.load(path / "training_state" / "rng.pt", weights_only=True)) == {"torch", "augment"}
    raw = load_file(path / "training_state" / "raw_model.safetensors")
    assert all(torch.equal(raw[k], v) for k, v in state.policy.state_dict().items())


def test_resuming_with_another_ema_setting_is_refused(tmp_path):
    state = _state(ema=None)
    _train(state, 1)
    path = Checkpointer(tmp_path, state.ctx, keep_last=2).save(state)
    with pytest.raises(CheckpointError, match="train.ema=0.9 but the checkpoint was saved without EMA"):
        _state(ema=0.9).load_state_dict(*load_training_state(path))


def test_a_second_save_at_one_step_reuses_the_checkpoint_and_can_tag_it_best(tmp_path):
    state = _state()
    _train(state, 1)
    checkpoints = Checkpointer(tmp_path, state.ctx, keep_last=2)
    first = checkpoints.save(state)
    written = (first / "manifest.json").stat().st_mtime_ns
    assert not (tmp_path / "best").exists()
    assert checkpoints.save(state, best=True) == first
    assert (first / "manifest.json").stat().st_mtime_ns == written
    assert (tmp_path / "best").resolve() == first == (tmp_path / "last").resolve()


def test_keep_last_prunes_old_checkpoints_but_never_best_and_best_can_follow_last(tmp_path):
    state = _state()
    checkpoints = Checkpointer(tmp_path, state.ctx, keep_last=1)
    for step in (1, 2, 3):
        _train(state, 1)
        checkpoints.save(state, best=step == 1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001", "step_0000003"]
    assert (tmp_path / "best").resolve().name == "step_0000001"
    checkpoints.best_is_last()
    assert (tmp_path / "best").resolve().name == "step_0000003"


def test_a_full_disk_names_the_size_a_checkpoint_needs_and_keeps_nothing_partial(tmp_path, monkeypatch):
    state = _state(ema=None)
    _train(state, 1)

    def full(out: Path, manifest: bool = True) -> None:
        out.mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state.policy, "save_pretrained", full)
    checkpoints = Checkpointer(tmp_path, state.ctx, keep_last=2, need_bytes=3 * 2**20)
    with pytest.raises(
        CheckpointError, match=r"disk full while saving step_0000001; a checkpoint needs about 3.0 MiB"
    ):
        checkpoints.save(state)
    assert list((tmp_path / "checkpoints").iterdir()) == [] and not (tmp_path / "last").exists()
