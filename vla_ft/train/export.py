"""Export a finished run's checkpoint as a self-describing model directory (``train.export_dir``).

The export is what ships: the checkpoint files (``config.json``, ``model.safetensors``,
``normalization.json``, tokenizer) plus ``README.md`` (a model card: how it was made and what it
scored) and ``card.json`` (the same facts, machine-readable). It is written into a temporary
sibling directory and renamed over the target, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from vla_ft.config import Config, config_to_dict
from vla_ft.integrity import sha256_file
from vla_ft.provenance import git_commit, package_versions

CARD_FILE, CARD_JSON = "README.md", "card.json"


def _data_facts(cfg: Config) -> dict[str, Any]:
    """Demo files and how they were collected (the collection seeds make them reproducible)."""
    import h5py

    files = []
    for path in cfg.data.paths:
        entry: dict[str, Any] = {"path": path}
        p = Path(path)
        if p.is_file():
            with h5py.File(p, "r") as f:
                entry["demos"] = len(f["data"]) if "data" in f else None
                entry["sha256"] = sha256_file(p)
        files.append(entry)
    c = cfg.collect
    return {
        "files": files,
        "collect": {
            "tasks": list(c.tasks),
            "episodes_per_task": {task: c.episodes_for(task) for task in c.tasks},
            "seed": c.seed,
            "action_noise": c.action_noise,
        },
    }


def build_card(cfg: Config, run_dir: Path, ckpt: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Every fact the model card states, as plain JSON values."""
    return {
        "name": cfg.name,
        "command": shlex.join(["python", *sys.argv]) if sys.argv else None,
        "git_commit": git_commit(),
        "source_run": str(run_dir),
        "source_checkpoint": ckpt.name,
        "weights_sha256": sha256_file(ckpt / "model.safetensors"),
        "seed": cfg.seed,
        "data": _data_facts(cfg),
        "summary": summary,
        "versions": package_versions(),
        "config": config_to_dict(cfg),
    }


def _episode_counts(per_task: dict[str, int]) -> str:
    """``"300 episodes per task"``, or each task's count when they differ."""
    counts = set(per_task.values())
    if len(counts) == 1:
        return f"{counts.pop()} episodes per task"
    return "episodes " + ", ".join(f"{task} {n}" for task, n in per_task.items())


def _markdown(card: dict[str, Any]) -> str:
    s = card["summary"]
    ev = s.get("eval") or {}
    params = s.get("params", {})
    collect = card["data"]["collect"]
    lines = [
        f"# {card['name']}: model card",
        "",
        "A vla-ft policy checkpoint (load with `VLAPolicy.from_pretrained(<this dir>)` or set",
        "`model.pretrained` to this directory). Everything below was written by the run that made it.",
        "",
        "## How it was made",
        "",
        f"- Command: `{card['command']}`",
        f"- Commit: `{card['git_commit']}`",
        f"- Seed: {card['seed']}; device {s.get('device')} ({s.get('precision')}); {s.get('steps')} steps",
        f"- Data: {', '.join(_file_line(f) for f in card['data']['files'])},",
        f"  collected by the scripted experts: tasks {', '.join(collect['tasks'])}, "
        f"{_episode_counts(collect['episodes_per_task'])}, reset seeds from {collect['seed']}, "
        f"action noise {collect['action_noise']}",
        f"- Parameters: {params.get('trainable', 0):,} trainable / {params.get('total', 0):,}",
        f"- Weights sha256: `{card['weights_sha256']}` (checkpoint `{card['source_checkpoint']}` of the run)",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in card['versions'].items() if v)}",
        "",
        "## Metrics",
        "",
        f"- Validation loss: best {_fmt(s.get('val_loss', {}).get('best'))}, "
        f"final {_fmt(s.get('val_loss', {}).get('final'))}",
    ]
    if ev:
        lo, hi = ev.get("ci95_low"), ev.get("ci95_high")
        env = card["config"]["env"]
        scored = ", ".join(env.get("tasks") or [env["task"]])  # env.tasks: every task, in one evaluation
        lines.append(
            f"- Simulation ({scored}, {ev.get('episodes')} held-out episodes, "
            f"seeds from {card['config']['eval']['seed']}): success {_pct(ev.get('success_rate'))} "
            f"(95% CI {_pct(lo)}-{_pct(hi)})"
        )
    timing = s.get("timing", {})
    lines += [
        f"- Wall time: train {_fmt(timing.get('train_s'), '.0f')} s, "
        f"eval {_fmt(timing.get('eval_s'), '.0f')} s",
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(card["config"], sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _file_line(entry: dict[str, Any]) -> str:
    demos = entry.get("demos")
    return f"`{entry['path']}`" + (f" ({demos} demos)" if demos else "")


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def export_run(cfg: Config, run_dir: Path, ckpt: Path, summary: dict[str, Any], out_dir: str | Path) -> Path:
    """Copy checkpoint ``ckpt`` of ``run_dir`` to ``out_dir`` with README.md and card.json."""
    out = Path(out_dir)
    card = build_card(cfg, run_dir, ckpt, summary)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ckpt, tmp, ignore=shutil.ignore_patterns("training_state"))
    (tmp / CARD_JSON).write_text(json.dumps(card, indent=1))
    (tmp / CARD_FILE).write_text(_markdown(card))
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    print(f"[vla-ft] exported {ckpt.name} to {out} (model card: {out / CARD_FILE})")
    return out
