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

Distributed runs (``train.parallel=ddp|fsdp``) write the same directory: rank 0 writes the model
files (under FSDP the full weights are gathered to rank 0's CPU first), ``state.json``,
``scheduler.pt`` and ``rng.pt``; every rank writes its RNG (``rng_rank<r>.pt``) and its shard of
``training_state/dcp/`` (torch.distributed.checkpoint: model and optimizer state keyed by parameter
name, no pickle of user objects). DCP reshards on load, so a run saved with N ranks resumes with M
(a single process included). The data position in ``state.json`` counts global samples.
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
DCP_DIR = "dcp"  # torch.distributed.checkpoint shards of model + optimizer (distributed runs)


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
    ctx=None,
    sharded: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and point ``last`` at it.

    Args:
        run_dir: the run directory.
        step: optimizer step the checkpoint is taken after.
        save_model: callable(dir) writing the model directory (``policy.save_pretrained``); in a
            distributed run every rank calls it (FSDP gathers the weights) and it writes on rank 0.
        training_state: JSON-able values (step, data position, wandb id, history, ...).
        tensors: torch-serializable state dicts: ``optimizer``, ``scheduler``, ``scaler``, ``rng``
            (``rng`` is this rank's; the rest are written by rank 0).
        raw_weights: non-EMA weights when EMA is on (saved as ``raw_model.safetensors``).
        ctx: the :class:`~vla_ft.train.distributed.DistContext` (None: one process).
        sharded: (model, optimizer) saved with torch.distributed.checkpoint into ``dcp/``.
    """
    rank, main = (ctx.rank, ctx.is_main) if ctx is not None else (0, True)
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp-step_{step:07d}"
    state_dir = tmp / STATE_DIR
    if main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier(ctx)
    save_model(tmp)
    if main:
        state_dir.mkdir(parents=True, exist_ok=True)
    _barrier(ctx)
    if sharded is not None:
        save_sharded(state_dir / DCP_DIR, *sharded)
    if not main:
        torch.save(tensors["rng"], state_dir / f"rng_rank{rank}.pt")
    else:
        for name, value in tensors.items():
            if value is not None:
                torch.save(value, state_dir / f"{name}.pt")
        if raw_weights is not None:
            save_file(
                {k: v.detach().cpu().clone() for k, v in raw_weights.items()},
                state_dir / "raw_model.safetensors",
            )
    _barrier(ctx)  # every rank's files are in tmp before it is renamed
    if main:
        state = dict(training_state)
        state["rng_host"] = _rng_to_json()
        (state_dir / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        point_link(run_dir / "last", final)
    _barrier(ctx)
    return final


def _barrier(ctx) -> None:
    if ctx is not None:
        ctx.barrier()


class _FullState:
    """A sharded policy seen through its gathered full weights: ``save_pretrained`` reads
    ``state_dict()`` and the policy's metadata (config, dims, tokenizer, normalizer) from it."""

    def __init__(self, policy: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self._policy, self._state = policy, state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        # safetensors refuses a tensor that covers only part of its storage (gathered shards can)
        return {
            k: v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
            for k, v in self._state.items()
        }


def save_full_model(policy: torch.nn.Module, out: Path, ctx) -> None:
    """Write the model directory of an FSDP2-sharded ``policy`` (collective: every rank calls it).

    The fp32 weights are gathered one tensor at a time into rank 0's CPU memory (the other ranks
    get nothing), and rank 0 writes them with the policy's own ``save_pretrained`` format, so
    ``VLAPolicy.from_pretrained`` and evaluation read the checkpoint as any other.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from vla_ft.models.loading import save_pretrained

    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        save_pretrained(_FullState(policy, full), out)


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state (sharded under FSDP) with torch.distributed.checkpoint (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a :func:`save_sharded` directory into ``model``/``optimizer`` at any world size (one
    process without a process group included): DCP reads the slices each rank owns."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():  # one process: DCP says it assumes a local load, which it is
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


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


def load_training_state(ckpt: Path, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read ``training_state/`` of a checkpoint: (json state, tensors by name). Host RNGs restored.

    ``tensors["rng"]`` is rank ``rank``'s RNG state when the checkpoint has one for it (else rank
    0's); ``tensors["sharded"]`` is the DCP directory of a distributed run's checkpoint.
    """
    state_dir = ckpt / STATE_DIR
    state_file = state_dir / "state.json"
    if not state_file.is_file():
        raise CheckpointError(
            f"{ckpt}: no {STATE_DIR}/state.json, so this checkpoint cannot resume training "
            f"(use it as model.pretrained instead of train.resume)"
        )
    state = json.loads(state_file.read_text())
    tensors: dict[str, Any] = {}
    for path in state_dir.glob("*.pt"):
        if not path.stem.startswith("rng_rank"):
            tensors[path.stem] = torch.load(path, map_location="cpu", weights_only=True)
    own_rng = state_dir / f"rng_rank{rank}.pt"
    if rank > 0 and own_rng.is_file():
        tensors["rng"] = torch.load(own_rng, map_location="cpu", weights_only=True)
    raw = state_dir / "raw_model.safetensors"
    if raw.is_file():
        tensors["raw_model"] = load_file(raw)
    if (state_dir / DCP_DIR).is_dir():
        tensors["sharded"] = state_dir / DCP_DIR
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
