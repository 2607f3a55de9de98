"""Scoring, reports and videos: pure functions, no simulator."""

import hashlib
import json

import imageio.v2 as imageio
import numpy as np
import pytest

from vla_ft.config import EnvConfig, EvalConfig
from vla_ft.eval.report import build_manifest, write_reports
from vla_ft.eval.scoring import EpisodeResult, aggregate, score_group, wilson_interval
from vla_ft.eval.video import compose_frames, write_video


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        (0, 10, 0.0, 0.27753),  # upper = z^2 / (n + z^2)
        (5, 10, 0.23659, 0.76341),
        (10, 10, 0.72247, 1.0),
    ],
)
def test_wilson_interval_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)


@pytest.mark.parametrize("k, n", [(1, 7), (81, 263), (95, 100), (3, 1000)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    # The Wilson bounds are the two p with (k/n - p)^2 = z^2 p (1 - p) / n.
    z = 1.959963984540054
    for p in wilson_interval(k, n):
        assert (k / n - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-9, abs=1e-15)


def test_wilson_interval_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for n in (1, 2, 7, 100, 1000):  # exact ends: the rate never falls outside its own interval
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
    with pytest.raises(ValueError, match="successes=3"):
        wilson_interval(3, 2)


def _episodes():
    return [
        EpisodeResult(
            0,
            10,
            "pick_place",
            "put the red cube in the blue bowl",
            True,
            40,
            "success",
            events={"grasped": 12, "grasped_other": None, "over_destination": 30},
        ),
        EpisodeResult(
            1,
            11,
            "pick_place",
            "put the red cube in the blue bowl",
            False,
            160,
            "timeout",
            events={"grasped": None, "grasped_other": 9, "over_destination": None},
        ),
        EpisodeResult(
            2,
            12,
            "pick_place",
            "put the green cube in the red bowl",
            True,
            60,
            "success",
            events={"grasped": 20, "grasped_other": 5, "over_destination": 41},
        ),
        EpisodeResult(3, 13, "reach", "touch the red cube", False, 7, "worker_crash"),
    ]


def test_aggregate_overall_per_task_and_instruction():
    scores = aggregate(_episodes())
    overall = scores["overall"]
    assert (overall.episodes, overall.successes, overall.success_rate) == (4, 2, 0.5)
    assert overall.mean_steps_to_success == 50.0
    assert overall.failure_reasons == {"timeout": 1, "worker_crash": 1}
    assert overall.ci95 == wilson_interval(2, 4)
    assert set(scores["per_task"]) == {"pick_place", "reach"}
    assert scores["per_task"]["reach"].mean_steps_to_success is None
    assert scores["per_instruction"]["put the red cube in the blue bowl"].successes == 1
    assert score_group([]).success_rate == 0.0
    # episodes in which each event happened; a crash reports none and counts in no column
    assert scores["per_task"]["pick_place"].events == {
        "grasped": 2,
        "grasped_other": 2,
        "over_destination": 2,
    }
    assert overall.events == {"grasped": 2, "grasped_other": 2, "over_destination": 2}
    assert scores["per_task"]["reach"].events == {}


def test_reports_json_and_markdown(tmp_path):
    eps = _episodes()
    scores = aggregate(eps)
    env_cfg, eval_cfg = EnvConfig(), EvalConfig(episodes=4, seed=10)
    report = {
        "overall": scores["overall"].to_dict(),
        "per_task": {k: v.to_dict() for k, v in scores["per_task"].items()},
        "per_instruction": {k: v.to_dict() for k, v in scores["per_instruction"].items()},
        "episodes": [e.to_dict() for e in eps],
        "manifest": build_manifest(env_cfg, eval_cfg, 4, "expert", None, None),
    }
    json_path, md_path = write_reports(report, tmp_path)
    loaded = json.loads(json_path.read_text())
    manifest = loaded["manifest"]
    for pkg in ("python", "numpy", "torch", "mujoco", "gymnasium", "vla-ft"):
        assert manifest["versions"][pkg], pkg
    assert manifest["seeds"] == [10, 13]
    assert manifest["image_size"] == 64 and manifest["episodes"] == 4
    assert loaded["episodes"][3]["reason"] == "worker_crash"
    md = md_path.read_text()
    assert "| **all** | 2/4 | 50.0% |" in md
    assert "| reach | 0/1 | 0.0% |" in md and "worker_crash: 1" in md
    assert loaded["episodes"][1]["events"] == {"grasped": None, "grasped_other": 9, "over_destination": None}
    assert "| pick_place | grasped | grasped_other | over_destination |" in md
    assert "| of 3 | 2 | 2 | 2 |" in md
    assert "| reach |" not in md.split("## Events per task")[1]  # no events, no row


def test_checkpoint_hash_in_manifest(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    manifest = build_manifest(EnvConfig(), EvalConfig(), 1, "VLAPolicy", None, tmp_path)
    assert manifest["checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert manifest["checkpoint"] == str(tmp_path)


def test_video_side_by_side_with_instruction(tmp_path):
    t, h, w = 5, 16, 16
    frames = {
        "agentview_image": np.full((t, h, w, 3), 200, np.uint8),
        "wrist_image": np.zeros((t, h, w, 3), np.uint8),
    }
    video = compose_frames(frames, "put the red cube in the blue bowl")
    scale = 192 // h  # upscaled to at least 192 px high
    assert video.shape == (t, 24 + h * scale, 2 * w * scale, 3)
    assert video[0, 24:, : w * scale].min() == 200 and video[0, 24:, w * scale :].max() == 0
    assert video[0, :24].max() > 200  # instruction text drawn in white on black
    path = write_video(tmp_path, 3, False, "Put the RED cube / blue bowl!", frames)
    assert path.name == "ep0003_failure_put_the_red_cube_blue_bowl.mp4"
    read = imageio.mimread(path)
    assert len(read) == t and read[0].shape == video.shape[1:]


def test_wandb_logging_only_into_an_active_run(tmp_path, monkeypatch):
    import wandb

    from vla_ft.eval.report import log_wandb

    eps = _episodes()
    scores = aggregate(eps)
    report = {
        "overall": scores["overall"].to_dict(),
        "per_task": {k: v.to_dict() for k, v in scores["per_task"].items()},
        "episodes": [e.to_dict() for e in eps],
    }
    assert wandb.run is None
    assert log_wandb(report, []) is False  # never starts a run itself
    frames = {"agentview_image": np.zeros((3, 16, 16, 3), np.uint8)}
    video = write_video(tmp_path, 0, True, "put the red cube in the blue bowl", frames)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(project="vla-ft-test", dir=str(tmp_path), mode="offline")
    logged = []
    real_log = wandb.log
    monkeypatch.setattr(
        wandb, "log", lambda data, step=None: (logged.append((data, step)), real_log(data, step=step))
    )
    try:
        assert log_wandb(report, [str(video)], step=5) is True
        ((data, step),) = logged
        assert step == 5 and data["eval/success_rate"] == 0.5 and data["eval/success_rate/reach"] == 0.0
        assert isinstance(data["eval/episodes_table"], wandb.Table)
        assert isinstance(data[f"eval/video/{video.stem}"], wandb.Video)
    finally:
        run.finish()


def test_video_keeper_keeps_lowest_numbered_and_stops_recording_early():
    from vla_ft.eval.rollout import _VideoKeeper

    keeper = _VideoKeeper(2)
    frames = {"agentview_image": np.zeros((1, 8, 8, 3), np.uint8)}
    for index, success in [(5, True), (1, True), (3, True), (0, False), (2, False)]:
        assert keeper.may_keep(index)
        keeper.offer(index, success, frames)
    assert sorted(keeper.all()) == [0, 1, 2, 3]  # successes 1, 3 (5 evicted); failures 0, 2
    assert not keeper.may_keep(6)  # both buckets full with lower numbers: no need to record
    assert keeper.may_keep(2) is True and _VideoKeeper(0).may_keep(0) is False
