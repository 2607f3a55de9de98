"""train.parallel=ddp|fsdp: two gloo processes on the CPU against one process with the same global batch.

The model is ``tiny-vlm`` (no batch norm, so a rank's micro-batch normalizes like the global batch
would; docs/traps.md), the data has no action padding (``data.chunk=1``: a rank's masked mean is the
global mean) and no augmentation: the per-step losses must then agree to float round-off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vla_ft.config import load_config
from vla_ft.errors import ConfigError
from vla_ft.models import VLAPolicy
from vla_ft.train.distributed import micro_batch_size, setup_distributed, transformer_blocks
from vla_ft.train.finetune import run_finetune
from vla_ft.train.logging import read_metrics

REPO = Path(__file__).resolve().parents[2]
EXACT = {
    "data.chunk": 1,
    "data.augment.enabled": "false",
    "model.preset": "tiny-vlm",
    # tiny-vlm has no keypoint heat maps for the config's grounding term
    "loss.task_terms": "{task_id: 1.0, progress: 1.0, waypoint: 5.0}",
}
RUN = {"train.steps": 6, "train.save_every": 3, "train.val_every": 3, "train.batch_size": 8}


def _losses(run_dir: Path) -> dict[tuple[int, str], float]:
    return {(r["step"], r["split"]): r["loss"] for r in read_metrics(run_dir)}


def _torchrun(overrides: list[str], nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(REPO / "scripts" / "finetune.py"), "--cfg", "pick_place.yaml", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def reference(reach_file, tmp_path_factory, tiny_overrides):
    """One process, global batch 8: per-step losses and the final weights."""
    out = tmp_path_factory.mktemp("single")
    cfg = load_config("pick_place.yaml", tiny_overrides(reach_file, out, **EXACT, **RUN))
    result = run_finetune(cfg)
    return _losses(result.run_dir), VLAPolicy.from_pretrained(result.run_dir / "last").state_dict()


def _assert_same_losses(got: dict, want: dict, steps) -> None:
    assert sorted(got) == sorted(k for k in want if k[0] in steps), (sorted(got), sorted(want))
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


@pytest.mark.dist
@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(reach_file, tmp_path, tiny_overrides, reference):
    want, _ = reference
    _torchrun(tiny_overrides(reach_file, tmp_path, **EXACT, **RUN, **{"train.parallel": "ddp"}))
    run = tmp_path / "t"
    _assert_same_losses(_losses(run), want, range(1, 7))  # every step logged once: rank 0 only
    summary = json.loads((run / "summary.json").read_text())
    assert summary["parallel"] == {"mode": "ddp", "world_size": 2}
    state_dir = run / "last" / "training_state"
    assert (state_dir / "dcp").is_dir() and (state_dir / "rng_rank1.pt").is_file()
    VLAPolicy.from_pretrained(run / "best")  # the ordinary format, written by rank 0


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_and_resume_with_one(
    reach_file, tmp_path, tiny_overrides, reference
):
    want, final_weights = reference
    _torchrun(tiny_overrides(reach_file, tmp_path / "fsdp", **EXACT, **RUN, **{"train.parallel": "fsdp"}))
    run = tmp_path / "fsdp" / "t"
    _assert_same_losses(_losses(run), want, range(1, 7))
    # model.safetensors holds the gathered full weights (rank 0), loadable as any checkpoint
    saved = VLAPolicy.from_pretrained(run / "last").state_dict()
    for name, value in final_weights.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-4, atol=1e-6, msg=name)

    # saved with 2 ranks, resumed with 1 (no process group): DCP reshards model and optimizer
    ckpt = run / "checkpoints" / "step_0000003"
    extra = {**EXACT, **RUN, "train.resume": str(ckpt), "train.run_name": "one"}
    resumed = run_finetune(load_config("pick_place.yaml", tiny_overrides(reach_file, tmp_path, **extra)))
    _assert_same_losses(_losses(resumed.run_dir), want, range(4, 7))


@pytest.mark.dist
def test_fsdp_cpu_offload_in_one_process_matches(reach_file, tmp_path, tiny_overrides, reference):
    """train.parallel=fsdp without torchrun: a group of one (FSDP2's CPU offload on one GPU)."""
    want, _ = reference
    extra = {**EXACT, **RUN, "train.steps": 3, "train.parallel": "fsdp", "train.cpu_offload": "true"}
    result = run_finetune(load_config("pick_place.yaml", tiny_overrides(reach_file, tmp_path, **extra)))
    assert not torch.distributed.is_initialized()  # the group it created is gone
    # train.steps changes the cosine schedule's length: compare the first step (same lr at warmup)
    assert _losses(result.run_dir)[(1, "train")] == pytest.approx(want[(1, "train")], rel=1e-6)


def test_global_batch_must_divide_over_ranks_and_accumulation():
    assert micro_batch_size(32, 2, 4) == 4
    with pytest.raises(
        ConfigError,
        match=r"batch_size=30 is the global batch .* \(4\) x world size \(2\) = 8: use e.g. 24 or 32",
    ):
        micro_batch_size(30, 4, 2)


def test_parallel_none_under_torchrun_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun started 2 processes: set train.parallel=ddp"):
        setup_distributed("none", "cpu")


def test_fsdp_shards_every_transformer_block_not_cnn_stages():
    from vla_ft.config import ModelConfig
    from vla_ft.models import ModelDims, build_policy

    dims = ModelDims(action_dim=4, state_dim=5, image_keys=["agentview_image"], image_size=(64, 64))
    with torch.device("meta"):
        vlm = build_policy(ModelConfig(preset="tiny-vlm"), dims)
        native = build_policy(ModelConfig(preset="tiny"), dims)
    names = {id(m): n for n, m in vlm.named_modules()}
    got = sorted(names[id(b)] for b in transformer_blocks(vlm))
    assert got == [
        "backbone.model.text_model.layers.0",
        "backbone.model.text_model.layers.1",
        "backbone.model.vision_model.encoder.layers.0",
        "backbone.model.vision_model.encoder.layers.1",
    ]
    native_names = {id(m): n for n, m in native.named_modules()}
    assert [native_names[id(b)] for b in transformer_blocks(native)] == [
        "backbone.language.model.layers.0",
        "backbone.language.model.layers.1",
    ]


@pytest.mark.dist
@pytest.mark.slow
def test_smolvla_fsdp_shards_its_layers_and_matches_ddp(reach_file, tmp_path, tiny_overrides):
    """A LeRobot SmolVLA checkpoint under FSDP2 (every VLM and expert layer sharded) takes the same
    steps as under DDP: each rank draws the same flow noise and times in both (the rank's RNG)."""
    from vla_ft.models.smolvla_io import load_lerobot_smolvla

    smolvla = {
        "model.pretrained": str(REPO / "tests" / "fixtures" / "lerobot" / "smolvla_tiny"),
        "model.action_head": "flow",
        "loss.task_terms": "{}",
        "data.chunk": 8,
        "data.augment.enabled": "false",
        "train.steps": 4,
        "train.save_every": 4,
        "train.val_every": 0,
        "train.batch_size": 8,
    }
    losses = {}
    for mode in ("ddp", "fsdp"):
        _torchrun(tiny_overrides(reach_file, tmp_path / mode, **smolvla, **{"train.parallel": mode}))
        losses[mode] = _losses(tmp_path / mode / "t")
    _assert_same_losses(losses["fsdp"], losses["ddp"], range(1, 5))
    load_lerobot_smolvla((tmp_path / "fsdp" / "t" / "last").resolve())  # gathered by rank 0, LeRobot's layout
