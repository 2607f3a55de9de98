"""Checkpoint manifests: every file's sha256 is recorded at save and verified on load and resume."""

from __future__ import annotations

import json

import pytest

from vla_ft.errors import CheckpointError
from vla_ft.integrity import MANIFEST, verify
from vla_ft.models import VLAPolicy
from vla_ft.train import checkpoint as ckpt_io
from vla_ft.train.finetune import run_finetune
from vla_ft.train.logging import read_metrics


def _flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))


def test_every_file_of_a_training_checkpoint_is_in_its_manifest(tiny_cfg):
    run = run_finetune(tiny_cfg(**{"train.steps": 2, "train.save_every": 2, "train.ema": 0.9})).run_dir
    last = (run / "last").resolve()
    listed = set(json.loads((last / MANIFEST).read_text())["files"])
    on_disk = {p.relative_to(last).as_posix() for p in last.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert listed == on_disk and "training_state/optimizer.pt" in listed
    assert "training_state/raw_model.safetensors" in listed and "model.safetensors" in listed
    assert verify(last)


def test_resume_auto_skips_a_damaged_last_checkpoint_and_says_which_it_used(tiny_cfg, capsys):
    over = {"train.steps": 6, "train.save_every": 2, "train.keep_last": 3, "train.val_every": 0}
    run = run_finetune(tiny_cfg(**over)).run_dir
    _flip_byte((run / "last").resolve() / "training_state" / "optimizer.pt")
    capsys.readouterr()
    result = run_finetune(tiny_cfg(**over, **{"train.resume": "auto"}))
    out = capsys.readouterr().out
    assert "skipped a checkpoint that failed verification" in out and "step_0000006" in out
    assert "resuming from" in out and "step_0000004" in out
    assert result.fit.step == 6
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert verify((run / "last").resolve())  # steps 5-6 trained again into a sound checkpoint


def test_a_changed_model_file_names_the_file_and_the_fix(tiny_cfg):
    run = run_finetune(tiny_cfg(**{"train.steps": 2, "train.save_every": 2})).run_dir
    last = (run / "last").resolve()
    _flip_byte(last / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* differs .*re-copy"):
        VLAPolicy.from_pretrained(last)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256"):
        ckpt_io.find_resume_checkpoint(str(last), run)
