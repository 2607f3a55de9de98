"""``scripts/evaluate.py``'s library side: load what to score, evaluate, print a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vla_ft.errors import CheckpointError
from vla_ft.eval.evaluate import EvalResult, evaluate


def load_policy(ckpt: str | Path) -> Any:
    """A ``VLAPolicy`` from a checkpoint directory, in eval mode."""
    path = Path(ckpt)
    if not path.is_dir():
        raise CheckpointError(f"--ckpt {ckpt}: no such checkpoint directory (expected e.g. runs/<run>/best)")
    from vla_ft.models import VLAPolicy

    policy = VLAPolicy.from_pretrained(path)
    policy.eval()
    return policy


def default_out_dir(cfg: Any, ckpt: str | Path | None, policy: str) -> Path:
    """``eval.out_dir`` if set; else ``<run dir>/eval/<ckpt name>``; else ``<train.out_dir>/eval/<name>_<policy>``."""
    if cfg.eval.out_dir is not None:
        return Path(cfg.eval.out_dir)
    if ckpt is not None and policy == "checkpoint":
        ckpt = Path(ckpt).resolve()
        return ckpt.parent / "eval" / ckpt.name
    return Path(cfg.train.out_dir) / "eval" / f"{cfg.name}_{policy}"


def summary(result: EvalResult) -> str:
    """A few lines for the console: overall, then one line per task (rate, Wilson interval, events)."""
    o = result.report["overall"]
    lo, hi = o["ci95"]
    lines = [
        f"success {o['successes']}/{o['episodes']} = {100 * o['success_rate']:.1f}% "
        f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}%), failures {o['failure_reasons'] or '-'}",
    ]
    for task, g in result.report["per_task"].items():
        lo, hi = g["ci95"]
        events = ", ".join(f"{name} {n}" for name, n in (g.get("events") or {}).items())
        lines.append(
            f"  {task}: {g['successes']}/{g['episodes']} = {100 * g['success_rate']:.1f}% "
            f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}%)" + (f" | {events}" if events else "")
        )
    if result.out_dir is not None:
        lines.append(f"report: {result.out_dir / 'eval.md'}")
    return "\n".join(lines)


def run_evaluate(cfg: Any, ckpt: str | Path | None = None, policy: str = "checkpoint") -> EvalResult:
    """Score a checkpoint (``policy="checkpoint"``), the scripted expert or a random policy.

    Args:
        cfg: the whole run config; ``cfg.env`` and ``cfg.eval`` are used.
        ckpt: checkpoint directory (required for ``policy="checkpoint"``).
        policy: ``checkpoint`` | ``expert`` | ``random``.

    Returns:
        The :class:`EvalResult` (reports are written to :func:`default_out_dir`).
    """
    if policy == "checkpoint":
        if ckpt is None:
            raise CheckpointError(
                "--ckpt DIR is required to score a checkpoint (or use --policy expert|random)"
            )
        target: Any = load_policy(ckpt)
    else:
        target = policy
    out_dir = default_out_dir(cfg, ckpt, policy)
    result = evaluate(
        target, cfg.env, cfg.eval, out_dir=out_dir, ckpt=ckpt if policy == "checkpoint" else None
    )
    print(summary(result))
    return result
