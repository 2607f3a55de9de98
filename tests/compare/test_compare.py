"""scripts/compare.py: rows, per-row configs, failure reporting, and one end-to-end run on a tiny budget."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vla_ft.compare.rows import parse_row, parse_rows, row_config, shared_config
from vla_ft.compare.run import run_child, run_compare
from vla_ft.config import load_config
from vla_ft.errors import ConfigError
from vla_ft.eval.scoring import wilson_interval

REPO = Path(__file__).resolve().parents[2]


def _synthetic_info():
    """bench_model's synthetic two-camera, 4-dim-action task dims (the pick_place data's)."""
    spec = importlib.util.spec_from_file_location("bench_model", REPO / "scripts" / "bench_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_info(64, 4)


def save_tiny_base(path: Path) -> Path:
    """A tiny base policy with the pick_place dims, saved in our format at ``path`` (random weights)."""
    import torch

    from vla_ft.config import ModelConfig
    from vla_ft.models import load_vla

    torch.manual_seed(0)
    load_vla(ModelConfig(preset="tiny", extra={"pool_grid": 2}), _synthetic_info()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base") / "tiny_base")


def tiny_overrides(tmp: Path, base: Path | None, demos: Path, **extra) -> list[str]:
    """Overrides that make pick_place.yaml tiny: 6 demos, batch 8, 1 thread, 15-step episodes."""
    values = {
        "model.pretrained": str(base) if base else "null",
        "data.paths": f"[{demos}]",
        "collect.output": str(demos),
        "collect.episodes": 6,
        "collect.workers": 1,
        "train.batch_size": 8,
        "train.val_every": 2,
        "train.save_every": 4,
        "train.threads": 1,
        "eval.workers": 1,
        "eval.num_envs": 2,
        "eval.max_steps": 15,
        "log.wandb": "disabled",
        "log.plots": "false",
        "train.out_dir": str(tmp / "runs"),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_row_names_parse_to_their_changes():
    assert parse_row("lora_r16").changes == {"model.lora.r": 16}
    assert parse_row("full_w_task_0.5").changes == {"model.lora.r": 0, "loss.w_task": 0.5}
    assert parse_row("scratch").changes["model.pretrained"] is None and not parse_row("scratch").needs_base
    assert parse_row("base").kind == "eval" and parse_row("full").kind == "train"
    with pytest.raises(ConfigError, match="unknown row 'lora_r0'; use names from: base, full, scratch"):
        parse_row("lora_r0")
    with pytest.raises(ConfigError, match="unknown row 'lora'"):
        parse_row("lora")
    with pytest.raises(ConfigError, match="full given more than once"):
        parse_rows(["full", "base", "full"])


def test_lr_suffix_scales_a_training_rows_learning_rate_only():
    row = parse_row("lora_r16_lr10")
    assert (row.kind, row.changes, row.lr_scale) == ("train", {"model.lora.r": 16}, 10.0)
    assert row.label == "LoRA r=16 on the base, learning rate x10"
    assert parse_row("full_w_task_0.5_lr0.5").changes == {"model.lora.r": 0, "loss.w_task": 0.5}
    assert parse_row("full_w_task_0.5_lr0.5").lr_scale == 0.5 and parse_row("scratch_lr3").lr_scale == 3.0
    with pytest.raises(ConfigError, match="row 'base_lr10': _lr10: 'base' is not trained"):
        parse_row("base_lr10")
    with pytest.raises(ConfigError, match="row 'full_lr0': _lr0: give one positive multiplier"):
        parse_row("full_lr0")
    with pytest.raises(ConfigError, match="row 'full_lr2_lr3': _lr3: give one positive multiplier"):
        parse_row("full_lr2_lr3")
    with pytest.raises(ConfigError, match="unknown row 'full_lrx'"):
        parse_row("full_lrx")


def test_row_configs_share_data_budget_and_eval_seeds(tmp_path, tiny_base):
    cfg = load_config("pick_place.yaml", tiny_overrides(tmp_path, tiny_base, tmp_path / "d.hdf5"))
    shared = shared_config(cfg, tmp_path / "out", steps=30, episodes=5)
    rows = {name: row_config(shared, parse_row(name), tmp_path / "out", tiny_base) for name in
            ("base", "lora_r8", "full", "scratch", "full_w_task_0", "lora_r8_lr10")}  # fmt: skip
    for name, values in rows.items():
        assert values["data"]["paths"] == [str((tmp_path / "d.hdf5").resolve())]
        assert values["data"]["collect_if_missing"] is False
        assert values["train"]["steps"] == 30 and values["eval"]["episodes"] == 5
        assert values["eval"]["seed"] == cfg.eval.seed and values["train"]["run_name"] == name
        assert values["train"]["warmup_steps"] == 3  # 100 > 30 steps: a tenth, said on stdout
    assert rows["lora_r8"]["model"]["lora"]["r"] == 8 and rows["full"]["model"]["lora"]["r"] == 0
    assert rows["full_w_task_0"]["loss"]["w_task"] == 0.0
    # _lr10: the peak rate x10, the module multipliers (relative to it) and everything else as is
    assert rows["lora_r8_lr10"]["train"]["lr"] == pytest.approx(10 * cfg.train.lr)
    assert (
        rows["lora_r8_lr10"]["train"]["module_lr"] == rows["lora_r8"]["train"]["module_lr"] == {"vision": 3.0}
    )
    a, b = json.loads(json.dumps(rows["lora_r8_lr10"])), json.loads(json.dumps(rows["lora_r8"]))
    for v in (a, b):
        del v["train"]["lr"], v["train"]["run_name"]
    assert a == b
    # with train.pretrain_lr + train.lr_scale the peak rate is their product: pretrain_lr is scaled
    derived = {**shared, "train": {**shared["train"], "pretrain_lr": 1e-3, "lr_scale": 0.1}}
    scaled = row_config(derived, parse_row("full_lr10"), tmp_path / "out", tiny_base)["train"]
    assert scaled["pretrain_lr"] == pytest.approx(1e-2) and scaled["lr_scale"] == 0.1
    assert scaled["lr"] == pytest.approx(1e-3)  # written resolved into the row's config
    assert rows["full"]["model"]["pretrained"] == str(tiny_base)
    assert rows["base"]["eval"]["out_dir"] == str(tmp_path / "out" / "runs" / "base" / "eval")
    # scratch: no weights, the base's architecture (its preset and knobs, not the config's)
    saved = json.loads((tiny_base / "config.json").read_text())["model"]
    assert rows["scratch"]["model"]["pretrained"] is None
    assert rows["scratch"]["model"]["extra"] == saved["extra"] == {"pool_grid": 2}
    assert rows["scratch"]["model"]["preset"] == saved["preset"]
    # scratch_lr3 is scratch (the base's architecture, no weights) at 3x the rate
    fast = row_config(shared, parse_row("scratch_lr3"), tmp_path / "out", tiny_base)
    assert fast["model"] == rows["scratch"]["model"]
    assert fast["train"]["lr"] == pytest.approx(3 * cfg.train.lr)


def test_bc_cnn_row_trains_the_baseline_with_its_own_recipe(tmp_path, tiny_base):
    from vla_ft.compare.rows import BC_CNN_RECIPE, DEFAULT_ROWS, ROW_NAMES_HELP

    row = parse_row("bc_cnn")
    assert (
        row.kind == "train" and not row.needs_base and not row.from_scratch and row.changes == BC_CNN_RECIPE
    )
    assert "bc_cnn" in DEFAULT_ROWS and "bc_cnn" in ROW_NAMES_HELP
    cfg = load_config(
        "pick_place.yaml",
        tiny_overrides(
            tmp_path,
            tiny_base,
            tmp_path / "d.hdf5",
            **{"train.lr": "null", "train.pretrain_lr": 1e-3, "train.lr_scale": 0.1},
        ),
    )
    shared = shared_config(cfg, tmp_path / "out", steps=30, episodes=5)
    values = row_config(shared, row, tmp_path / "out", tiny_base)
    model, train, loss = values["model"], values["train"], values["loss"]
    # its own architecture from scratch, not the base's (whose preset and knobs the scratch row takes)
    assert model["preset"] == "bc-cnn" and model["pretrained"] is None and model["extra"] == {}
    assert model["lora"]["r"] == 0 and model["action_head"] == "continuous"
    # the baseline's recipe: lr 1e-3 flat (no derived rate, no module multipliers), batch 64, EMA, L1 alone
    assert train["lr"] == 1e-3 and train["pretrain_lr"] is None and train["lr_scale"] is None
    assert train["module_lr"] == {} and train["layer_decay"] == 1.0
    assert (train["batch_size"], train["grad_accum"], train["ema"]) == (64, 1, 0.995)
    assert loss["action"] == "l1" and loss["task_terms"] == {}
    # the comparison's budget, data, augmentation and evaluation stay shared
    assert train["steps"] == 30 and train["warmup_steps"] == 3 and values["eval"]["episodes"] == 5
    assert values["data"] == {**shared["data"], "collect_if_missing": False}
    assert values["eval"]["seed"] == shared["eval"]["seed"] and train["run_name"] == "bc_cnn"
    # no base needed: the same row without one; _lr3 scales its own rate
    assert row_config(shared, row, tmp_path / "out", None)["model"] == model
    fast = row_config(shared, parse_row("bc_cnn_lr3"), tmp_path / "out", tiny_base)
    assert fast["model"] == model and fast["train"]["lr"] == pytest.approx(3e-3)


def test_rows_on_a_bc_cnn_base_refuse_what_it_lacks_before_anything_runs(tmp_path):
    import torch

    from vla_ft.config import ModelConfig
    from vla_ft.models import load_vla

    torch.manual_seed(0)
    base = load_vla(ModelConfig(preset="bc-cnn"), _synthetic_info()).save_pretrained(tmp_path / "bc_base")
    cfg = load_config("pick_place.yaml", tiny_overrides(tmp_path, base, tmp_path / "d.hdf5"))
    shared = shared_config(cfg, tmp_path / "out", steps=30, episodes=5)
    assert row_config(shared, parse_row("base"), tmp_path / "out", base)  # evaluating it is fine
    for name in ("scratch", "full"):  # pick_place.yaml's grounding term
        with pytest.raises(
            ConfigError, match=f"row {name}: loss.task_terms.grounding needs keypoint heat maps"
        ):
            row_config(shared, parse_row(name), tmp_path / "out", base)
    shared["loss"]["task_terms"] = {"task_id": 1.0}
    assert row_config(shared, parse_row("scratch"), tmp_path / "out", base)["model"]["preset"] == "bc-cnn"
    with pytest.raises(ConfigError, match="row lora_r8: model.lora.r=8 does not apply to a bc-cnn policy"):
        row_config(shared, parse_row("lora_r8"), tmp_path / "out", base)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"steps": 0}, "--steps 0: use 1 or more"),
        ({"episodes": 0}, "--episodes 0: use 1 or more"),
        ({"rows": ["base", "lora"]}, "unknown row 'lora'"),
    ],
)
def test_bad_arguments_fail_before_anything_runs(tmp_path, tiny_base, kwargs, pattern):
    cfg = load_config("pick_place.yaml", tiny_overrides(tmp_path, tiny_base, tmp_path / "d.hdf5"))
    with pytest.raises(ConfigError, match=pattern):
        run_compare(cfg, tmp_path / "out", **kwargs)
    assert not (tmp_path / "d.hdf5").exists() and not (tmp_path / "out" / "comparison.json").exists()


def test_base_must_be_a_local_checkpoint_and_out_dir_new(tmp_path, tiny_base):
    cfg = load_config("pick_place.yaml", tiny_overrides(tmp_path, tmp_path / "nope", tmp_path / "d.hdf5"))
    with pytest.raises(ConfigError, match="is not a local checkpoint directory"):
        run_compare(cfg, tmp_path / "out")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.txt").write_text("x")
    cfg = load_config("pick_place.yaml", tiny_overrides(tmp_path, tiny_base, tmp_path / "d.hdf5"))
    with pytest.raises(ConfigError, match="is not empty: give a new directory"):
        run_compare(cfg, tmp_path / "used")


def test_without_a_base_the_base_rows_are_reported_na_not_faked(tmp_path, capsys):
    cfg = load_config("pick_place.yaml", tiny_overrides(tmp_path, None, tmp_path / "d.hdf5"))
    code = run_compare(cfg, tmp_path / "out", rows=["base", "lora_r8", "full", "full_w_task_0.5"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [r["status"] for r in report["rows"]] == ["n/a"] * 4 and report["base"] is None
    assert all(r["success_rate"] is None and r["trainable"] is None for r in report["rows"])
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert md.count("n/a (no base)") == 4 * 6 and "none (model.pretrained is null)" in md
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "d.hdf5").exists()  # nothing to run: no collection either


def test_run_child_reports_each_childs_own_peak_memory(tmp_path):
    big = [sys.executable, "-c", "import time; b = bytearray(300 * 2**20); del b; time.sleep(0.5)"]
    small = [sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.exit(3)"]
    ballast = bytearray(400 * 2**20)  # this process is large when it spawns both children
    code, wall, rss_big = run_child(big, tmp_path / "big.log")
    assert code == 0 and wall >= 0.5 and 300 < rss_big < 390  # the peak, though freed before exit
    code, _, rss_small = run_child(small, tmp_path / "small.log")
    assert code == 3 and rss_small < 100  # the child's own, not a running maximum nor the parent's
    del ballast


def broken_copy(base: Path, path: Path) -> Path:
    """A copy of checkpoint ``base`` at ``path`` whose weights file is not safetensors."""
    path.mkdir()
    for f in base.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    return path


def collect_tiny_demos(path: Path) -> Path:
    """Six scripted pick_place demos (the config's image size) collected into ``path``."""
    from vla_ft.data.collect import run_collect

    run_collect(load_config("pick_place.yaml", tiny_overrides(path.parent, None, path)))
    return path


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    """Collected once for the runs below."""
    return collect_tiny_demos(tmp_path_factory.mktemp("demos") / "pick_place.hdf5")


@pytest.mark.slow
def test_a_crashing_row_is_reported_failed_and_the_exit_status_is_nonzero(tmp_path, tiny_base, demos):
    broken = broken_copy(tiny_base, tmp_path / "broken_base")
    cmd = [sys.executable, str(REPO / "scripts" / "compare.py"), "--cfg", "pick_place.yaml",
           *tiny_overrides(tmp_path, broken, demos), "--out", str(tmp_path / "out"), "--rows", "base",
           "--episodes", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 row(s) failed: base" in proc.stderr
    report = json.loads((tmp_path / "out" / "comparison.json").read_text())
    (row,) = report["rows"]
    assert row["status"] == "failed" and row["exit_code"] != 0 and report["failed"] == ["base"]
    assert row["error"] and Path(row["log"]).is_file() and row["success_rate"] is None
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "FAILED (exit" in md and row["error"].replace("|", "/") in md


@pytest.mark.slow
def test_compare_end_to_end_on_a_tiny_budget(tmp_path, tiny_base, demos):
    out = tmp_path / "out"
    own = f"full_w_task_{load_config('pick_place.yaml').loss.w_task:g}"  # the config's own weight
    cmd = [sys.executable, str(REPO / "scripts" / "compare.py"), "--cfg", "pick_place.yaml",
           *tiny_overrides(tmp_path, tiny_base, demos), "--out", str(out),
           "--rows", f"base,lora_r8,full,{own}", "--steps", "4", "--episodes", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "comparison.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["base", "lora_r8", "full", own]
    assert all(r["status"] == "ok" for r in rows.values()) and report["failed"] == []
    assert report["budget"]["train.steps"] == 4 and report["budget"]["eval.episodes"] == 2

    from vla_ft.models import VLAPolicy, count_parameters

    full, lora, base = rows["full"], rows["lora_r8"], rows["base"]
    # trainable counts match the models; LoRA trains a smaller share than full fine-tuning
    model_total = count_parameters(VLAPolicy.from_pretrained(out / "runs" / "full" / "last"))[1]
    assert full["trainable"] == full["total"] == model_total and full["trainable_pct"] == 100.0
    from safetensors import safe_open

    with safe_open(str(out / "runs" / "lora_r8" / "last" / "lora" / "unmerged.safetensors"), "pt") as f:
        adapters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if ".lora_" in k)
    assert lora["total"] == model_total + adapters
    assert 0 < lora["trainable"] < full["trainable"] and lora["trainable_pct"] < full["trainable_pct"]
    assert lora["trainable_pct"] == pytest.approx(100.0 * lora["trainable"] / lora["total"])
    assert base["trainable"] == 0 and base["train_s"] is None and base["val_loss"] is None
    # the ablation row with the config's own w_task is the full run, not a second training
    assert rows[own]["same_as"] == "full"
    assert rows[own]["success_rate"] == full["success_rate"]
    assert not (out / "runs" / own).exists()

    seeds = None
    for name, r in rows.items():
        assert r["episodes"] == 2 and r["successes"] == round(r["success_rate"] * 2)
        lo, hi = r["ci95"]
        assert lo <= r["success_rate"] <= hi and (lo, hi) == pytest.approx(wilson_interval(r["successes"], 2))
        assert r["eval_s"] > 0 and r["wall_s"] >= r["eval_s"] and r["peak_rss_mb"] > 100
        if name != "base":
            assert r["steps"] == 4 and r["train_s"] > 0 and r["val_loss"] > 0
            assert yaml.safe_load(Path(r["config"]).read_text())["train"]["steps"] == 4
        run = Path(r["run_dir"])
        ev = run / "eval" / "eval.json" if name == "base" else next((run / "eval").glob("final_*/eval.json"))
        row_seeds = [e["seed"] for e in json.loads(ev.read_text())["episodes"]]
        assert seeds is None or row_seeds == seeds  # the same held-out episodes for every row
        seeds = row_seeds

    md = (out / "comparison.md").read_text()
    for name in rows:
        assert f"| `{name}` |" in md
    assert "(same run as `full`)" in md and "95% Wilson" in md
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob(".*.tmp"))  # every output written atomically


def test_plot_renders_rows_at_0_and_100_percent(tmp_path):
    """The first full run (2026-11-23) crashed here: 0/100 rows gave a -1e-17 error bar."""
    from vla_ft.compare.report import render_plot

    rows = []
    for name, k in (("base", 0), ("full", 100), ("lora_r8", 1), ("failed", 0)):
        rows.append({
            "name": name, "status": "ok" if name != "failed" else "failed", "success_rate": k / 100,
            "ci95": list(wilson_interval(k, 100)), "train_s": 60.0 * (name != "base"), "eval_s": 30.0,
        })  # fmt: skip
    path = render_plot({"rows": rows, "budget": {"eval.episodes": 100}}, tmp_path / "comparison.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
