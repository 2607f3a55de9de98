"""Run logging: ``metrics.jsonl`` always, wandb (offline by default), a console progress bar, plots.

wandb modes: ``offline`` writes under ``<run>/wandb`` and never touches the network, ``online``
syncs (only when the user asks), ``disabled`` does nothing. The run id is kept in the training
state so a resumed run continues the same wandb run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vla_ft.config import Config, config_to_dict


class RunLogger:
    """Writes metric rows to ``metrics.jsonl`` and wandb, and drives the progress bar.

    Args:
        cfg: the run config (log section, name).
        run_dir: the run directory.
        total_steps: optimizer steps of the run (progress bar length).
        start_step: the step the run starts from (resume).
        wandb_id: wandb run id to continue (resume), or None for a new one.
    """

    def __init__(self, cfg: Config, run_dir: Path, total_steps: int, start_step: int = 0, wandb_id=None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._file = self.path.open("a")
        self.wandb_run = None
        self.wandb_id = wandb_id
        if cfg.log.wandb != "disabled":
            self._init_wandb(cfg, wandb_id)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not cfg.log.progress,
            dynamic_ncols=True,
            desc=cfg.name,
        )

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they are about to be recomputed)."""
        if not self.path.exists():
            return
        keep = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))

    def _init_wandb(self, cfg: Config, wandb_id: str | None) -> None:
        # wandb 0.31 probes its server for an OpenTelemetry endpoint even under init(mode="offline")
        # unless WANDB_MODE says offline too (docs/traps.md); set it before wandb reads its settings.
        os.environ["WANDB_MODE"] = cfg.log.wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.wandb_run = wandb.init(
            project=cfg.log.project,
            entity=cfg.log.entity,
            name=self.run_dir.name,
            dir=str(self.run_dir),
            mode=cfg.log.wandb,
            config=config_to_dict(cfg),
            id=wandb_id,
            resume="allow" if wandb_id else None,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.wandb_id = self.wandb_run.id

    def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        """Append one row (values converted to float) and send it to wandb."""
        row = {"step": step, "split": split}
        for key, value in metrics.items():
            row[key] = float(value) if not isinstance(value, (str, bool)) else value
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(
                {f"{split}/{k}": v for k, v in row.items() if k not in ("step", "split")}, step=step
            )

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        self.bar.n = step
        self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in postfix.items()})

    def close(self) -> None:
        self.bar.close()
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class NullLogger:
    """The logger of ranks other than 0 in a distributed run: they log nothing."""

    def __init__(self, wandb_id: str | None = None) -> None:
        self.wandb_id = wandb_id

    def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        pass

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def open_logger(
    cfg: Config, run_dir: Path, main: bool, start_step: int = 0, wandb_id: str | None = None
) -> RunLogger | NullLogger:
    """The run's logger: a :class:`RunLogger` on rank 0 (``main``), a :class:`NullLogger` elsewhere."""
    if main:
        return RunLogger(cfg, run_dir, cfg.train.steps, start_step=start_step, wandb_id=wandb_id)
    return NullLogger(wandb_id)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def write_plots(run_dir: Path) -> list[Path]:
    """PNG plots of the loss terms (train and val) and of success rate vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    written = []
    loss_keys = sorted({k for r in rows for k in r if k.startswith("loss")})
    if loss_keys:
        fig, ax = plt.subplots(figsize=(7, 4))
        for split in ("train", "val"):
            for key in loss_keys:
                pts = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
                pts = [(s, v) for s, v in pts if math.isfinite(v)]
                if pts:
                    ax.plot(*zip(*pts), label=f"{split} {key}", linestyle="-" if split == "train" else "--")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        written.append(_save(plt, fig, ax, "loss", run_dir / "loss.png"))
    pts = [(r["step"], r["success_rate"]) for r in rows if r["split"] == "eval" and "success_rate" in r]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*pts), marker="o")
        ax.set_ylim(0, 1)
        written.append(_save(plt, fig, ax, "success rate", run_dir / "success.png"))
    return written


def _save(plt, fig, ax, ylabel: str, out: Path) -> Path:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
