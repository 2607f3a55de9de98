#!/usr/bin/env python
"""Evaluation throughput: episodes/min vs rollout worker count (target >= 0.8x linear up to the cores).

    python scripts/bench_eval.py                                  # expert on pick_place, workers 1,2
    python scripts/bench_eval.py --policy random --workers 1,2,4 --episodes 64 --repeats 3

Each worker count runs the same seeded episodes with the same ``eval.num_envs`` (so the same
work); episodes/min counts rollout time only (worker start-up excluded, reported separately).
Repeats alternate between worker counts so machine noise hits all alike; the median is reported.
Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
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
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--num-envs", type=int, default=8, help="concurrent episodes (same for every count)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench/eval.json")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. env.image_size=96")
    args = p.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    policy = load_policy(args.ckpt) if args.policy == "checkpoint" else args.policy
    runs: dict[int, list[dict]] = {w: [] for w in counts}
    outcomes = {}
    for _ in range(args.repeats):
        for w in counts:
            cfg = load_config(
                args.cfg,
                [
                    *args.overrides,
                    f"eval.workers={w}",
                    f"eval.episodes={args.episodes}",
                    f"eval.num_envs={args.num_envs}",
                ],
            )
            result = evaluate(policy, cfg.env, cfg.eval)
            runs[w].append(result.report["timing"])
            outcomes.setdefault(w, result.outcomes)
    base = statistics.median(t["episodes_per_min"] for t in runs[counts[0]]) / counts[0]
    rows = []
    cols = ("workers", "episodes/min", "best", "vs linear", "startup s", "policy share", "main cpu share")
    print("  ".join(f"{c:>14}" for c in cols))
    for w in counts:
        epm = statistics.median(t["episodes_per_min"] for t in runs[w])
        row = {
            "workers": w,
            "episodes_per_min": epm,
            "best_episodes_per_min": max(t["episodes_per_min"] for t in runs[w]),
            "scaling_vs_linear": epm / (base * w),
            "startup_s": statistics.median(t["setup_s"] for t in runs[w]),
            "policy_share": statistics.median(t["policy_s"] / t["rollout_s"] for t in runs[w]),
            "main_cpu_share": statistics.median(t["main_cpu_s"] / t["wall_s"] for t in runs[w]),
            "runs": runs[w],
        }
        rows.append(row)
        keys = list(row)[1:-1]
        print(f"{w:>14}  " + "  ".join(f"{row[k]:>14.2f}" for k in keys))
    same = all(outcomes[w] == outcomes[counts[0]] for w in counts)
    print(f"per-episode outcomes identical across worker counts: {same}")
    out = {
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
