"""The embedded default: the shipped base loads and documents itself, and the main job (collect ->
fine-tune every parameter of the base -> evaluate) beats the base zero-shot on the same episodes.

The end-to-end test runs the real job (`scripts/finetune.py --cfg pick_place.yaml`) in a
subprocess on a reduced budget; the full budget and its numbers are in README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vla_ft.config import load_config
from vla_ft.integrity import sha256_file

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "checkpoints" / "base" / "tiny-suite"


def test_pick_place_config_fine_tunes_the_shipped_base():
    cfg = load_config("pick_place.yaml")
    assert cfg.model.pretrained == "checkpoints/base/tiny-suite"
    assert cfg.model.lora.r == 0 and not cfg.model.freeze  # full-parameter fine-tuning
    assert cfg.data.collect_if_missing and cfg.collect.tasks == ["pick_place"]


def test_shipped_base_loads_and_its_card_says_how_it_was_made():
    from vla_ft.models import VLAPolicy

    policy = VLAPolicy.from_pretrained(BASE)
    assert policy.arch["film"] and policy.normalizer is not None
    size = (BASE / "model.safetensors").stat().st_size
    assert size < 30 * 2**20
    card = json.loads((BASE / "card.json").read_text())
    assert card["weights_sha256"] == sha256_file(BASE / "model.safetensors")
    assert "pretrain" in card["command"] and "pretrain_suite.yaml" in card["command"]
    assert card["git_commit"]
    collect = card["data"]["collect"]
    assert "pick_place" not in collect["tasks"] and collect["seed"] is not None  # transfer, not memorization
    ev = card["summary"]["eval"]
    assert ev["episodes"] > 0 and ev["ci95_low"] - 1e-9 <= ev["success_rate"] <= ev["ci95_high"] + 1e-9
    text = (BASE / "README.md").read_text()
    for fact in (card["command"], card["git_commit"], "Validation loss", "Config"):
        assert fact in text


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.sim
def test_main_job_end_to_end_and_the_base_zero_shot_on_the_same_episodes(tmp_path):
    """The main job on a reduced budget: collect, fine-tune every parameter of the shipped base,
    evaluate; then the base zero-shot on the same seeded episodes; the fine-tuned policy must beat it.

    At the full budget (600 demos, 1,500 steps, 11-13 min) "beats" is success: 94/100 vs 1/100
    (README). No budget CI can afford succeeds yet (64 px: 200 demos/500 steps and 600/800 were 0/20;
    success needs the release, learned last), so here "beats" is the task's progress, read from the
    evaluator's events: with 200 demos and 600 steps (~5 min) the fine-tuned policy carried the
    named cube into the named bowl's rim in 13/20 episodes, the base in 2/20 (2026-11-23), and
    grasped the wrong object 4 vs 7 times. The assertion keeps a margin for run-to-run noise.
    """
    episodes = 20
    common = [
        f"data.paths=[{tmp_path}/pick_place.hdf5]",
        f"collect.output={tmp_path}/pick_place.hdf5",
        f"eval.episodes={episodes}",
        "log.wandb=disabled",
        "log.plots=false",
        "log.progress=false",
    ]
    _run(
        "finetune.py",
        [
            "--cfg",
            "pick_place.yaml",
            *common,
            "collect.episodes=200",
            "train.steps=600",
            "train.warmup_steps=50",
            "train.val_every=600",
            "train.save_every=600",
            f"train.out_dir={tmp_path}/runs",
            "train.run_name=ft",
        ],
        cwd=tmp_path,
    )
    summary = json.loads((tmp_path / "runs" / "ft" / "summary.json").read_text())
    assert summary["steps"] == 600 and summary["params"]["trainable_pct"] == 100.0  # every parameter
    tuned = json.loads(next((tmp_path / "runs" / "ft" / "eval").glob("final_*/eval.json")).read_text())
    _run(
        "evaluate.py",
        ["--cfg", "pick_place.yaml", *common, "--ckpt", str(BASE), f"eval.out_dir={tmp_path}/zero"],
        cwd=tmp_path,
    )
    zero = json.loads((tmp_path / "zero" / "eval.json").read_text())
    for report in (tuned, zero):
        assert report["manifest"]["seeds"] == [100_000, 100_000 + episodes - 1]
        assert len(report["episodes"]) == episodes
    assert [e["instruction"] for e in tuned["episodes"]] == [e["instruction"] for e in zero["episodes"]]
    assert summary["eval"]["success_rate"] == tuned["overall"]["success_rate"]
    assert zero["manifest"]["checkpoint_sha256"] == sha256_file(BASE / "model.safetensors")
    t, z = tuned["per_task"]["pick_place"], zero["per_task"]["pick_place"]
    print("fine-tuned", t["successes"], t["events"], "| zero-shot", z["successes"], z["events"])
    assert t["successes"] >= z["successes"]
    assert t["events"]["over_destination"] >= z["events"]["over_destination"] + 5, (t, z)


def test_export_copies_the_checkpoint_with_a_card_and_replaces_an_old_export(tmp_path):
    import torch

    sys.path.insert(0, str(REPO / "tests" / "models"))
    from model_helpers import make_info

    from vla_ft.config import ModelConfig
    from vla_ft.models import load_vla
    from vla_ft.train.export import export_run

    torch.manual_seed(0)
    ckpt = load_vla(ModelConfig(preset="tiny"), make_info()).save_pretrained(tmp_path / "run" / "step_1")
    (ckpt / "training_state").mkdir()
    cfg = load_config("pick_place.yaml", [f"data.paths=[{tmp_path}/missing.hdf5]"])
    summary = {"steps": 1, "val_loss": {"best": 0.5, "final": 0.5}, "eval": None, "params": {}}
    out = tmp_path / "export" / "base"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old export")
    export_run(cfg, tmp_path / "run", ckpt, summary, out)
    assert not (out / "stale.txt").exists() and not (out / "training_state").exists()
    assert not list(out.parent.glob(".base.*"))  # no temporary dirs left behind
    card = json.loads((out / "card.json").read_text())
    assert card["weights_sha256"] == sha256_file(out / "model.safetensors")
    assert card["summary"] == summary and card["versions"]["torch"]
    assert "Validation loss: best 0.5000" in (out / "README.md").read_text()
