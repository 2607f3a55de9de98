"""`scripts/evaluate.py` end to end: a real (tiny, untrained) VLAPolicy checkpoint and the expert."""

import hashlib
import json

import pytest

from vla_ft.cli import main
from vla_ft.config import ModelConfig, load_config
from vla_ft.errors import CheckpointError
from vla_ft.eval.run import run_evaluate

pytestmark = pytest.mark.sim

KEYS = dict(image_keys=["agentview_image", "wrist_image"], state_keys=["ee_pos", "gripper_qpos"])


def _checkpoint(path, action_dim):
    from vla_ft.models import ModelDims, build_policy, save_pretrained

    dims = ModelDims(action_dim=action_dim, state_dim=5, image_size=(32, 32), **KEYS)
    save_pretrained(build_policy(ModelConfig(preset="tiny"), dims), path)
    return path


def _overrides(out_dir, episodes=2):
    return [
        "env.image_size=32",
        f"eval.episodes={episodes}",
        "eval.workers=2",
        "eval.num_envs=2",
        "eval.max_steps=8",
        f"eval.out_dir={out_dir}",
    ]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {a: _checkpoint(root / f"adim{a}", a) for a in (4, 7)}


def test_checkpoint_through_the_cli(ckpts, tmp_path, capsys):
    argv = ["evaluate", "--cfg", "pick_place.yaml", "--ckpt", str(ckpts[4]), *_overrides(tmp_path)]
    assert main(argv) == 0
    assert "success 0/2" in capsys.readouterr().out  # untrained: nothing succeeds in 8 steps
    report = json.loads((tmp_path / "eval.json").read_text())
    sha = hashlib.sha256((ckpts[4] / "model.safetensors").read_bytes()).hexdigest()
    assert report["manifest"]["checkpoint_sha256"] == sha
    assert report["manifest"]["policy"] == "VLAPolicy"
    assert report["manifest"]["obs_preprocessing"]["image_keys"] == KEYS["image_keys"]
    assert [e["reason"] for e in report["episodes"]] == ["timeout", "timeout"]


def test_checkpoint_with_wrong_action_dim_fails_before_rollout(ckpts, tmp_path, capsys):
    cfg = load_config("pick_place.yaml", _overrides(tmp_path))
    with pytest.raises(CheckpointError, match=r"action_dim=7 does not match env 'pick_place' action dim 4"):
        run_evaluate(cfg, ckpt=ckpts[7], policy="checkpoint")
    assert not (tmp_path / "eval.json").exists()
    argv = ["evaluate", "--cfg", "pick_place.yaml", "--ckpt", str(ckpts[7]), *_overrides(tmp_path)]
    assert main(argv) == 2  # one line on stderr, no traceback
    err = capsys.readouterr().err
    assert err.startswith("error: policy action_dim=7") and "Traceback" not in err


def test_missing_checkpoint_dir_is_a_clear_error(tmp_path, capsys):
    argv = ["evaluate", "--cfg", "pick_place.yaml", "--ckpt", str(tmp_path / "nope"), *_overrides(tmp_path)]
    assert main(argv) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err


def test_expert_through_the_cli(tmp_path, capsys):
    argv = ["evaluate", "--cfg", "pick_place.yaml", "--policy", "expert", *_overrides(tmp_path, 4)]
    argv[-2] = "eval.max_steps=200"
    assert main([*argv, "eval.video=1"]) == 0
    assert "success 4/4 = 100.0%" in capsys.readouterr().out
    assert (tmp_path / "eval.md").is_file() and len(list((tmp_path / "videos").glob("*.mp4"))) == 1
