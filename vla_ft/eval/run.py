"""``scripts/evaluate.py``'s library side: load what to score, evaluate, print a summary."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from vla_ft.errors import CheckpointError
from vla_ft.eval.env_check import EnvProbe, eval_max_steps
from vla_ft.eval.env_match import check_envs, expected_from_policy, fallback_instruction, instruction_warning
from vla_ft.eval.evaluate import EvalResult, evaluate


def _check_dir(ckpt: str | Path) -> None:
    if not Path(ckpt).is_dir():
        raise CheckpointError(f"--ckpt {ckpt}: no such checkpoint directory (expected e.g. runs/<run>/best)")


def load_policy(ckpt: str | Path) -> Any:
    """A ``VLAPolicy`` from a checkpoint directory, in eval mode."""
    path = Path(ckpt)
    _check_dir(path)
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

    A checkpoint is checked against one instance of the env (every task of ``env.tasks``), built
    in a spawned process while it loads, before any worker starts (vla_ft/eval/env_check.py). With
    ``eval.backend=ray`` Ray starts in a background thread meanwhile (vla_ft/eval/ray_pool.py).

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
        _check_dir(ckpt)
        if cfg.eval.backend == "ray":  # Ray starts while the checkpoint and the env probe load
            from vla_ft.eval.ray_pool import start_early

            start_early(cfg.eval)
        with EnvProbe(cfg.env, eval_max_steps(cfg.env, cfg.eval)) as probe:  # builds while it loads
            target: Any = load_policy(ckpt)
            specs = probe.result()
        for line in check_checkpoint_env(specs, target, cfg.env):
            print(f"warning: {line}", file=sys.stderr)
    else:
        target = policy
    out_dir = default_out_dir(cfg, ckpt, policy)
    result = evaluate(
        target, cfg.env, cfg.eval, out_dir=out_dir, ckpt=ckpt if policy == "checkpoint" else None
    )
    what = Path(ckpt).name if policy == "checkpoint" else f"the {policy} policy"
    print(f"evaluation of {what} on {', '.join(result.report['manifest']['tasks'])}:\n{summary(result)}")
    return result


def check_checkpoint_env(specs: list, policy: Any, env_cfg: Any) -> list[str]:
    """The env check of an evaluation: every task's env against the checkpoint (keys, state and
    action dims, image layout), and an instruction for envs that give none. Returns the warnings.

    Raises:
        VLAFTError: one line naming the mismatch and the fix (vla_ft/eval/env_match.py).
    """
    expected = expected_from_policy(policy)
    if expected is None:
        return []
    warnings = check_envs(specs, expected, env_cfg)
    for spec in specs:  # an env without instructions, and several trained ones to pick from: raises
        fallback_instruction(spec, env_cfg, expected.instructions)
    note = instruction_warning(env_cfg, expected.instructions)
    return warnings + ([note] if note else [])
