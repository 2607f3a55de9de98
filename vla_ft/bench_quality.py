"""How learning claims are measured: ``scripts/bench_quality.py --cfg NAME --seeds 3 [--episodes 300]``.

One training run is one draw: another training seed can move the success rate by several points,
and a rate measured on the episodes that settings were chosen on is optimistic. This benchmark
trains the config's main job (``scripts/finetune.py``) once per training seed and scores every
run on episodes that no choice has seen:

* training seeds ``seed, seed + 1, ...`` (the config's top-level ``seed`` first, so seed 0 of
  pick_place.yaml is the main job itself), one run after the other, each the normal job in its own
  subprocess (alone on the machine, its memory freed when it exits), with its own config file
  ``<out>/configs/seed_<S>.yaml``. Overrides given after ``--cfg`` apply to every seed. The final
  in-run evaluation is turned off (``eval.episodes=0``) unless the config evaluates periodically
  (``train.eval_every > 0``), which then picks ``best`` on the config's own episodes;
* the demo file is collected once, before the first seed, when missing (as finetune does), and
  every seed trains on it: the seeds differ only in the training seed (data order, augmentation,
  initialization of new weights; the validation split is the file's ``mask/valid``);
* each run's ``best`` checkpoint is then scored by ``scripts/evaluate.py`` on ``--episodes``
  episodes with reset seeds ``--eval-seed + i``, the same episodes for every training seed.

Reset seeds (an episode is a function of its task and reset seed): collection uses
``collect.seed + 1_000_000 * <task index> + i`` for attempt ``i`` (vla_ft/data/collect.py;
pick_place's 600 demos come from seeds 0..1199), the config's evaluation ``eval.seed + i`` (default
100000 + i: the in-run and final evaluation every choice of settings was made on), and this
benchmark ``--eval-seed + i`` (default 200000 + i). Before training, the benchmark's range is checked
against the config's evaluation range and against the seeds recorded in the demo file(s).

Outputs in ``--out``: ``quality.json`` (command, config, git commit, machine; per seed the
successes, rate, Wilson interval and wall times; summary: mean, min, max, pooled), ``quality.md``
(the table, also printed at the end) and ``quality.png``; all three are rewritten after every
seed. A seed whose job fails stops the benchmark: its error and the tail of its log are printed and
recorded, the seeds that finished stay in the report (marked incomplete) and the exit status is 1.
Bad arguments are one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vla_ft.compare import display_command, error_line, machine_info, run_child, shared_config
from vla_ft.compare_report import fmt_duration, fmt_success, rate_error_bars, write_atomic
from vla_ft.config import REPO_ROOT, Config, config_from_dict, load_config
from vla_ft.errors import ConfigError, VLAFTError

DEFAULT_EVAL_SEED = 200_000
LOG_TAIL_LINES = 25
PREFIX = "[bench_quality]"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _seed_range(first: int, count: int) -> str:
    return f"{first}-{first + count - 1}"


def check_arguments(seeds: int, episodes: int, eval_seed: int, targets: dict[str, float | None]) -> None:
    """Raises ConfigError (one line) for arguments no run could use."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: use 1 or more training seeds")
    if episodes < 1:
        raise ConfigError(f"--episodes {episodes}: use 1 or more evaluation episodes per seed")
    if eval_seed < 0:
        raise ConfigError(f"--eval-seed {eval_seed}: reset seeds are 0 or more")
    for name, value in targets.items():
        if value is not None and not 0 <= value <= 100:
            raise ConfigError(f"--target-{name} {value:g}: give a success rate in percent, 0 to 100")


def _overlap(a: int, a_n: int, b: int, b_n: int) -> bool:
    """Do the ranges ``a .. a+a_n-1`` and ``b .. b+b_n-1`` share a seed?"""
    return a < b + b_n and b < a + a_n


def check_fresh_against_config(cfg: Config, eval_seed: int, episodes: int) -> None:
    """The benchmark's episodes may not be the config's own evaluation episodes (choices were made there)."""
    if cfg.eval.episodes and _overlap(eval_seed, episodes, cfg.eval.seed, cfg.eval.episodes):
        raise ConfigError(
            f"--eval-seed {eval_seed} --episodes {episodes}: seeds {_seed_range(eval_seed, episodes)} "
            f"overlap the config's evaluation episodes (eval.seed={cfg.eval.seed}, "
            f"{_seed_range(cfg.eval.seed, cfg.eval.episodes)}), which settings are chosen on; use a fresh "
            f"range, e.g. --eval-seed {DEFAULT_EVAL_SEED}"
        )


def demo_seeds(paths: Sequence[str]) -> list[int]:
    """Reset seeds of the demos in our own demo files (robomimic/LIBERO files record none)."""
    import h5py

    seeds: list[int] = []
    for path in paths:
        try:
            with h5py.File(path, "r") as f:
                for demo in f["data"].values() if "data" in f else ():
                    if "seed" in demo.attrs:
                        seeds.append(int(demo.attrs["seed"]))
        except OSError:
            continue  # unreadable: the training job's dataset reader names the file and the problem
    return seeds


def check_fresh_against_demos(seeds: list[int], eval_seed: int, episodes: int) -> None:
    """No evaluation episode may be a training demo."""
    inside = sorted(s for s in seeds if eval_seed <= s < eval_seed + episodes)
    if inside:
        raise ConfigError(
            f"--eval-seed {eval_seed} --episodes {episodes}: {len(inside)} demos of the training data were "
            f"collected with reset seeds in {_seed_range(eval_seed, episodes)} (e.g. {inside[0]}); use a "
            f"range above {max(seeds)}"
        )


def seed_config(shared: dict[str, Any], seed: int) -> dict[str, Any]:
    """One training seed's full config (validated): the shared config with ``seed`` and its run name."""
    values = json.loads(json.dumps(shared))  # deep copy of plain data
    values["seed"] = seed
    values["data"]["collect_if_missing"] = False  # collected once, before the first seed
    values["train"]["run_name"] = f"seed_{seed}"
    if not values["train"]["eval_every"]:
        values["eval"]["episodes"] = 0  # the final in-run evaluation: the benchmark scores best itself
    config_from_dict(values)
    return values


def eval_command(cfg_file: Path, ckpt: Path, eval_seed: int, episodes: int, out_dir: Path) -> list[str]:
    """``scripts/evaluate.py`` on ``ckpt`` with the benchmark's episodes (the seed's config otherwise)."""
    return [
        sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), "--cfg", str(cfg_file),
        "--ckpt", str(ckpt), f"eval.seed={eval_seed}", f"eval.episodes={episodes}", f"eval.out_dir={out_dir}",
    ]  # fmt: skip


def _log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _fail(res: dict[str, Any], stage: str, code: int | None, error: str, log: Path) -> dict[str, Any]:
    res.update(status="failed", stage=stage, exit_code=code, error=error, failed_log=str(log))
    res["log_tail"] = _log_tail(log)
    return res


def run_seed(seed: int, values: dict[str, Any], out: Path, eval_seed: int, episodes: int) -> dict[str, Any]:
    """Train one seed, then score its ``best`` checkpoint on the fresh episodes; the seed's record."""
    name = f"seed_{seed}"
    cfg_file = write_atomic(out / "configs" / f"{name}.yaml", yaml.safe_dump(values, sort_keys=False))
    run_dir = out / "runs" / name
    train_log, eval_log = out / "logs" / f"{name}-train.log", out / "logs" / f"{name}-eval.log"
    train_cmd = [sys.executable, str(REPO_ROOT / "scripts" / "finetune.py"), "--cfg", str(cfg_file)]
    res: dict[str, Any] = {
        "seed": seed, "status": "running", "config": str(cfg_file), "run_dir": str(run_dir),
        "train_command": display_command(train_cmd), "train_log": str(train_log),
    }  # fmt: skip
    print(f"{PREFIX}   training: {res['train_command']}", flush=True)
    code, res["train_wall_s"], res["train_peak_rss_mb"] = run_child(train_cmd, train_log)
    if code != 0:
        return _fail(res, "train", code, error_line(train_log), train_log)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        ckpt = (run_dir / "best").resolve(strict=True)
    except (OSError, ValueError) as exc:
        why = f"the training job exited 0 but left no summary.json or best checkpoint ({type(exc).__name__}: {exc})"
        return _fail(res, "train", code, why, train_log)
    res.update(
        steps=summary.get("steps"),
        device=summary.get("device"),
        train_s=summary.get("timing", {}).get("train_s"),
        checkpoint=str(ckpt.relative_to(run_dir.resolve())),
    )

    eval_dir = run_dir / "eval" / f"fresh_{_seed_range(eval_seed, episodes)}"
    cmd = eval_command(cfg_file, run_dir / "best", eval_seed, episodes, eval_dir)
    res.update(eval_command=display_command(cmd), eval_log=str(eval_log), eval_dir=str(eval_dir))
    print(f"{PREFIX}   evaluating {res['checkpoint']}: {res['eval_command']}", flush=True)
    code, res["eval_wall_s"], _ = run_child(cmd, eval_log)
    res["total_wall_s"] = res["train_wall_s"] + res["eval_wall_s"]
    if code != 0:
        return _fail(res, "eval", code, error_line(eval_log), eval_log)
    try:
        report = json.loads((eval_dir / "eval.json").read_text())
        o = report["overall"]
        seeds = sorted(e["seed"] for e in report["episodes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = f"the evaluation exited 0 but its eval.json is unreadable ({type(exc).__name__}: {exc})"
        return _fail(res, "eval", code, why, eval_log)
    expected = list(range(eval_seed, eval_seed + episodes))
    if seeds != expected:
        why = f"the evaluation ran reset seeds {seeds[:1]}..{seeds[-1:]}, not {_seed_range(eval_seed, episodes)}"
        return _fail(res, "eval", code, why, eval_log)
    res.update(
        status="ok",
        successes=o["successes"],
        episodes=o["episodes"],
        success_rate=o["success_rate"],
        ci95=list(o["ci95"]),
        eval_seeds=[eval_seed, eval_seed + episodes - 1],
        eval_s=report.get("timing", {}).get("wall_s"),
    )
    return res


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(
    seeds: list[dict[str, Any]], targets: dict[str, float | None], complete: bool
) -> dict[str, Any]:
    """Mean, min, max and pooled success over the finished seeds, mean walls, and the target verdicts."""
    from vla_ft.eval.scoring import wilson_interval

    done = [s for s in seeds if s["status"] == "ok"]
    out: dict[str, Any] = {"seeds_done": len(done), "seeds_planned": len(seeds)}
    if not done:
        return {**out, "mean_rate": None, "min_rate": None, "max_rate": None, "pooled": None, "targets": {}}
    rates = [s["success_rate"] for s in done]
    mean = _mean(rates)
    lo, hi = min(done, key=lambda s: s["success_rate"]), max(done, key=lambda s: s["success_rate"])
    k, n = sum(s["successes"] for s in done), sum(s["episodes"] for s in done)
    sd = math.sqrt(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1)) if len(rates) > 1 else None
    out.update(
        mean_rate=mean,
        sd_rate=sd,  # sample standard deviation over seeds (None for one seed)
        min_rate=lo["success_rate"],
        min_seed=lo["seed"],
        max_rate=hi["success_rate"],
        max_seed=hi["seed"],
        pooled={"successes": k, "episodes": n, "success_rate": k / n, "ci95": list(wilson_interval(k, n))},
        mean_train_wall_s=_mean([s["train_wall_s"] for s in done]),
        mean_eval_wall_s=_mean([s["eval_wall_s"] for s in done]),
        mean_total_wall_s=_mean([s["total_wall_s"] for s in done]),
    )
    verdicts = {}
    for name, target in targets.items():
        if target is not None:
            value = out[f"{name}_rate"]
            # judged only on a complete run; 1e-9: 0.29 * 100 is 28.999999999999996
            ok = 100 * value >= target - 1e-9 if complete else None
            verdicts[name] = {"target_pct": target, "value": value, "pass": ok}
    out["targets"] = verdicts
    return out


def build_report(
    meta: dict[str, Any], seeds: list[dict[str, Any]], targets: dict[str, float | None]
) -> dict[str, Any]:
    """The ``quality.json`` content."""
    complete = all(s["status"] == "ok" for s in seeds)
    return {
        **meta,
        "complete": complete,
        "failed": [s["seed"] for s in seeds if s["status"] == "failed"],
        "seeds": seeds,
        "summary": summarize(seeds, targets, complete),
    }


def _verdict(v: dict[str, Any] | None, what: str) -> str:
    if v is None:
        return ""
    word = "n/a (incomplete)" if v["pass"] is None else ("**PASS**" if v["pass"] else "**FAIL**")
    return f"{word}: {what} >= {v['target_pct']:g}%"


def render_markdown(report: dict[str, Any]) -> str:
    """``quality.md``: what ran on what, one row per training seed, then mean / min / max / pooled rows."""
    s, m, setup = report["summary"], report["machine"], report["setup"]
    ev, data = setup["eval"], setup["data"]
    devices = sorted({r["device"] for r in report["seeds"] if r.get("device")})
    seeds_txt = ", ".join(str(x) for x in setup["training_seeds"])
    demo_txt = (
        f"{data['demos']} demos, reset seeds {data['demo_seeds'][0]}-{data['demo_seeds'][1]}"
        if data.get("demo_seeds")
        else "reset seeds not recorded in the file"
    )
    choice = (
        f"the config's own evaluation, on which settings were chosen, uses seeds "
        f"{_seed_range(setup['config_eval']['seed'], setup['config_eval']['episodes'])}"
        if setup["config_eval"]["episodes"]
        else "the config has no evaluation episodes of its own"
    )
    status = (
        f"complete ({s['seeds_done']} of {s['seeds_planned']} seeds)"
        if report["complete"]
        else f"**INCOMPLETE**: {s['seeds_done']} of {s['seeds_planned']} seeds finished; failed: "
        + (", ".join(f"seed {x}" for x in report["failed"]) or "-")
    )
    lines = [
        f"# Success over training seeds: {report['config']}",
        "",
        f"- command: `{report['command']}`",
        f"- config: `{report['config']}`, git commit `{report['git_commit']}`, {report['created']}",
        f"- machine: {m['platform']}, {m['cpus']} CPUs, {m['processor']}; Python {m['python']}, torch "
        f"{m['torch']}; training device {', '.join(devices) or '-'}",
        f"- training: the config's main job (`scripts/finetune.py`), {setup['train.steps']} steps at batch "
        f"{setup['train.batch_size']}, once per training seed (`seed` = {seeds_txt}), one run after the "
        f"other, each alone in its own process",
        f"- data: one demo file for every seed ({', '.join(f'`{p}`' for p in data['paths'])}; {demo_txt}), "
        f"collected once: the seeds differ only in the training seed",
        f"- evaluation: each run's `best` checkpoint on {ev['episodes']} fresh episodes, reset seeds "
        f"{ev['seeds'][0]}-{ev['seeds'][1]}, the same for every seed and never used for a choice ({choice})",
        f"- status: {status}",
        "",
    ]
    targets = s.get("targets") or {}
    cols = ["training seed", "success (95% Wilson CI)", "best checkpoint", "train", "eval", "total"]
    cols += ["target"] if targets else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["seeds"]:
        if r["status"] == "ok":
            cells = [str(r["seed"]), fmt_success(r), f"`{r['checkpoint']}`"]
            cells += [fmt_duration(r[k]) for k in ("train_wall_s", "eval_wall_s", "total_wall_s")]
        elif r["status"] == "failed":
            error = str(r["error"]).replace("|", "/")
            cells = [str(r["seed"]), f"FAILED in {r['stage']} (exit {r['exit_code']}): {error}", "-"]
            cells += [fmt_duration(r.get(k)) for k in ("train_wall_s", "eval_wall_s", "total_wall_s")]
        else:
            cells = [str(r["seed"]), "not run", "-", "-", "-", "-"]
        lines.append("| " + " | ".join(cells + ([""] if targets else [])) + " |")
    if s["seeds_done"]:
        p = s["pooled"]
        sd = f", sd {100 * s['sd_rate']:.1f} points" if s.get("sd_rate") is not None else ""
        walls = [fmt_duration(s[f"mean_{k}_wall_s"]) for k in ("train", "eval", "total")]
        agg = [
            (f"**mean** of {s['seeds_done']}", f"{_pct(s['mean_rate'])}{sd}", walls, "mean"),
            ("**min**", f"{_pct(s['min_rate'])} (seed {s['min_seed']})", ["", "", ""], "min"),
            ("**max**", f"{_pct(s['max_rate'])} (seed {s['max_seed']})", ["", "", ""], None),
            ("**pooled**", fmt_success(p), ["", "", ""], None),
        ]
        for label, value, w, target in agg:
            cells = [label, value, "", *w]
            cells += [_verdict(targets.get(target), target)] if targets else []
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Success: successes / episodes with the 95% Wilson interval. mean / min / max: over the "
        "training seeds' rates (sd: their sample standard deviation); pooled: all seeds' episodes "
        "together, whose interval is about the config's average run, not about one run. train: wall "
        "time of the whole training job (start-up, data, fit, checkpoints); eval: of the evaluation job.",
    ]
    failed = [r for r in report["seeds"] if r["status"] == "failed"]
    for r in failed:
        lines += [
            "",
            f"Seed {r['seed']} failed in {r['stage']} (log: `{r['failed_log']}`), last lines:",
            "```",
        ]
        lines += r["log_tail"] + ["```"]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> Path:
    """``quality.png``: each seed's rate with its 95% CI, a line at the mean (and at the targets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = report["seeds"], report["summary"]
    x = list(range(len(rows)))
    rate, low, high = rate_error_bars(rows)
    ok = [r["status"] == "ok" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(rows) + 3), 4.2), layout="constrained")
    xs = [i for i in x if ok[i]]
    ax.errorbar(
        xs, [rate[i] for i in xs], yerr=[[low[i] for i in xs], [high[i] for i in xs]], fmt="o", capsize=5,
        color="tab:blue", label="seed (95% Wilson CI)",
    )  # fmt: skip
    if s["mean_rate"] is not None:
        ax.axhline(100 * s["mean_rate"], color="tab:orange", label=f"mean {_pct(s['mean_rate'])}")
    for name, v in (s.get("targets") or {}).items():
        style = "--" if name == "mean" else ":"
        ax.axhline(v["target_pct"], color="gray", ls=style, lw=1, label=f"target {name} {v['target_pct']:g}%")
    for i, r in enumerate(rows):
        if not ok[i]:  # x in data units, y in axes units: mid-height whatever the range
            ax.text(i, 0.5, r["status"], ha="center", va="center", transform=ax.get_xaxis_transform())
    ax.set_xticks(x)
    labels = [f"seed {r['seed']}" for r in rows]
    for i in xs:
        labels[i] += f"\n{rows[i]['successes']}/{rows[i]['episodes']} = {rate[i]:.1f}%"
    ax.set_xticklabels(labels)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    # the y axis starts at a multiple of 10 at least 5 points below the lowest interval (or at 0)
    lows = [rate[i] - low[i] for i in xs] + [v["target_pct"] for v in (s.get("targets") or {}).values()]
    ax.set_ylim(max(0.0, 10 * math.floor((min(lows, default=0.0) - 5) / 10)), 102)
    ax.set_ylabel("success rate (%)")
    ev = report["setup"]["eval"]
    ax.set_title(
        f"{report['config']}: {ev['episodes']} fresh episodes per seed ({ev['seeds'][0]}-{ev['seeds'][1]})"
    )
    ax.legend(loc="lower right", fontsize=8)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_outputs(report: dict[str, Any], out: Path) -> str:
    """Write quality.json, quality.md and quality.png; returns the markdown."""
    write_atomic(out / "quality.json", json.dumps(report, indent=1))
    md = render_markdown(report)
    write_atomic(out / "quality.md", md)
    render_plot(report, out / "quality.png")
    return md


def run_bench(
    cfg: Config,
    seeds: int = 3,
    episodes: int = 300,
    eval_seed: int = DEFAULT_EVAL_SEED,
    out: str | Path | None = None,
    targets: dict[str, float | None] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """Run the benchmark (see the module docstring); returns the exit status (1: a seed failed).

    Raises:
        ConfigError: bad arguments, a used output directory, evaluation seeds that are not fresh, or
            a per-seed config that does not validate; all before any training.
    """
    targets = {"mean": None, "min": None, **(targets or {})}
    check_arguments(seeds, episodes, eval_seed, targets)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out or Path(cfg.train.out_dir) / "bench_quality" / f"{cfg.name}-{stamp}").resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} is not a new or empty directory: give a new one (runs would mix)")
    check_fresh_against_config(cfg, eval_seed, episodes)
    shared = shared_config(cfg, out, None, None)
    plans = [(cfg.seed + i, seed_config(shared, cfg.seed + i)) for i in range(seeds)]

    from vla_ft.eval.report import git_commit  # these import torch: after the argument checks
    from vla_ft.train.finetune import ensure_data

    shared_cfg = config_from_dict(shared)
    ensure_data(shared_cfg)  # collect once (if missing and allowed), before any seed
    recorded = demo_seeds(shared_cfg.data.paths)
    check_fresh_against_demos(recorded, eval_seed, episodes)

    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    paths = shared["data"]["paths"]
    meta = {
        "command": shlex.join(argv) if argv else None,
        "config": shared["name"],
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "setup": {
            "training_seeds": [s for s, _ in plans],
            "seed_key": "seed",
            "train.steps": shared["train"]["steps"],
            "train.batch_size": shared["train"]["batch_size"],
            "in_run_eval": "periodic (train.eval_every)" if shared["train"]["eval_every"] else "off",
            "data": {
                "paths": paths,
                "bytes": [Path(p).stat().st_size for p in paths],
                "demos": len(recorded) or None,
                "demo_seeds": [min(recorded), max(recorded)] if recorded else None,
                "shared": "one demo file, collected once; the seeds differ only in the training seed",
            },
            "eval": {"seed": eval_seed, "episodes": episodes, "seeds": [eval_seed, eval_seed + episodes - 1]},
            "config_eval": {"seed": cfg.eval.seed, "episodes": cfg.eval.episodes},
        },
    }
    results: list[dict[str, Any]] = [{"seed": s, "status": "not run"} for s, _ in plans]
    failed = None
    for i, (seed, values) in enumerate(plans):
        print(f"{PREFIX} seed {seed} ({i + 1}/{len(plans)})", flush=True)
        results[i] = res = run_seed(seed, values, out, eval_seed, episodes)
        if res["status"] == "ok":
            print(
                f"{PREFIX}   seed {seed}: {fmt_success(res)}, train {fmt_duration(res['train_wall_s'])}, "
                f"eval {fmt_duration(res['eval_wall_s'])}",
                flush=True,
            )
        else:
            failed = res
        write_outputs(build_report(meta, results, targets), out)  # what finished survives a later crash
        if failed:
            break
    md = (out / "quality.md").read_text()
    print(md)
    print(f"{PREFIX} wrote {out / 'quality.md'}, quality.json and quality.png")
    if failed:
        print(
            f"{PREFIX} seed {failed['seed']} failed in {failed['stage']} (exit {failed['exit_code']}): "
            f"{failed['error']}\n--- last lines of {failed['failed_log']} ---\n"
            + "\n".join(failed["log_tail"]),
            file=sys.stderr,
        )
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_quality",
        description=(
            "Train a config's main job once per training seed (each alone, one after the other) and score "
            "each run's best checkpoint on fresh episodes; writes quality.md/.json/.png and prints the "
            "table. Exit 1 if a seed's job failed, 2 on bad arguments."
        ),
    )
    p.add_argument(
        "--cfg", required=True, help="config YAML: a path, or a bare name in configs/ (pick_place.yaml)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides for every seed, e.g. train.steps=500",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="number of training seeds: the config's seed, seed+1, ... (default: %(default)s)",
    )
    p.add_argument(
        "--episodes", type=int, default=300, help="fresh evaluation episodes per seed (default: %(default)s)"
    )
    p.add_argument(
        "--eval-seed",
        type=int,
        default=DEFAULT_EVAL_SEED,
        help=(
            "reset seed of the first evaluation episode (episode i: eval-seed + i; default: %(default)s). "
            "Collection uses collect.seed + 1000000 * <task index> + i (pick_place's 600 demos: 0-1199); "
            "the config's own evaluation, which choices were made on, eval.seed + i (default 100000 + i). "
            "Both are checked to be disjoint from this range"
        ),
    )
    p.add_argument(
        "--out", help="output directory, new or empty (default: <train.out_dir>/bench_quality/<name>-<time>)"
    )
    p.add_argument(
        "--target-mean", type=float, help="mark the mean rate PASS/FAIL against this percent (e.g. 90)"
    )
    p.add_argument(
        "--target-min", type=float, help="mark the lowest seed's rate PASS/FAIL against this percent"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/bench_quality.py``: user errors are one line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_intermixed_args(argv)
    targets = {"mean": args.target_mean, "min": args.target_min}
    try:
        check_arguments(args.seeds, args.episodes, args.eval_seed, targets)
        cfg = load_config(args.cfg, args.overrides)
        return run_bench(
            cfg, args.seeds, args.episodes, args.eval_seed, args.out, targets,
            argv=["python", "scripts/bench_quality.py", *argv],
        )  # fmt: skip
    except VLAFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
