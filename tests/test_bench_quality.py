"""scripts/bench_quality.py: bad arguments, the summary arithmetic (with --generalization too), a
failing seed, and one end-to-end run on a tiny budget (2 seeds, 6 demos, 4 steps, 2 episodes, with
--generalization: two more evaluations per seed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml

from envs.tasks import TASKS
from vla_ft.bench_quality import (
    DEFAULT_EVAL_SEED,
    build_report,
    check_generalization,
    generalization_overrides,
    generalization_setup,
    main,
    render_markdown,
    render_plot,
)
from vla_ft.config import load_config
from vla_ft.errors import ConfigError
from vla_ft.eval.scoring import wilson_interval

sys.path.insert(0, str(Path(__file__).resolve().parent / "compare"))
from test_compare import broken_copy, collect_tiny_demos, save_tiny_base, tiny_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
NAMED_PAIR = re.compile(r"(\w+) cube\b.*\b(\w+) bowl")  # pick_place: (cube color, bowl color)
TINY_TRAIN = {"train.steps": 4, "train.warmup_steps": 0}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base") / "tiny_base")


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    return collect_tiny_demos(tmp_path_factory.mktemp("demos") / "pick_place.hdf5")


def _script(tmp: Path, base: Path, demos: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / "bench_quality.py"), "--cfg", "pick_place.yaml",
           *tiny_overrides(tmp, base, demos, **TINY_TRAIN), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cfg", "no_such_config.yaml"], "config file 'no_such_config.yaml' not found"),
        (["--cfg", "pick_place.yaml", "--seeds", "0"], "--seeds 0: use 1 or more training seeds"),
        (["--cfg", "pick_place.yaml", "--episodes", "0"], "--episodes 0: use 1 or more evaluation"),
        (["--cfg", "pick_place.yaml", "--target-min", "120"], "--target-min 120: give a success rate"),
        # the config's own evaluation episodes (100000-100099) are where settings were chosen
        (["--cfg", "pick_place.yaml", "--eval-seed", "100050"], "overlap the config's evaluation episodes"),
        (["--cfg", "pick_place.yaml", "--target-heldout", "50"], "--target-heldout 50 judges the held-out "
         "combinations evaluation: add --generalization"),
        (["--cfg", "pick_place.yaml", "--generalization", "env.task=reach"],
         "--generalization: env.task='reach' has no held-out combinations (tasks with held-out combinations: "
         "pick_place, stack)"),
        (["--cfg", "pick_place.yaml", "--generalization", "env.instructions=paraphrase"],
         "already runs with env.instructions=paraphrase"),
    ],
)  # fmt: skip
def test_bad_arguments_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, args, message):
    demos = tmp_path / "d.hdf5"
    argv = [*args, *tiny_overrides(tmp_path, None, demos), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not demos.exists()  # nothing collected either


def _seed(seed: int, k: int, n: int, train: float, evals: float) -> dict:
    lo, hi = wilson_interval(k, n)
    return {
        "seed": seed, "status": "ok", "successes": k, "episodes": n, "success_rate": k / n, "ci95": [lo, hi],
        "checkpoint": "checkpoints/step_0000004", "train_wall_s": train, "eval_wall_s": evals,
        "total_wall_s": train + evals, "device": "cpu",
    }  # fmt: skip


def _meta(seeds: list[int]) -> dict:
    return {
        "command": "python scripts/bench_quality.py --cfg pick_place.yaml", "config": "pick_place",
        "created": "2026-11-24 10:00:00", "git_commit": "abc",
        "machine": {"platform": "Linux", "cpus": 2, "processor": "x86_64", "python": "3.11", "torch": "2"},
        "setup": {
            "training_seeds": seeds, "train.steps": 1500, "train.batch_size": 32,
            "data": {"paths": ["d.hdf5"], "demos": 600, "demo_seeds": [0, 1199]},
            "eval": {"seed": 200000, "episodes": 300, "seeds": [200000, 200299]},
            "config_eval": {"seed": 100000, "episodes": 100},
        },
    }  # fmt: skip


def test_summary_mean_min_pooled_and_targets(tmp_path):
    seeds = [
        _seed(0, 285, 300, 600.0, 100.0),
        _seed(1, 270, 300, 620.0, 110.0),
        _seed(2, 291, 300, 640.0, 90.0),
    ]
    report = build_report(_meta([0, 1, 2]), seeds, {"mean": 90.0, "min": 92.0})
    s = report["summary"]
    assert report["complete"] and report["failed"] == [] and s["seeds_done"] == 3
    assert s["mean_rate"] == pytest.approx((285 + 270 + 291) / 900)
    assert (s["min_rate"], s["min_seed"], s["max_rate"], s["max_seed"]) == (0.9, 1, 0.97, 2)
    assert s["pooled"]["successes"] == 846 and s["pooled"]["episodes"] == 900
    assert s["pooled"]["ci95"] == pytest.approx(wilson_interval(846, 900))
    assert s["mean_total_wall_s"] == pytest.approx(720.0) and s["mean_eval_wall_s"] == pytest.approx(100.0)
    assert s["targets"]["mean"]["pass"] is True and s["targets"]["min"]["pass"] is False
    md = render_markdown(report)
    assert "| 1 | 270/300 = 90.0% (86.1-92.9%) | `checkpoints/step_0000004` | 10 min 20 s |" in md
    assert "| **mean** of 3 | 94.0%, sd 3.6 points |" in md and "| **min** | 90.0% (seed 1) |" in md
    assert "**PASS**: mean >= 90%" in md and "**FAIL**: min >= 92%" in md
    assert "reset seeds 200000-200299" in md and "seeds differ only in the training seed" in md
    assert render_plot(report, tmp_path / "q.png").read_bytes()[:8] == PNG

    # a seed that failed: what finished is kept, the report says incomplete, targets are not judged
    failed = {"seed": 1, "status": "failed", "stage": "train", "exit_code": 1, "error": "boom | bang",
              "failed_log": "logs/seed_1-train.log", "log_tail": ["Traceback", "boom | bang"],
              "train_wall_s": 3.0}  # fmt: skip
    report = build_report(
        _meta([0, 1, 2]), [seeds[0], failed, {"seed": 2, "status": "not run"}], {"mean": 90.0}
    )
    s = report["summary"]
    assert not report["complete"] and report["failed"] == [1] and s["seeds_done"] == 1
    assert s["mean_rate"] == s["min_rate"] == 0.95 and s["targets"]["mean"]["pass"] is None
    md = render_markdown(report)
    assert "**INCOMPLETE**: 1 of 3 seeds finished; failed: seed 1" in md
    assert "| 1 | FAILED in train (exit 1): boom / bang |" in md and "| 2 | not run |" in md
    assert "n/a (incomplete): mean >= 90%" in md and "```\nTraceback\nboom | bang\n```" in md
    assert render_plot(report, tmp_path / "f.png").read_bytes()[:8] == PNG


def _generalized(seed: dict, held: tuple[int, int], para: tuple[int, int]) -> dict:
    gen = {}
    for kind, (k, n) in (("held_out", held), ("paraphrase", para)):
        gen[kind] = {"successes": k, "episodes": n, "success_rate": k / n, "ci95": list(wilson_interval(k, n)),
                     "eval_wall_s": 50.0}  # fmt: skip
    return {**seed, "generalization": gen}


def test_generalization_rows_summary_targets_and_warning(tmp_path):
    seeds = [
        _generalized(_seed(0, 285, 300, 600.0, 200.0), (150, 300), (270, 300)),
        _generalized(_seed(1, 270, 300, 620.0, 210.0), (90, 300), (240, 300)),
    ]
    meta = _meta([0, 1])
    meta["setup"]["generalization"] = {
        "kinds": {"held_out": "env.goals=held_out", "paraphrase": "env.instructions=paraphrase"},
        "collect_goals": "all", "held_out_pairs": ["blue/yellow", "green/blue", "red/green", "yellow/red"],
        "held_out_demos": [150, 600], "warnings": ["the config collects its demos with collect.goals=all: ..."],
    }  # fmt: skip
    targets = {"mean": 90.0, "min": None, "heldout": 35.0, "paraphrase": 88.0}
    report = build_report(meta, seeds, targets)
    s, g = report["summary"], report["summary"]["generalization"]
    assert s["mean_rate"] == pytest.approx(0.925)  # the main evaluation's numbers are unchanged
    assert g["held_out"]["mean_rate"] == pytest.approx(0.4) and g["held_out"]["min_seed"] == 1
    assert g["paraphrase"]["pooled"]["successes"] == 510 and g["paraphrase"]["max_seed"] == 0
    t = s["targets"]
    assert t["heldout"]["pass"] is True and t["heldout"]["value"] == pytest.approx(0.4)
    assert t["paraphrase"]["pass"] is False and t["mean"]["pass"] is True
    md = render_markdown(report)
    assert "| training seed | success (95% Wilson CI) | held-out combinations | paraphrases |" in md
    assert "| 1 | 270/300 = 90.0% (86.1-92.9%) | 90/300 = 30.0% (" in md
    assert "| **mean** of 2 | 92.5%, sd 3.5 points | 40.0%, sd 14.1 points | 85.0%, sd 7.1 points |" in md
    assert "**PASS**: mean >= 90%; **PASS**: held-out mean >= 35%; **FAIL**: paraphrase mean >= 88%" in md
    assert "| **min** | 90.0% (seed 1) | 30.0% (seed 1) | 80.0% (seed 1) |" in md
    assert "red/green" in md and "`collect.goals: all`; 150 of the 600 demos are held-out combinations" in md
    assert "- **warning**: the config collects its demos with collect.goals=all" in md
    assert render_plot(report, tmp_path / "g.png").read_bytes()[:8] == PNG

    # a seed whose held-out evaluation failed: its main rate and the failure are in its row
    failed = {**_seed(1, 270, 300, 620.0, 210.0), "status": "failed", "stage": "eval held_out",
              "exit_code": 2, "error": "boom", "failed_log": "l", "log_tail": ["boom"]}  # fmt: skip
    failed["generalization"] = {}
    report = build_report(meta, [seeds[0], failed], targets)
    assert report["summary"]["generalization"]["held_out"]["mean_rate"] == 0.5  # seed 0 only
    assert report["summary"]["targets"]["heldout"]["pass"] is None
    assert "| 1 | FAILED in eval held_out (exit 2): boom | - | - |" in render_markdown(report)
    assert render_plot(report, tmp_path / "h.png").read_bytes()[:8] == PNG


def _state_file(path: Path, seeds: range) -> int:
    """A demo file holding only what held_out_demos reads (task, first state), from unrendered resets
    (no EGL renderer in this process: docs/traps.md); returns how many goals are held out."""
    import envs
    from envs.env import is_held_out_state

    env, held = envs.make("pick_place", render=False), 0
    with h5py.File(path, "w") as f:
        for i, seed in enumerate(seeds):
            env.reset(seed=seed)
            demo = f.create_group(f"data/demo_{i}")
            demo.attrs["task"] = "pick_place"
            demo["states"] = env.get_state()[None]
            held += is_held_out_state("pick_place", env.get_state())
    env.close()
    return held


def test_generalization_setup_counts_held_out_demos_and_warns_only_for_goals_all(tmp_path):
    held = _state_file(tmp_path / "d.hdf5", range(6))  # seeds 0-5 with goals=all, as collected
    assert held
    paths = [str(tmp_path / "d.hdf5")]
    everything = generalization_setup(load_config("pick_place.yaml"), paths)
    assert everything["held_out_demos"] == [held, 6] and len(everything["warnings"]) == 2
    assert everything["held_out_pairs"] == ["blue/yellow", "green/blue", "red/green", "yellow/red"]
    seen = generalization_setup(load_config("pick_place_heldout.yaml"), paths)
    assert seen["collect_goals"] == "seen" and len(seen["warnings"]) == 1  # only the file's count
    assert seen["warnings"][0].startswith(f"{held} of the 6 demos in the data file(s) are held-out")
    none = generalization_setup(load_config("pick_place_heldout.yaml"), [str(tmp_path / "missing.hdf5")])
    assert none["held_out_demos"] is None and none["warnings"] == []


def test_a_seen_sets_config_is_scored_on_the_held_out_color_sets(tmp_path):
    """collect.goals: seen_sets: the held-out evaluation uses env.goals=held_out_sets and the report
    lists both orders of each held-out color set; the demo count uses that split."""
    import envs

    env, held = envs.make("pick_place", render=False), 0
    for seed in range(6):
        env.reset(seed=seed)
        held += TASKS["pick_place"].is_held_out(env.sim.layout, env.goal, "sets")
    env.close()
    _state_file(tmp_path / "d.hdf5", range(6))
    cfg = load_config("pick_place_heldout_sets.yaml")
    check_generalization(cfg)
    assert generalization_overrides(cfg) == {
        "held_out": "env.goals=held_out_sets", "paraphrase": "env.instructions=paraphrase",
    }  # fmt: skip
    assert (
        generalization_overrides(load_config("pick_place_heldout.yaml"))["held_out"] == "env.goals=held_out"
    )
    setup = generalization_setup(cfg, [str(tmp_path / "d.hdf5")])
    assert setup["split"] == "sets" and setup["kinds"]["held_out"] == "env.goals=held_out_sets"
    assert setup["held_out_pairs"] == ["blue/yellow", "green/red", "red/green", "yellow/blue"]
    assert setup["held_out_demos"] == [held, 6] and setup["warnings"][0].startswith(f"{held} of the 6 demos")
    with pytest.raises(ConfigError, match=r"env\.goals=held_out_sets with the main evaluation"):
        check_generalization(load_config("pick_place_heldout_sets.yaml", ["env.goals=held_out_sets"]))


@pytest.mark.slow
def test_a_failing_seed_is_reported_with_its_log_and_exit_1(tmp_path, base, demos):
    broken = broken_copy(base, tmp_path / "broken_base")
    out = tmp_path / "out"
    proc = _script(tmp_path, broken, demos, "--seeds", "2", "--episodes", "2", "--out", str(out))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the damaged base fails the training run's check before its first step: one line, exit 2
    assert "seed 0 failed in train (exit 2)" in proc.stderr and "--- last lines of" in proc.stderr
    assert "model.safetensors: 22 bytes but" in proc.stderr
    report = json.loads((out / "quality.json").read_text())
    first, second = report["seeds"]
    assert not report["complete"] and report["failed"] == [0]
    assert first["status"] == "failed" and first["error"] and first["log_tail"]
    assert first["log_tail"][-1] in proc.stderr and Path(first["failed_log"]).is_file()
    assert second == {"seed": 1, "status": "not run"}  # the benchmark stops at the first failure
    assert "**INCOMPLETE**" in (out / "quality.md").read_text()


@pytest.mark.slow
def test_bench_quality_end_to_end_on_a_tiny_budget(tmp_path, base, demos):
    """The whole path, --generalization included (two more evaluation jobs per seed)."""
    out = tmp_path / "out"
    proc = _script(
        tmp_path, base, demos, "--seeds", "2", "--episodes", "2", "--out", str(out), "--target-mean", "0",
        "--generalization", "--target-heldout", "0", "--target-paraphrase", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())
    assert report["complete"] and report["config"] == "pick_place" and report["failed"] == []
    assert report["command"].startswith("python scripts/bench_quality.py --cfg pick_place.yaml")
    assert {"cpus", "platform", "torch"} <= set(report["machine"]) and report["git_commit"]
    setup = report["setup"]
    assert setup["training_seeds"] == [0, 1] and setup["train.steps"] == 4 and setup["in_run_eval"] == "off"
    assert setup["eval"] == {"seed": DEFAULT_EVAL_SEED, "episodes": 2, "seeds": [200000, 200001]}
    assert setup["data"]["paths"] == [str(demos.resolve())] and setup["data"]["demos"] == 6

    seeds = report["seeds"]
    assert [r["seed"] for r in seeds] == [0, 1] and all(r["status"] == "ok" for r in seeds)
    for r in seeds:
        assert r["episodes"] == 2 and r["success_rate"] == r["successes"] / r["episodes"]
        lo, hi = r["ci95"]
        assert lo <= r["success_rate"] <= hi and (lo, hi) == pytest.approx(wilson_interval(r["successes"], 2))
        assert r["eval_seeds"] == [200000, 200001] and r["steps"] == 4
        assert r["train_wall_s"] > 0 and r["eval_wall_s"] > 0
        assert r["total_wall_s"] == pytest.approx(r["train_wall_s"] + r["eval_wall_s"])
        gen = r["generalization"]
        assert r["eval_wall_s"] > gen["held_out"]["eval_wall_s"] + gen["paraphrase"]["eval_wall_s"] > 0
        main_eval = json.loads((Path(r["eval_dir"]) / "eval.json").read_text())
        for kind, override in (
            ("held_out", "env.goals=held_out"),
            ("paraphrase", "env.instructions=paraphrase"),
        ):
            g = gen[kind]
            assert (
                g["episodes"] == 2 and g["eval_seeds"] == [200000, 200001] and override in g["eval_command"]
            )
            assert g["ci95"] == pytest.approx(wilson_interval(g["successes"], 2))
            ev = json.loads((Path(g["eval_dir"]) / "eval.json").read_text())
            assert [e["seed"] for e in ev["episodes"]] == [200000, 200001]
            env = ev["manifest"]["env"]
            assert (env["goals"], env["instructions"]) == (
                ("held_out", "train") if kind == "held_out" else ("all", "paraphrase")
            )
            for e, m in zip(ev["episodes"], main_eval["episodes"], strict=True):
                pair = NAMED_PAIR.search(e["instruction"]).group(1, 2)
                if kind == "held_out":
                    assert pair in TASKS["pick_place"].held_out, e["instruction"]
                else:  # the main evaluation's episode, reworded
                    assert pair == NAMED_PAIR.search(m["instruction"]).group(1, 2)
                    assert e["instruction"] != m["instruction"]
        run = Path(r["run_dir"])
        # the seed is the only difference; the in-run final evaluation was off, the fresh one ran
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == r["seed"]
        assert json.loads((run / "summary.json").read_text())["eval"] is None
        episodes = json.loads((Path(r["eval_dir"]) / "eval.json").read_text())["episodes"]
        assert [e["seed"] for e in episodes] == [200000, 200001]
    a, b = (yaml.safe_load(Path(r["config"]).read_text()) for r in seeds)
    assert a.pop("seed") == 0 and b.pop("seed") == 1
    assert a["train"].pop("run_name") == "seed_0" and b["train"].pop("run_name") == "seed_1" and a == b

    s, rates = report["summary"], [r["success_rate"] for r in seeds]
    assert s["mean_rate"] == pytest.approx(sum(rates) / 2) and s["min_rate"] == min(rates)
    k = sum(r["successes"] for r in seeds)
    assert s["pooled"] == {
        "successes": k,
        "episodes": 4,
        "success_rate": k / 4,
        "ci95": list(wilson_interval(k, 4)),
    }
    assert s["targets"]["mean"]["pass"] is True
    assert s["targets"]["heldout"]["pass"] is True and s["targets"]["paraphrase"]["pass"] is True
    for kind in ("held_out", "paraphrase"):
        k = sum(r["generalization"][kind]["successes"] for r in seeds)
        assert s["generalization"][kind]["pooled"]["successes"] == k
    gen_setup = setup["generalization"]
    # pick_place.yaml collects every pair: the report says so (and counts them), it does not fail
    assert gen_setup["collect_goals"] == "all" and gen_setup["held_out_demos"][1] == 6
    assert "collect.goals=all" in gen_setup["warnings"][0] and "warning: the config collects" in proc.stderr

    md = (out / "quality.md").read_text()
    assert "| held-out combinations | paraphrases |" in md and "- **warning**: the config collects" in md
    assert "**PASS**: held-out mean >= 0%" in md and "**PASS**: paraphrase mean >= 0%" in md
    for r in seeds:
        assert f"| {r['seed']} | {r['successes']}/2 = {100 * r['success_rate']:.1f}% (" in md
    assert "| **mean** of 2 |" in md and "| **min** |" in md and "| **pooled** |" in md
    assert "**PASS**: mean >= 0%" in md and md in proc.stdout  # the table is printed at the end
    assert (out / "quality.png").read_bytes()[:8] == PNG
    assert not list(out.rglob(".*.tmp"))
