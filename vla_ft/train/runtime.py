"""What a training run needs around the loop: seeding, its run directory, peak memory readings and
its ``summary.json``."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_ft.config import Config
from vla_ft.io import write_atomic
from vla_ft.train.distributed import DistContext

SUMMARY_FILE = "summary.json"


def seed_everything(seed: int, deterministic: bool, threads: int | None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_run_dir(cfg: Config) -> Path:
    """``out_dir/run_name``; without a run name, a new ``<name>-<timestamp>`` directory, or with
    ``train.resume=auto`` the newest existing ``<name>-*`` run that has a checkpoint."""
    out = Path(cfg.train.out_dir)
    if cfg.train.run_name:
        return out / cfg.train.run_name
    if cfg.train.resume == "auto" and out.is_dir():
        runs = sorted((p for p in out.glob(f"{cfg.name}-*") if (p / "last").exists()), key=os.path.getmtime)
        if runs:
            return runs[-1]
    return out / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak resident memory (MiB) of a process since it started its program, or None if unknown.

    Linux: ``VmHWM`` from ``/proc/<pid>/status`` (the high-water mark of the process's own memory).
    Not ``getrusage().ru_maxrss``: that keeps the RSS the process had before ``exec``, i.e. a large
    parent's (a job started by scripts/compare.py would report the comparison process's memory).
    Elsewhere, for this process: ``ru_maxrss``.
    """
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
        return None  # an exited process (zombie) has no memory lines
    except OSError:
        if pid != "self":
            return None
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    """Peak resident memory of this process and, on CUDA, torch's peak allocated memory (MiB)."""
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": peak_rss_mb(), "cuda_peak_allocated_mb": cuda}


def run_summary(
    cfg: Config,
    ctx: DistContext,
    precision: str,
    result: Any,
    params: tuple[int, int],
    timing: dict[str, float],
    final: dict | None,
) -> dict[str, Any]:
    """``summary.json``: what a finished run measured (``result``: the loop's ``FitResult``;
    ``params``: trainable and all parameters; ``final``: the final evaluation's metrics or None)."""
    device, (trainable, total) = ctx.device, params
    vals = [h["val_loss"] for h in result.history if "val_loss" in h]
    return {
        "steps": result.step,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": precision,
        "parallel": {"mode": cfg.train.parallel, "world_size": ctx.world_size},
        "params": {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total},
        "lora": dataclasses.asdict(cfg.model.lora) if cfg.model.lora.r else None,
        "timing": timing,
        "memory": peak_memory_mb(device),
        "val_loss": {"final": vals[-1] if vals else None, "best": min(vals) if vals else None},
        "eval": final,
    }


def write_summary(run_dir: Path, summary: dict) -> Path:
    """Write ``summary.json`` (what a finished run measured) atomically into the run directory."""
    return write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
