#!/usr/bin/env python
"""Evaluation throughput: episodes/min vs rollout worker count (target >= 0.8x linear up to the cores).

    python scripts/bench_eval.py                                  # expert on pick_place, workers 1,2
    python scripts/bench_eval.py --policy random --workers 1,2,4 --episodes 64 --repeats 3
    python scripts/bench_eval.py --backend both --workers 2       # Ray actors vs the local pool
    python scripts/bench_eval.py --cold --backend both --workers 2 --policy checkpoint --ckpt runs/<run>/best

Each worker count (and backend) runs the same seeded episodes with the same ``eval.num_envs`` (so
the same work); episodes/min counts rollout time only (worker start-up excluded, reported
separately); wall s is the whole ``evaluate`` call, start-up included. With ``ray`` the first run
starts a local Ray (or joins ``eval.ray_address`` / ``$RAY_ADDRESS``) and later runs reuse it, as
periodic evaluations during training do: "first wall s" is that cold run. Repeats alternate
between the runs so machine noise hits all alike; the median is reported. Writes JSON to ``--out``.

``--cold`` times what a user types instead: each run is a fresh ``scripts/evaluate.py`` process
(interpreter, imports, checkpoint load, env check, Ray's start with ``ray``, evaluation, exit), so
every Ray run is a cold one; "command s" is that process's wall time and "evaluate s" the
``evaluate`` call inside it (from its eval.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MUJOCO_GL", "egl")

from vla_ft.config import load_config  # noqa: E402
from vla_ft.eval import evaluate  # noqa: E402
from vla_ft.eval.run import load_policy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default="pick_place.yaml")
    p.add_argument("--policy", choices=["expert", "random", "checkpoint"], default="expert")
    p.add_argument("--ckpt", help="checkpoint directory for --policy checkpoint")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--backend", choices=["local", "ray", "both"], default="local", help="eval.backend")
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--num-envs", type=int, default=8, help="concurrent episodes (same for every count)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="time fresh scripts/evaluate.py processes")
    p.add_argument("--out", default="runs/bench/eval.json")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. env.image_size=96")
    args = p.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    backends = ["local", "ray"] if args.backend == "both" else [args.backend]
    if args.cold:
        cold(args, backends, counts)
        return
    setups = [(b, w) for b in backends for w in counts]
    policy = load_policy(args.ckpt) if args.policy == "checkpoint" else args.policy
    runs: dict[tuple, list[dict]] = {key: [] for key in setups}
    outcomes = {}
    for _ in range(args.repeats):
        for backend, w in setups:
            cfg = load_config(
                args.cfg,
                [
                    *args.overrides,
                    f"eval.backend={backend}",
                    f"eval.workers={w}",
                    f"eval.episodes={args.episodes}",
                    f"eval.num_envs={args.num_envs}",
                ],
            )
            result = evaluate(policy, cfg.env, cfg.eval)
            runs[backend, w].append(result.report["timing"])
            outcomes.setdefault((backend, w), result.outcomes)
    rows = []
    cols = ("backend", "workers", "episodes/min", "best", "vs linear", "startup s", "first wall s", "wall s")
    cols += ("vs local wall", "first vs local")
    cols += ("policy share", "main cpu share")
    print("  ".join(f"{c:>14}" for c in cols))
    for backend, w in setups:
        ts = runs[backend, w]
        first = runs[backend, counts[0]]
        base = statistics.median(t["episodes_per_min"] for t in first) / counts[0]
        epm = statistics.median(t["episodes_per_min"] for t in ts)
        wall = statistics.median(t["wall_s"] for t in ts)
        local_wall = (
            statistics.median(t["wall_s"] for t in runs["local", w]) if ("local", w) in runs else None
        )
        row = {
            "backend": backend,
            "workers": w,
            "episodes_per_min": epm,
            "best_episodes_per_min": max(t["episodes_per_min"] for t in ts),
            "scaling_vs_linear": epm / (base * w),
            "startup_s": statistics.median(t["setup_s"] for t in ts),
            "first_wall_s": ts[0]["wall_s"],
            "wall_s": wall,
            "wall_vs_local": wall / local_wall if local_wall else None,
            "first_wall_vs_local": ts[0]["wall_s"] / local_wall if local_wall else None,
            "policy_share": statistics.median(t["policy_s"] / t["rollout_s"] for t in ts),
            "main_cpu_share": statistics.median(t["main_cpu_s"] / t["wall_s"] for t in ts),
            "runs": ts,
        }
        rows.append(row)
        print(_cells(row, 14))
    same = all(outcomes[key] == outcomes[setups[0]] for key in setups)
    print(f"per-episode outcomes identical across worker counts and backends: {same}")
    _write(args, rows, same, backends=backends)


def cold(args: argparse.Namespace, backends: list[str], counts: list[int]) -> None:
    """``--cold``: fresh ``scripts/evaluate.py`` processes, alternating, timed from outside."""
    if args.policy == "checkpoint" and not args.ckpt:
        sys.exit("--policy checkpoint needs --ckpt DIR")
    script = Path(__file__).resolve().parent / "evaluate.py"
    what = ["--ckpt", args.ckpt] if args.policy == "checkpoint" else ["--policy", args.policy]
    setups = [(b, w) for b in backends for w in counts]
    runs: dict[tuple, list[dict]] = {key: [] for key in setups}
    outcomes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for backend, w in setups:
                out_dir = Path(tmp) / f"{backend}_{w}_{r}"
                cmd = [sys.executable, str(script), "--cfg", args.cfg, *what, *args.overrides]
                cmd += [f"eval.backend={backend}", f"eval.workers={w}", f"eval.episodes={args.episodes}"]
                cmd += [f"eval.num_envs={args.num_envs}", f"eval.out_dir={out_dir}"]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                command_s = time.perf_counter() - t0
                if proc.returncode != 0:
                    sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
                report = json.loads((out_dir / "eval.json").read_text())
                runs[backend, w].append({"command_s": command_s, **report["timing"]})
                outcomes.setdefault((backend, w), [(e["success"], e["steps"]) for e in report["episodes"]])
    cols = ("backend", "workers", "command s", "min", "max", "vs local", "evaluate s", "vs local", "setup s")
    print("  ".join(f"{c:>10}" for c in cols))
    rows = []
    for backend, w in setups:
        ts = runs[backend, w]
        med = {k: statistics.median(t[k] for t in ts) for k in ("command_s", "wall_s", "setup_s")}
        local = runs.get(("local", w))
        base = {k: statistics.median(t[k] for t in local) for k in ("command_s", "wall_s")} if local else None
        row = {
            "backend": backend,
            "workers": w,
            "command_s": med["command_s"],
            "command_min_s": min(t["command_s"] for t in ts),
            "command_max_s": max(t["command_s"] for t in ts),
            "command_vs_local": med["command_s"] / base["command_s"] if base else None,
            "evaluate_s": med["wall_s"],
            "evaluate_vs_local": med["wall_s"] / base["wall_s"] if base else None,
            "setup_s": med["setup_s"],
            "runs": ts,
        }
        rows.append(row)
        print(_cells(row, 10))
    same = all(outcomes[key] == outcomes[setups[0]] for key in setups)
    print(f"per-episode outcomes identical across backends: {same}")
    _write(args, rows, same, mode="cold", ckpt=args.ckpt)


def _cells(row: dict, width: int) -> str:
    """One table line: backend and workers, then every number of ``row`` up to its ``runs``."""
    cells = [f"{row['backend']:>{width}}", f"{row['workers']:>{width}}"]
    cells += [f"{v:>{width}.2f}" if v is not None else f"{'-':>{width}}" for v in list(row.values())[2:-1]]
    return "  ".join(cells)


def _write(args: argparse.Namespace, rows: list[dict], same: bool, **fields) -> None:
    """The bench's JSON at ``--out``: its settings, ``fields``, the machine and the rows."""
    out = {
        **fields,
        "policy": args.policy,
        "cfg": args.cfg,
        "overrides": args.overrides,
        "episodes": args.episodes,
        "num_envs": args.num_envs,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "outcomes_identical": same,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
