"""Evaluation reports: ``eval.json`` (episodes, scores, reproducibility manifest), ``eval.md`` and wandb."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from vla_ft.eval.scoring import REASON_CRASH
from vla_ft.integrity import sha256_file
from vla_ft.provenance import git_commit, package_versions


def checkpoint_hash(ckpt: str | Path | None) -> str | None:
    """sha256 of ``<ckpt>/model.safetensors`` (None without a checkpoint)."""
    if ckpt is None:
        return None
    weights = Path(ckpt) / "model.safetensors"
    return sha256_file(weights) if weights.is_file() else None


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


def build_manifest(
    env_cfg: Any,
    eval_cfg: Any,
    episodes: int,
    policy_name: str,
    obs_spec: Any,
    ckpt: str | Path | None,
    max_steps: int | dict[str, int] | None = None,
    tasks: list[str] | None = None,
) -> dict[str, Any]:
    """Everything needed to rerun this evaluation and get the same episodes.

    ``max_steps`` is the limit the env applied (the workers report it; with several tasks a dict
    task -> limit, as tasks differ); None falls back to the config. ``tasks``: what was scored, in
    order (None: the env the config names: ``env.task``, the gym id or the robosuite env); ``episodes`` and ``seeds`` are per task.
    """
    if max_steps is None:
        max_steps = eval_cfg.max_steps if eval_cfg.max_steps is not None else env_cfg.max_steps
    if tasks is None:
        from vla_ft.sim.env_types import env_type

        tasks = [env_type(env_cfg).config_name(env_cfg)]
    return {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "command": sys.argv,
        "policy": policy_name,
        "checkpoint": str(ckpt) if ckpt is not None else None,
        "checkpoint_sha256": checkpoint_hash(ckpt),
        "tasks": list(tasks),
        "episodes": episodes,  # of each task
        "seed": eval_cfg.seed,
        "seeds": [eval_cfg.seed, eval_cfg.seed + episodes - 1],  # episode i: seed + i (inclusive range)
        "max_steps": max_steps,
        "image_size": env_cfg.image_size,
        "replan_every": eval_cfg.replan_every,
        "temporal_ensemble": eval_cfg.temporal_ensemble,
        "num_envs": eval_cfg.num_envs,
        "env": _plain(env_cfg),
        "obs_preprocessing": _plain(obs_spec) if obs_spec is not None else None,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _row(name: str, g: dict[str, Any]) -> str:
    lo, hi = g["ci95"]
    steps = g["mean_steps_to_success"]
    steps_s = f"{steps:.1f}" if steps is not None else "-"
    fails = ", ".join(f"{k}: {v}" for k, v in g["failure_reasons"].items()) or "-"
    return (
        f"| {name} | {g['successes']}/{g['episodes']} | {_pct(g['success_rate'])} | "
        f"[{_pct(lo)}, {_pct(hi)}] | {steps_s} | {fails} |"
    )


def _goal_sets(env: dict[str, Any]) -> str:
    """``, goals held_out, instructions paraphrase`` for the sets that are not the default (else "")."""
    parts = [
        f"{key} {env[key]}"
        for key, default in (("goals", "all"), ("instructions", "train"))
        if env.get(key, default) != default
    ]
    return "".join(f", {p}" for p in parts)


def render_markdown(report: dict[str, Any]) -> str:
    """``eval.md``: overall, per-task and per-instruction tables."""
    head = "| group | successes | rate | 95% CI (Wilson) | mean steps to success | failures |"
    sep = "|---|---|---|---|---|---|"
    m = report["manifest"]
    tasks = m.get("tasks") or []
    episodes = f"{m['episodes']} episodes"
    if len(tasks) > 1:
        episodes += f" of each of {len(tasks)} tasks ({', '.join(tasks)}; {len(report['episodes'])} in all)"
    limits = m["max_steps"]
    if isinstance(limits, dict):
        limits = ", ".join(f"{task} {n}" for task, n in limits.items())
    lines = [
        f"# Evaluation: {m['policy']}" + (f" on {', '.join(tasks)}" if tasks else ""),
        "",
        f"{episodes}, seeds {m['seeds'][0]}..{m['seeds'][1]}, max_steps {limits}, "
        f"image {m['image_size']} px, commit {m['git_commit']}, checkpoint sha256 {m['checkpoint_sha256']}"
        + _goal_sets(m.get("env") or {}),
        "",
        head,
        sep,
        _row("**all**", report["overall"]),
    ]
    for title, key in (("task", "per_task"), ("instruction", "per_instruction")):
        lines += ["", f"## Per {title}", "", head, sep]
        lines += [_row(name.replace("|", "/"), g) for name, g in report[key].items()]
    with_events = {t: g for t, g in report["per_task"].items() if g.get("events")}
    if with_events:
        lines += [
            "",
            "## Events per task",
            "",
            "Episodes in which each event happened at least once (`envs.tasks.Task.events`; the first "
            "step of each is in `eval.json`). `grasped_other` is the wrong object in the gripper.",
            "",
        ]
        for task, g in with_events.items():
            names = list(g["events"])
            lines += [
                f"| {task} | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names),
                f"| of {g['episodes']} | " + " | ".join(str(g["events"][n]) for n in names) + " |",
                "",
            ]
    lines += _crash_lines(report)
    return "\n".join(lines).rstrip("\n") + "\n"


def _crash_lines(report: dict[str, Any]) -> list[str]:
    """``eval.md``'s list of episodes lost with their worker, by the node it ran on."""
    by_node: dict[str, list[int]] = {}
    for e in report["episodes"]:
        if e["reason"] == REASON_CRASH:
            by_node.setdefault(e.get("node") or "this machine (local pool)", []).append(e["index"])
    if not by_node:
        return []
    lines = ["", "## Lost workers", "", "| node | worker_crash episodes |", "|---|---|"]
    lines += [f"| {node} | {', '.join(map(str, idx))} |" for node, idx in sorted(by_node.items())]
    return lines


def write_reports(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "eval.json", out_dir / "eval.md"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def log_wandb(
    report: dict[str, Any], videos: list[str], prefix: str = "eval", step: int | None = None
) -> bool:
    """Log to the active wandb run, if any (the trainer owns the run; this never starts one).

    Returns:
        True when something was logged.
    """
    wandb = sys.modules.get("wandb")  # not imported: no run can be active
    if wandb is None or getattr(wandb, "run", None) is None:
        return False
    o = report["overall"]
    table = wandb.Table(columns=["episode", "seed", "task", "instruction", "success", "steps", "reason"])
    for e in report["episodes"]:
        table.add_data(
            e["index"], e["seed"], e["task"], e["instruction"], e["success"], e["steps"], e["reason"]
        )
    data: dict[str, Any] = {
        f"{prefix}/success_rate": o["success_rate"],
        f"{prefix}/ci95_low": o["ci95"][0],
        f"{prefix}/ci95_high": o["ci95"][1],
        f"{prefix}/episodes_table": table,
    }
    for task, g in report["per_task"].items():
        data[f"{prefix}/success_rate/{task}"] = g["success_rate"]
    for path in videos:
        data[f"{prefix}/video/{Path(path).stem}"] = wandb.Video(str(path), format="mp4")
    wandb.log(data, step=step)
    return True
