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

With ``--generalization`` each ``best`` checkpoint is also scored on the same reset seeds with
``env.goals=held_out`` (only the task's held-out (color, color) combinations, envs/tasks.py) and with
``env.instructions=paraphrase`` (wordings never in the demos; the layouts and goals are those of the
main evaluation, only the wording differs). Held-out combinations are only held out when the
config collects with ``collect.goals: seen`` (configs/pick_place_heldout.yaml: ordered pairs whose
reverse is in the demos) or ``seen_sets`` (configs/pick_place_heldout_sets.yaml: color sets never
named together; scored with ``env.goals=held_out_sets``); with ``collect.goals: all`` the report
header carries a warning, and it counts the demos of the file(s) that are held-out combinations.
``--target-heldout`` / ``--target-paraphrase`` judge the mean rate of those evaluations.

Reset seeds (an episode is a function of its task and reset seed): collection uses
``collect.seed + 1_000_000 * <task index> + i`` for attempt ``i`` (vla_ft/data/collect.py;
pick_place's 600 demos come from seeds 0..1199), the config's evaluation ``eval.seed + i`` (default
100000 + i: the in-run and final evaluation every choice of settings was made on), and this
benchmark ``--eval-seed + i`` (default 200000 + i). Before training, the benchmark's range is checked
against the config's evaluation range and against the seeds recorded in the demo file(s).

Outputs in ``--out``: ``quality.json`` (command, config, git commit, machine; per seed the
successes, rate, Wilson interval and wall times, and with ``--generalization`` a ``generalization``
record per kind; summary: mean, min, max, pooled, the same per kind), ``quality.md``
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

from vla_ft.compare.report import fmt_duration, fmt_success, rate_error_bars
from vla_ft.compare.rows import shared_config
from vla_ft.compare.run import display_command, error_line, run_child
from vla_ft.config import REPO_ROOT, Config, config_from_dict, load_config
from vla_ft.errors import ConfigError, VLAFTError
from vla_ft.io import write_atomic
from vla_ft.provenance import git_commit, machine_info

DEFAULT_EVAL_SEED = 200_000
LOG_TAIL_LINES = 25
PREFIX = "[bench_quality]"
# --generalization: evaluation kind -> (the override it adds to the seed's config, its table column).
# The held-out goal set follows the split the demos were collected on (``held_out_goals``)
GENERALIZATION = {
    "held_out": ("env.goals=held_out", "held-out combinations"),
    "paraphrase": ("env.instructions=paraphrase", "paraphrases"),
}
# collect.goals -> the split it holds out (envs/tasks.py GOAL_SPLITS) and the goal set scoring it
SPLIT_OF_COLLECTION = {"seen_sets": ("sets", "held_out_sets")}
# target name (--target-<name>) -> the generalization kind whose mean rate it judges
GENERALIZATION_TARGETS = {"heldout": "held_out", "paraphrase": "paraphrase"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _seed_range(first: int, count: int) -> str:
    return f"{first}-{first + count - 1}"


def check_arguments(
    seeds: int,
    episodes: int,
    eval_seed: int,
    targets: dict[str, float | None],
    generalization: bool = False,
) -> None:
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
        if value is not None and name in GENERALIZATION_TARGETS and not generalization:
            raise ConfigError(
                f"--target-{name} {value:g} judges the {GENERALIZATION[GENERALIZATION_TARGETS[name]][1]} "
                f"evaluation: add --generalization"
            )


def held_out_goals(cfg: Config) -> tuple[str, str]:
    """(split, env.goals value) the held-out evaluation uses: the color sets when the demos were
    collected with ``collect.goals: seen_sets``, else the ordered pairs (``held_out``)."""
    return SPLIT_OF_COLLECTION.get(cfg.collect.goals, ("pairs", "held_out"))


def generalization_overrides(cfg: Config) -> dict[str, str]:
    """Generalization kind -> the override its evaluation adds to the seed's config."""
    overrides = {kind: override for kind, (override, _) in GENERALIZATION.items()}
    overrides["held_out"] = f"env.goals={held_out_goals(cfg)[1]}"
    return overrides


def check_generalization(cfg: Config) -> None:
    """``--generalization`` needs a task of this suite with held-out combinations, and a main
    evaluation that is not already on the held-out goals or the paraphrases."""
    if cfg.env.type != "vla_ft":
        raise ConfigError(
            f"--generalization: env.type={cfg.env.type!r} ({cfg.env.gym_id}) has no held-out combinations "
            f"or paraphrases; use a task of this suite (env.type=vla_ft)"
        )
    from envs.tasks import TASKS

    split, goals = held_out_goals(cfg)
    with_held_out = ", ".join(name for name, t in TASKS.items() if t.has_split(split))
    if cfg.env.task not in TASKS or not TASKS[cfg.env.task].has_split(split):
        what = "has no held-out combinations" if cfg.env.task in TASKS else "is not a task of this suite"
        raise ConfigError(
            f"--generalization: env.task={cfg.env.task!r} {what} (tasks with held-out combinations: "
            f"{with_held_out}); drop --generalization or score one of those"
        )
    for key, value in (("goals", goals), ("instructions", "paraphrase")):
        if getattr(cfg.env, key) == value:
            raise ConfigError(
                f"--generalization compares env.{key}={value} with the main evaluation, which the config "
                f"already runs with env.{key}={value}: set it back to the default"
            )


def held_out_demos(paths: Sequence[str], split: str = "pairs") -> tuple[int, int] | None:
    """(demos whose goal is a held-out combination of ``split``, demos read) over our own demo files,
    or None when none of them records per-demo states of a task of this suite (robomimic/LIBERO files)."""
    import h5py

    from envs.env import is_held_out_state
    from envs.tasks import TASKS

    held = total = 0
    for path in paths:
        try:
            with h5py.File(path, "r") as f:
                for demo in f["data"].values() if "data" in f else ():
                    task = demo.attrs.get("task")
                    task = task.decode() if isinstance(task, bytes) else task
                    if task not in TASKS or "states" not in demo:
                        continue
                    total += 1
                    held += is_held_out_state(task, demo["states"][0], split)
        except OSError:
            continue  # unreadable: the training job's dataset reader names the file and the problem
    return (held, total) if total else None


def generalization_setup(cfg: Config, paths: Sequence[str]) -> dict[str, Any]:
    """What ``--generalization`` adds to the report header: the overrides, how the demos were
    collected, and warnings when the held-out combinations were not held out of them."""
    from envs.tasks import TASKS

    split, goals = held_out_goals(cfg)
    counted = held_out_demos(paths, split)
    warnings = []
    if cfg.collect.goals == "all":
        warnings.append(
            f"the config collects its demos with collect.goals={cfg.collect.goals}: the held-out "
            f"combinations are in its training data, so the held-out rate is not a generalization "
            f"measure; use a config that collects with collect.goals: seen or seen_sets (e.g. "
            f"pick_place_heldout.yaml)"
        )
    if counted and counted[0]:
        warnings.append(
            f"{counted[0]} of the {counted[1]} demos in the data file(s) are held-out combinations "
            f"(collected with goals: all?)"
        )
    return {
        "kinds": generalization_overrides(cfg),
        "collect_goals": cfg.collect.goals,
        "split": split,
        "held_out_pairs": sorted(f"{a}/{b}" for a, b in TASKS[cfg.env.task].held_out_pairs(split)),
        "held_out_demos": list(counted) if counted else None,
        "warnings": warnings,
    }


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


def eval_command(
    cfg_file: Path, ckpt: Path, eval_seed: int, episodes: int, out_dir: Path, overrides: Sequence[str] = ()
) -> list[str]:
    """``scripts/evaluate.py`` on ``ckpt`` with the benchmark's episodes (the seed's config otherwise,
    plus ``overrides``: ``env.goals=held_out`` for a generalization evaluation)."""
    return [
        sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), "--cfg", str(cfg_file),
        "--ckpt", str(ckpt), f"eval.seed={eval_seed}", f"eval.episodes={episodes}", f"eval.out_dir={out_dir}",
        *overrides,
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


def score_checkpoint(
    cfg_file: Path,
    ckpt: Path,
    eval_seed: int,
    episodes: int,
    eval_dir: Path,
    log: Path,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """One evaluation job on the benchmark's episodes; its record (``status`` ok or failed).

    The main evaluation and each ``--generalization`` one go through here, so they run, time and
    check their episodes the same way.
    """
    cmd = eval_command(cfg_file, ckpt, eval_seed, episodes, eval_dir, overrides)
    rec: dict[str, Any] = {
        "eval_command": display_command(cmd),
        "eval_log": str(log),
        "eval_dir": str(eval_dir),
    }
    print(f"{PREFIX}   evaluating: {rec['eval_command']}", flush=True)
    code, rec["eval_wall_s"], _ = run_child(cmd, log)
    rec["exit_code"] = code
    if code != 0:
        return {**rec, "status": "failed", "error": error_line(log)}
    try:
        report = json.loads((eval_dir / "eval.json").read_text())
        o = report["overall"]
        seeds = sorted(e["seed"] for e in report["episodes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = f"the evaluation exited 0 but its eval.json is unreadable ({type(exc).__name__}: {exc})"
        return {**rec, "status": "failed", "error": why}
    n_tasks = len(report.get("manifest", {}).get("tasks") or [None])  # env.tasks: each seed once per task
    if seeds != sorted(list(range(eval_seed, eval_seed + episodes)) * n_tasks):
        why = f"the evaluation ran reset seeds {seeds[:1]}..{seeds[-1:]}, not {_seed_range(eval_seed, episodes)}"
        return {**rec, "status": "failed", "error": why}
    return {
        **rec,
        "status": "ok",
        "successes": o["successes"],
        "episodes": o["episodes"],
        "success_rate": o["success_rate"],
        "ci95": list(o["ci95"]),
        "eval_seeds": [eval_seed, eval_seed + episodes - 1],
        "eval_s": report.get("timing", {}).get("wall_s"),
    }


def run_seed(
    seed: int,
    values: dict[str, Any],
    out: Path,
    eval_seed: int,
    episodes: int,
    generalization: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train one seed, then score its ``best`` checkpoint on the fresh episodes (and, with
    ``generalization`` (kind -> override, ``generalization_overrides``), on them again with each
    override); the seed's record.

    ``eval_wall_s`` is the wall time of all the seed's evaluation jobs together; each generalization
    record has its own.
    """
    name = f"seed_{seed}"
    cfg_file = write_atomic(out / "configs" / f"{name}.yaml", yaml.safe_dump(values, sort_keys=False))
    run_dir = out / "runs" / name
    train_log = out / "logs" / f"{name}-train.log"
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
    print(f"{PREFIX}   scoring {res['checkpoint']}", flush=True)

    fresh = f"fresh_{_seed_range(eval_seed, episodes)}"
    jobs = [("eval", run_dir / "eval" / fresh, out / "logs" / f"{name}-eval.log", ())]
    if generalization:
        res["generalization"] = {}
        jobs += [
            (
                kind,
                run_dir / "eval" / f"{fresh}_{kind}",
                out / "logs" / f"{name}-eval-{kind}.log",
                (override,),
            )
            for kind, override in generalization.items()
        ]
    walls = 0.0
    for kind, eval_dir, log, overrides in jobs:
        rec = score_checkpoint(cfg_file, run_dir / "best", eval_seed, episodes, eval_dir, log, overrides)
        status, code, error = rec.pop("status"), rec.pop("exit_code"), rec.pop("error", None)
        walls += rec["eval_wall_s"]
        if kind == "eval":
            res.update(rec)
        else:
            res["generalization"][kind] = rec
        res["eval_wall_s"], res["total_wall_s"] = walls, res["train_wall_s"] + walls
        if status != "ok":
            stage = "eval" if kind == "eval" else f"eval {kind}"
            return _fail(res, stage, code, error, log)
    res["status"] = "ok"
    return res


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def rate_summary(records: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Mean (and sample sd), min, max and pooled success of ``(training seed, evaluation record)`` pairs."""
    from vla_ft.eval.scoring import wilson_interval

    rates = [r["success_rate"] for _, r in records]
    mean = _mean(rates)
    lo = min(records, key=lambda sr: sr[1]["success_rate"])
    hi = max(records, key=lambda sr: sr[1]["success_rate"])
    k, n = sum(r["successes"] for _, r in records), sum(r["episodes"] for _, r in records)
    sd = math.sqrt(sum((x - mean) ** 2 for x in rates) / (len(rates) - 1)) if len(rates) > 1 else None
    return {
        "mean_rate": mean,
        "sd_rate": sd,  # sample standard deviation over seeds (None for one seed)
        "min_rate": lo[1]["success_rate"],
        "min_seed": lo[0],
        "max_rate": hi[1]["success_rate"],
        "max_seed": hi[0],
        "pooled": {"successes": k, "episodes": n, "success_rate": k / n, "ci95": list(wilson_interval(k, n))},
    }


def summarize(
    seeds: list[dict[str, Any]],
    targets: dict[str, float | None],
    complete: bool,
    kinds: Sequence[str] = (),
) -> dict[str, Any]:
    """Mean, min, max and pooled success over the finished seeds (and per generalization ``kinds``),
    mean walls, and the target verdicts."""
    done = [s for s in seeds if s["status"] == "ok"]
    out: dict[str, Any] = {"seeds_done": len(done), "seeds_planned": len(seeds)}
    if kinds:
        out["generalization"] = {
            kind: rate_summary([(s["seed"], s["generalization"][kind]) for s in done]) if done else None
            for kind in kinds
        }
    if not done:
        return {**out, "mean_rate": None, "min_rate": None, "max_rate": None, "pooled": None, "targets": {}}
    out.update(
        rate_summary([(s["seed"], s) for s in done]),
        mean_train_wall_s=_mean([s["train_wall_s"] for s in done]),
        mean_eval_wall_s=_mean([s["eval_wall_s"] for s in done]),
        mean_total_wall_s=_mean([s["total_wall_s"] for s in done]),
    )
    verdicts = {}
    for name, target in targets.items():
        if target is not None:
            kind = GENERALIZATION_TARGETS.get(name)
            value = out["generalization"][kind]["mean_rate"] if kind else out[f"{name}_rate"]
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
    kinds = list((meta["setup"].get("generalization") or {}).get("kinds", {}))
    return {
        **meta,
        "complete": complete,
        "failed": [s["seed"] for s in seeds if s["status"] == "failed"],
        "seeds": seeds,
        "summary": summarize(seeds, targets, complete, kinds),
    }


TARGET_LABELS = {"mean": "mean", "min": "min", "heldout": "held-out mean", "paraphrase": "paraphrase mean"}


def _mean_cell(x: dict[str, Any]) -> str:
    sd = f", sd {100 * x['sd_rate']:.1f} points" if x.get("sd_rate") is not None else ""
    return f"{_pct(x['mean_rate'])}{sd}"


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
    ]
    gen_setup = setup.get("generalization")
    if gen_setup:
        counted = gen_setup.get("held_out_demos")
        demos = f"; {counted[0]} of the {counted[1]} demos are held-out combinations" if counted else ""
        lines.append(
            f"- generalization: the same checkpoints on the same reset seeds with "
            f"`{gen_setup['kinds']['held_out']}` (only the held-out (named color / destination color) "
            f"combinations{' (color sets never named together in the demos)' if gen_setup.get('split') == 'sets' else ''}: "
            f"{', '.join(gen_setup['held_out_pairs'])}) and with `env.instructions=paraphrase` (wordings "
            f"never in the demos; same layouts and goals as the main evaluation); demos collected with "
            f"`collect.goals: {gen_setup['collect_goals']}`{demos}"
        )
        lines += [f"- **warning**: {w}" for w in gen_setup["warnings"]]
    lines.append("")
    kinds = list(s.get("generalization") or {})
    targets = s.get("targets") or {}
    cols = ["training seed", "success (95% Wilson CI)", *(GENERALIZATION[k][1] for k in kinds)]
    cols += ["best checkpoint", "train", "eval", "total"] + (["target"] if targets else [])
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["seeds"]:
        gen = r.get("generalization") or {}
        gen_cells = [fmt_success(gen.get(k, {})) for k in kinds]
        walls = [fmt_duration(r.get(k)) for k in ("train_wall_s", "eval_wall_s", "total_wall_s")]
        if r["status"] == "ok":
            cells = [str(r["seed"]), fmt_success(r), *gen_cells, f"`{r['checkpoint']}`", *walls]
        elif r["status"] == "failed":
            error = str(r["error"]).replace("|", "/")
            failed = f"FAILED in {r['stage']} (exit {r['exit_code']}): {error}"
            cells = [str(r["seed"]), failed, *gen_cells, "-", *walls]
        else:
            cells = [str(r["seed"]), "not run", *["-"] * len(kinds), "-", "-", "-", "-"]
        lines.append("| " + " | ".join(cells + ([""] if targets else [])) + " |")
    if s["seeds_done"]:
        g = s.get("generalization") or {}
        walls = [fmt_duration(s[f"mean_{k}_wall_s"]) for k in ("train", "eval", "total")]
        agg = [
            (f"**mean** of {s['seeds_done']}", _mean_cell, walls, ("mean", "heldout", "paraphrase")),
            ("**min**", lambda x: f"{_pct(x['min_rate'])} (seed {x['min_seed']})", ["", "", ""], ("min",)),
            ("**max**", lambda x: f"{_pct(x['max_rate'])} (seed {x['max_seed']})", ["", "", ""], ()),
            ("**pooled**", lambda x: fmt_success(x["pooled"]), ["", "", ""], ()),
        ]
        for label, value, w, names in agg:
            cells = [label, value(s), *(value(g[k]) for k in kinds), "", *w]
            if targets:
                cells.append("; ".join(_verdict(targets[n], TARGET_LABELS[n]) for n in names if n in targets))
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Success: successes / episodes with the 95% Wilson interval. mean / min / max: over the "
        "training seeds' rates (sd: their sample standard deviation); pooled: all seeds' episodes "
        "together, whose interval is about the config's average run, not about one run. train: wall "
        "time of the whole training job (start-up, data, fit, checkpoints); eval: of the evaluation job"
        + (" and the generalization ones, together." if kinds else "."),
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
    """``quality.png``: each seed's rate with its 95% CI, a line at the mean (and at the targets); with
    ``--generalization`` the held-out and paraphrase rates sit beside it, each with its mean line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = report["seeds"], report["summary"]
    x = list(range(len(rows)))
    ok = [r["status"] == "ok" for r in rows]
    xs = [i for i in x if ok[i]]
    gen = s.get("generalization") or {}
    # (records per seed, label, color, summary): the main evaluation, then one per generalization kind
    series = [(rows, "main evaluation (95% CI)" if gen else "seed (95% Wilson CI)", "tab:blue", s)]
    for kind, color in zip(gen, ("tab:green", "tab:purple"), strict=False):
        records = [(r.get("generalization") or {}).get(kind, {}) for r in rows]
        series.append((records, f"{GENERALIZATION[kind][1]} (95% CI)", color, gen[kind]))
    width = 0.22 if len(series) > 1 else 0.0
    fig, ax = plt.subplots(
        figsize=(max(5.0, (1.0 + 0.6 * (len(series) - 1)) * len(rows) + 3), 4.2), layout="constrained"
    )
    lows = [v["target_pct"] for v in (s.get("targets") or {}).values()]
    for j, (records, label, color, summary) in enumerate(series):
        rate, low, high = rate_error_bars(records)
        dx = (j - (len(series) - 1) / 2) * width
        ax.errorbar(
            [i + dx for i in xs], [rate[i] for i in xs], yerr=[[low[i] for i in xs], [high[i] for i in xs]],
            fmt="o", capsize=5, color=color, label=label,
        )  # fmt: skip
        lows += [rate[i] - low[i] for i in xs]
        if summary and summary["mean_rate"] is not None:
            name = "mean" if j == 0 else f"{label.split(' (')[0]} mean"
            ax.axhline(
                100 * summary["mean_rate"], color="tab:orange" if j == 0 else color, ls="-" if j == 0 else "-.",
                lw=1.5 if j == 0 else 1, label=f"{name} {_pct(summary['mean_rate'])}",
            )  # fmt: skip
    rate = rate_error_bars(rows)[0]
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
    ax.set_ylim(max(0.0, 10 * math.floor((min(lows, default=0.0) - 5) / 10)), 102)
    ax.set_ylabel("success rate (%)")
    ev = report["setup"]["eval"]
    also = " (and with held-out goals / paraphrases)" if gen else ""
    ax.set_title(
        f"{report['config']}: {ev['episodes']} fresh episodes per seed ({ev['seeds'][0]}-{ev['seeds'][1]}){also}",
        **({"fontsize": 10} if gen else {}),
    )
    if gen:  # six or more entries: beside the axes, not over the points
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        ax.legend(loc="lower right", fontsize=8)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
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
    generalization: bool = False,
) -> int:
    """Run the benchmark (see the module docstring); returns the exit status (1: a seed failed).

    Raises:
        ConfigError: bad arguments, a used output directory, evaluation seeds that are not fresh, a
            per-seed config that does not validate, or ``generalization`` on a config without held-out
            combinations; all before any training.
    """
    targets = {"mean": None, "min": None, **(targets or {})}
    check_arguments(seeds, episodes, eval_seed, targets, generalization)
    if generalization:
        check_generalization(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out or Path(cfg.train.out_dir) / "bench_quality" / f"{cfg.name}-{stamp}").resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} is not a new or empty directory: give a new one (runs would mix)")
    check_fresh_against_config(cfg, eval_seed, episodes)
    shared = shared_config(cfg, out, None, None)
    plans = [(cfg.seed + i, seed_config(shared, cfg.seed + i)) for i in range(seeds)]

    from vla_ft.data.collect import ensure_data  # h5py and the task suite: after the argument checks

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
    if generalization:
        meta["setup"]["generalization"] = generalization_setup(shared_cfg, paths)
        for warning in meta["setup"]["generalization"]["warnings"]:
            print(f"{PREFIX} warning: {warning}", file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = [{"seed": s, "status": "not run"} for s, _ in plans]
    failed = None
    overrides = generalization_overrides(shared_cfg) if generalization else None
    for i, (seed, values) in enumerate(plans):
        print(f"{PREFIX} seed {seed} ({i + 1}/{len(plans)})", flush=True)
        results[i] = res = run_seed(seed, values, out, eval_seed, episodes, overrides)
        if res["status"] == "ok":
            gen = "".join(
                f", {GENERALIZATION[k][1]} {fmt_success(r)}"
                for k, r in (res.get("generalization") or {}).items()
            )
            print(
                f"{PREFIX}   seed {seed}: {fmt_success(res)}{gen}, train {fmt_duration(res['train_wall_s'])}, "
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
    p.add_argument(
        "--generalization",
        action="store_true",
        help=(
            "also score each best checkpoint on the same episodes with env.goals=held_out (the task's "
            "held-out color combinations; meaningful when the config collects with collect.goals: seen, "
            "e.g. pick_place_heldout.yaml; env.goals=held_out_sets when it collects with seen_sets, e.g. "
            "pick_place_heldout_sets.yaml) and with env.instructions=paraphrase (unseen wordings)"
        ),
    )
    p.add_argument(
        "--target-heldout",
        type=float,
        help="with --generalization: mark the mean held-out rate PASS/FAIL against this percent",
    )
    p.add_argument(
        "--target-paraphrase",
        type=float,
        help="with --generalization: mark the mean paraphrase rate PASS/FAIL against this percent",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/bench_quality.py``: user errors are one line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_intermixed_args(argv)
    targets = {
        "mean": args.target_mean,
        "min": args.target_min,
        "heldout": args.target_heldout,
        "paraphrase": args.target_paraphrase,
    }
    try:
        check_arguments(args.seeds, args.episodes, args.eval_seed, targets, args.generalization)
        cfg = load_config(args.cfg, args.overrides)
        return run_bench(
            cfg, args.seeds, args.episodes, args.eval_seed, args.out, targets,
            argv=["python", "scripts/bench_quality.py", *argv], generalization=args.generalization,
        )  # fmt: skip
    except VLAFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
