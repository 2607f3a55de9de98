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

import errno
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vla_ft.errors import CheckpointError
from vla_ft.integrity import manifest_bytes, verify, write_manifest

STATE_DIR = "training_state"
DCP_DIR = "dcp"  # torch.distributed.checkpoint shards of model + optimizer (distributed runs)


def save_checkpoint(
    run_dir: Path,
    step: int,
    save_model,
    training_state: dict[str, Any],
    tensors: dict[str, Any],
    raw_weights: dict[str, torch.Tensor] | None = None,
    ctx=None,
    sharded: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None,
    need_bytes: int | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>`` atomically (``manifest.json`` last) and point ``last`` at it.

    A failed write (full disk, permissions) removes the partial directory and raises one
    CheckpointError naming the directory and the space a checkpoint needs; ``last`` is unchanged.

    Args:
        run_dir: the run directory.
        step: optimizer step the checkpoint is taken after.
        save_model: callable(dir) writing the model directory (``policy.save_pretrained``); in a
            distributed run every rank calls it (FSDP gathers the weights) and it writes on rank 0.
        training_state: JSON-able values for ``state.json`` (step, data position, host RNGs, wandb id,
            history, ...: :meth:`TrainState.state_dict <vla_ft.train.state.TrainState.state_dict>`).
        tensors: torch-serializable state dicts: ``optimizer``, ``scheduler``, ``scaler``, ``rng``
            (``rng`` is this rank's; the rest are written by rank 0).
        raw_weights: non-EMA weights when EMA is on (saved as ``raw_model.safetensors``).
        ctx: the :class:`~vla_ft.train.distributed.DistContext` (None: one process).
        sharded: (model, optimizer) saved with torch.distributed.checkpoint into ``dcp/``.
        need_bytes: the estimated checkpoint size, for the message when the disk is full (the
            previous checkpoint's size is used when there is one).
    """
    rank, main = (ctx.rank, ctx.is_main) if ctx is not None else (0, True)
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp-step_{step:07d}"
    state_dir = tmp / STATE_DIR
    try:
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
            (state_dir / "state.json").write_text(json.dumps(training_state, indent=1))
            write_manifest(tmp)  # last: a checkpoint with a manifest was completely written
    except OSError as exc:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(exc, run_dir, final, need_bytes) from None
    if main:
        if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        point_link(run_dir / "last", final)
    _barrier(ctx)
    return final


def _save_error(exc: OSError, run_dir: Path, final: Path, need_bytes: int | None) -> CheckpointError:
    """One line for a failed save: the directory, the bytes a checkpoint needs, what is left intact."""
    last = run_dir / "last"
    kept = (
        f"the previous checkpoint {last.resolve().name} is intact"
        if last.exists()
        else "no checkpoint was kept"
    )
    previous = manifest_bytes(last.resolve()) if last.exists() else None
    need = previous or need_bytes
    try:
        free = shutil.disk_usage(final.parent if final.parent.exists() else run_dir).free
    except OSError:
        free = None
    sizes = f"; a checkpoint needs about {human_bytes(need)}" if need else ""
    sizes += f", {human_bytes(free)} free" if free is not None else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(
            f"{final.parent}: disk full while saving {final.name}{sizes}; free space there or set "
            f"train.out_dir to a larger disk, then resume with train.resume=auto ({kept})"
        )
    return CheckpointError(
        f"{final.parent}: cannot save {final.name} ({exc.strerror or exc}){sizes}; check that "
        f"train.out_dir is writable, then resume with train.resume=auto ({kept})"
    )


def human_bytes(n: int | None) -> str:
    """``1536`` -> ``1.5 KiB`` (``?`` for None)."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def estimate_checkpoint_bytes(policy: torch.nn.Module, ema: bool, optimizer_states: int = 2) -> int:
    """Bytes of one training checkpoint: fp32 weights, ``optimizer_states`` moments per weight
    (AdamW: 2), the raw weights next to the EMA ones, plus 2% for metadata and tokenizer files."""
    weights = sum(t.numel() * 4 for t in policy.state_dict().values() if t.is_floating_point())
    return int(weights * (1 + optimizer_states + int(ema)) * 1.02)


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
    if ctx.is_main and getattr(policy, "arch", {}).get("kind") == "smolvla":  # LeRobot's layout
        policy.save_pretrained(out, manifest=False, state=full)
    elif ctx.is_main:
        save_pretrained(_FullState(policy, full), out, manifest=False)


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
    """Read ``training_state/`` of a checkpoint: (json state, tensors by name), which
    :meth:`TrainState.load_state_dict <vla_ft.train.state.TrainState.load_state_dict>` resumes from.

    The checkpoint's files are verified against its manifest first. ``tensors["rng"]`` is rank
    ``rank``'s RNG state when the checkpoint has one for it (else rank 0's); ``tensors["sharded"]``
    is the DCP directory of a distributed run's checkpoint.
    """
    state_dir = ckpt / STATE_DIR
    state_file = state_dir / "state.json"
    if not state_file.is_file():
        raise CheckpointError(
            f"{ckpt}: no {STATE_DIR}/state.json, so this checkpoint cannot resume training "
            f"(use it as model.pretrained instead of train.resume)"
        )
    verify(ckpt)
    try:
        state = json.loads(state_file.read_text())
        missing = [k for k in ("step", "epoch", "pos", "rng_host") if k not in state]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _unreadable(state_file, exc) from None
    tensors: dict[str, Any] = {}
    for path in state_dir.glob("*.pt"):
        if not path.stem.startswith("rng_rank"):
            tensors[path.stem] = _torch_load(path)
    own_rng = state_dir / f"rng_rank{rank}.pt"
    if rank > 0 and own_rng.is_file():
        tensors["rng"] = _torch_load(own_rng)
    raw = state_dir / "raw_model.safetensors"
    if raw.is_file():
        from vla_ft.models.loading import read_safetensors

        tensors["raw_model"] = read_safetensors(raw)
    if (state_dir / DCP_DIR).is_dir():
        tensors["sharded"] = state_dir / DCP_DIR
    return state, tensors


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
    return CheckpointError(
        f"{path}: cannot read ({first}): the file is truncated or corrupt; re-copy the checkpoint, "
        f"or resume from another one (runs/<run>/checkpoints/step_N)"
    )


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise _unreadable(path, exc) from None


def find_resume_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, verified against its manifest.

    ``auto``: the run dir's ``last`` checkpoint, or when that fails verification the newest step
    checkpoint that passes (printed); None when the run has none (start fresh). Else the given
    path (a checkpoint or a run directory), which must pass.
    """
    if resume == "auto":
        last = run_dir / "last"
        if not last.exists():
            return None
        candidates = [last.resolve()]
        root = run_dir / "checkpoints"
        if root.is_dir():
            steps = sorted((p for p in root.iterdir() if p.name.startswith("step_")), reverse=True)
            candidates += [p for p in steps if p != candidates[0] and (p / STATE_DIR).is_dir()]
        failures = []
        for path in candidates:
            try:
                verify(path)
            except CheckpointError as exc:
                failures.append(str(exc))
                continue
            if failures:
                print(
                    f"[vla-ft] train.resume=auto: skipped a checkpoint that failed verification: {failures[0]}"
                )
                print(f"[vla-ft] train.resume=auto: resuming from {path}")
            return path
        raise CheckpointError(
            f"train.resume=auto: no checkpoint of {run_dir} passes verification ({failures[0]}); "
            f"start a new run (another train.run_name), or re-copy the run directory"
        )
    path = Path(resume)
    if path.is_dir() and (path / "last").exists() and not (path / STATE_DIR).exists():
        path = (path / "last").resolve()  # a run directory was given
    if not (path / STATE_DIR).is_dir():
        raise CheckpointError(
            f"train.resume={resume!r}: not a checkpoint with {STATE_DIR}/ (give runs/<run>/last, a "
            f"runs/<run>/checkpoints/step_N directory, a run directory, or 'auto')"
        )
    verify(path)
    return path
