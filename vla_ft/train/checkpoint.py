"""Checkpoints: the model directory format plus ``training_state/`` for exact resume.

Layout of a run directory::

    runs/<run>/config.yaml
    runs/<run>/checkpoints/step_000500/   model dir (config.json, model.safetensors,
                                          normalization.json, tokenizer files) + training_state/
    runs/<run>/last -> checkpoints/step_...   (relative symlink, replaced atomically)
    runs/<run>/best -> checkpoints/step_...

``training_state/`` holds ``optimizer.pt`` / ``scheduler.pt`` / ``scaler.pt`` (tensors and plain
values only, loaded with ``torch.load(weights_only=True)``), ``rng.pt`` (torch CPU/CUDA and the
augmentation generator), ``state.json`` (step, data position, python/numpy RNG, wandb id, metric
history) and, with EMA on, ``raw_model.safetensors`` (the non-averaged weights; ``model.safetensors``
then holds the EMA weights that evaluation uses).

Every checkpoint is written into a temporary directory and renamed into place, and the ``last``
link moves only after that: a crash mid-save leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vla_ft.errors import CheckpointError

STATE_DIR = "training_state"


def _rng_to_json() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _rng_from_json(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(
    run_dir: Path,
    step: int,
    save_model,
    training_state: dict[str, Any],
    tensors: dict[str, Any],
    raw_weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and point ``last`` at it.

    Args:
        run_dir: the run directory.
        step: optimizer step the checkpoint is taken after.
        save_model: callable(dir) writing the model directory (``policy.save_pretrained``).
        training_state: JSON-able values (step, data position, wandb id, history, ...).
        tensors: torch-serializable state dicts: ``optimizer``, ``scheduler``, ``scaler``, ``rng``.
        raw_weights: non-EMA weights when EMA is on (saved as ``raw_model.safetensors``).
    """
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp-step_{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(tmp)
    state_dir = tmp / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    for name, value in tensors.items():
        if value is not None:
            torch.save(value, state_dir / f"{name}.pt")
    if raw_weights is not None:
        save_file(
            {k: v.detach().cpu().clone() for k, v in raw_weights.items()}, state_dir / "raw_model.safetensors"
        )
    state = dict(training_state)
    state["rng_host"] = _rng_to_json()
    (state_dir / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    point_link(run_dir / "last", final)
    return final


def point_link(link: Path, target: Path) -> None:
    """Atomically (re)point the relative symlink ``link`` at ``target``."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints, never the ones ``best``/``last`` name."""
    ckpt_root = run_dir / "checkpoints"
    if not ckpt_root.is_dir():
        return
    protected = {(run_dir / n).resolve() for n in ("best", "last") if (run_dir / n).exists()}
    steps = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for path in steps[:-keep_last]:
        if path.resolve() not in protected:
            shutil.rmtree(path)
    for stale in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=False)


def load_training_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read ``training_state/`` of a checkpoint: (json state, tensors by name). Host RNGs restored."""
    state_dir = ckpt / STATE_DIR
    state_file = state_dir / "state.json"
    if not state_file.is_file():
        raise CheckpointError(
            f"{ckpt}: no {STATE_DIR}/state.json, so this checkpoint cannot resume training "
            f"(use it as model.pretrained instead of train.resume)"
        )
    state = json.loads(state_file.read_text())
    tensors = {}
    for path in state_dir.glob("*.pt"):
        tensors[path.stem] = torch.load(path, map_location="cpu", weights_only=True)
    raw = state_dir / "raw_model.safetensors"
    if raw.is_file():
        tensors["raw_model"] = load_file(raw)
    _rng_from_json(state.pop("rng_host"))
    return state, tensors


def find_resume_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """``auto``: the run dir's ``last`` checkpoint if any (None: start fresh); else the given path."""
    if resume == "auto":
        last = run_dir / "last"
        return last.resolve() if last.exists() else None
    path = Path(resume)
    if path.is_dir() and (path / "last").exists() and not (path / STATE_DIR).exists():
        path = (path / "last").resolve()  # a run directory was given
    if not (path / STATE_DIR).is_dir():
        raise CheckpointError(
            f"train.resume={resume!r}: not a checkpoint with {STATE_DIR}/ (give runs/<run>/last, a "
            f"runs/<run>/checkpoints/step_N directory, a run directory, or 'auto')"
        )
    return path
