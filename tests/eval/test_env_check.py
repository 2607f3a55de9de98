"""The env check before training and evaluation (vla_ft/eval/env_check.py, env_match.py) and
gymnasium ids.

Every mismatch kind is compared here on specs (fast, no process); the spawned build is tested on
this suite, gymnasium ids and the env examples of docs/eval.md; the CLI cases (exit 2, one line,
no run directory) are in the bad-input battery (tests/reliability/cases.py, group ``env``) and,
for a missing optional extra and an env without instructions, below.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from vla_ft.config import EnvConfig, EvalConfig, ModelConfig, load_config
from vla_ft.errors import CheckpointError, EnvError
from vla_ft.eval.env_check import EnvSpec, build_error, probe_envs
from vla_ft.eval.env_match import Expected, check_spec, fallback_instruction, instruction_warning

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))  # spawned processes inherit sys.path and import gym_test_envs too
_spec_ = importlib.util.spec_from_file_location("_train_conftest", REPO / "tests" / "train" / "conftest.py")
_train = importlib.util.module_from_spec(_spec_)
_spec_.loader.exec_module(_train)
write_reach_file, tiny_overrides = _train.write_reach_file, _train.tiny_overrides

SUITE = EnvConfig(image_size=32)
GYM = EnvConfig(
    type="gym", gym_id="x:Y-v0", image_map={"agentview_image": "render"}, state_map={"state": "obs"}
)
OBS = {
    "agentview_image": ((32, 32, 3), "uint8"),
    "wrist_image": ((32, 32, 3), "uint8"),
    "ee_pos": ((3,), "float32"),
    "gripper_qpos": ((2,), "float32"),
}


def _spec(obs=None, action_dim=4, name="pick_place", task="pick_place", instruction="put it there"):
    return EnvSpec(name, task, instruction, dict(OBS if obs is None else obs), action_dim, 160)


def _expected(source="the dataset", **kw):
    values = dict(
        image_keys=("agentview_image", "wrist_image"),
        state_keys=("ee_pos", "gripper_qpos"),
        state_dims=(3, 2) if source == "the dataset" else None,
        state_dim=5,
        action_dim=4,
        image_size=(32, 32),
        recorded_size=(32, 32) if source == "the dataset" else None,
    )
    values.update(kw)
    return Expected(source=source, **values)


# ------------------------------------------------------------------------------ comparing specs


def test_a_matching_env_passes_without_warnings():
    assert check_spec(_spec(), _expected(), SUITE) == []
    assert check_spec(_spec(), _expected("the checkpoint"), SUITE) == []


@pytest.mark.parametrize(
    "spec, expected, env_cfg, error, match",
    [
        pytest.param(  # obs keys: a camera the env does not render
            _spec({k: v for k, v in OBS.items() if k != "wrist_image"}), _expected(), SUITE, EnvError,
            r"^env 'pick_place' gives no observation 'wrist_image', one of the dataset's image keys "
            r".*: add camera 'wrist' to env\.cameras$",
            id="image_key",
        ),
        pytest.param(  # obs keys: a gym state key the map does not give
            _spec({"agentview_image": OBS["agentview_image"]}, name="x:Y-v0"),
            _expected(image_keys=("agentview_image",), state_keys=("state",), state_dims=(4,), state_dim=4),
            GYM, EnvError, r"gives no observation 'state'.*map it with env\.state_map\.state=<source>$",
            id="state_key",
        ),
        pytest.param(  # image size: another aspect ratio (the resize would stretch it)
            _spec(), _expected(recorded_size=(32, 48), image_size=(32, 48)), SUITE, EnvError,
            r"image 'agentview_image' is 32x32 \(H x W\) but the dataset's images are 32x48: resized .* "
            r"stretched; render the env's cameras at 32x48$",
            id="image_aspect",
        ),
        pytest.param(  # images: not an RGB image
            _spec({**OBS, "wrist_image": ((32, 32), "float32")}), _expected(), SUITE, EnvError,
            r"observation 'wrist_image' is float32 \(32, 32\), not a uint8 \(H, W, 3\) image",
            id="image_dtype",
        ),
        pytest.param(  # state dims: per key, named
            _spec(), _expected(state_dims=(7, 2), state_dim=9), SUITE, EnvError,
            r"observation 'ee_pos' has 3 values, the dataset's state key 'ee_pos' has 7: .*data\.state_keys",
            id="state_dim",
        ),
        pytest.param(  # state dims: a checkpoint knows the total only
            _spec(), _expected("the checkpoint", state_dim=7), SUITE, EnvError,
            r"state keys give 5 values \(ee_pos 3 \+ gripper_qpos 2\), the checkpoint's state has 7",
            id="state_total",
        ),
        pytest.param(  # state: a gym map to a slice of the wrong length
            _spec({"agentview_image": OBS["agentview_image"], "state": ((10,), "float32")}, name="x:Y-v0"),
            _expected(image_keys=("agentview_image",), state_keys=("state",), state_dims=(4,), state_dim=4),
            GYM, EnvError, r"'state' has 10 values, .* has 4: change env\.state_map\.state to give 4 values",
            id="state_map",
        ),
        pytest.param(
            _spec(action_dim=4), _expected(action_dim=7), SUITE, EnvError,
            r"^env 'pick_place' takes 4-dim actions but the dataset's actions have 7 dims: set env\.task",
            id="action_dim",
        ),
        pytest.param(
            _spec(action_dim=4), _expected("the checkpoint", action_dim=7), SUITE, CheckpointError,
            r"^policy action_dim=7 does not match env 'pick_place' action dim 4",
            id="action_dim_checkpoint",
        ),
    ],
)  # fmt: skip
def test_every_mismatch_is_one_line_naming_the_key_and_the_fix(spec, expected, env_cfg, error, match):
    with pytest.raises(error, match=match) as exc:
        check_spec(spec, expected, env_cfg)
    assert "\n" not in str(exc.value)


def test_another_image_size_runs_and_warns_only_when_resized_unlike_the_training_frames():
    big = {k: ((80, 80, 3), "uint8") if k.endswith("_image") else v for k, v in OBS.items()}
    (line,) = check_spec(_spec(big), _expected(), SUITE)  # one line for both cameras
    assert "'agentview_image', 'wrist_image' are 80x80, the dataset's are 32x32" in line
    assert "env.image_size=32" in line
    # data stored at 80 px, resized to 32 by data.image_size: the env's frames take the same resize
    assert check_spec(_spec(big), _expected(recorded_size=(80, 80)), SUITE) == []
    # a checkpoint does not know the size its data was stored at: no warning
    assert check_spec(_spec(big), _expected("the checkpoint"), SUITE) == []


def test_build_errors_become_one_line_with_the_install_command_or_the_cause():
    missing = ModuleNotFoundError("No module named 'robosuite'", name="robosuite")
    assert str(build_error(missing, EnvConfig(type="robosuite"))) == (
        "env.type=robosuite (robosuite) needs the 'robosuite' package, which is not installed: "
        "pip install -e '.[robosuite]'"
    )
    try:
        raise ValueError("camera 'front' unknown\nmore detail")
    except ValueError as exc:
        line = str(build_error(exc, GYM))
    assert re.match(
        r"env\.gym_id='x:Y-v0': the env could not be built: ValueError: camera 'front' unknown "
        r"\(at test_env_check\.py:\d+\); check env\.gym_id / env\.gym_kwargs",
        line,
    )


# ------------------------------------------------------------------------------ instructions


def test_an_env_without_instruction_gets_the_training_one():
    gym_cfg = EnvConfig(type="gym", gym_id="m:Reach-v0")
    bare = _spec(name="m:Reach-v0", task="m:Reach-v0", instruction="m:Reach-v0")  # the adapter's stand-in
    assert fallback_instruction(bare, gym_cfg, {"reach": ["reach the dot"]}) == "reach the dot"
    several = {"reach": ["reach the dot"], "push": ["push the cube", "shove the cube"]}
    named = _spec(name="m:Reach-v0", task="reach", instruction="")
    assert fallback_instruction(named, gym_cfg, several) == "reach the dot"  # the env's task's only one
    with pytest.raises(
        EnvError, match=r"gives no instruction and the policy was trained on 3 .* env\.instruction"
    ):
        fallback_instruction(bare, gym_cfg, several)
    # the env words its own, env.instruction is set, or the checkpoint predates stored instructions
    assert fallback_instruction(_spec(), SUITE, several) is None
    assert (
        fallback_instruction(bare, EnvConfig(type="gym", gym_id="m:Reach-v0", instruction="go"), several)
        is None
    )
    assert fallback_instruction(bare, gym_cfg, {}) is None


def test_a_configured_instruction_unknown_to_the_training_data_is_a_warning():
    trained = {"reach": ["reach the dot"]}
    assert (
        instruction_warning(EnvConfig(type="gym", gym_id="a:B-v0", instruction="reach the dot"), trained)
        is None
    )
    line = instruction_warning(EnvConfig(type="gym", gym_id="a:B-v0", instruction="go left"), trained)
    assert line.startswith("env.instruction='go left' is none of the 1 instructions") and "\n" not in line


def test_datasets_and_checkpoints_keep_each_tasks_instructions(tmp_path):
    from vla_ft.config import DataConfig
    from vla_ft.data.dataset import build_trajectory_datasets
    from vla_ft.models import ModelDims, VLAPolicy, build_policy, save_pretrained

    data = write_reach_file(tmp_path / "reach.hdf5", demos=4, steps=6)
    _, _, info = build_trajectory_datasets(DataConfig(paths=[str(data)]), seed=0)
    assert info.task_instructions == {
        "reach_red": ["reach the red square"],
        "reach_blue": ["reach the blue square"],
    }
    dims = ModelDims.from_info(info)
    assert dims.instructions == info.task_instructions
    policy = build_policy(ModelConfig(preset="tiny"), dims)
    loaded = VLAPolicy.from_pretrained(save_pretrained(policy, tmp_path / "ckpt"))
    assert loaded.dims.instructions == info.task_instructions


# ------------------------------------------------------------------------------ building (spawned)


@pytest.mark.sim
def test_the_spawned_check_builds_each_task_once_and_caches_the_result():
    cfg = EnvConfig(image_size=32, tasks=["pick_place", "reach"])
    t0 = time.perf_counter()
    specs = probe_envs(cfg, 20)
    first = time.perf_counter() - t0
    assert [s.name for s in specs] == ["pick_place", "reach"] and all(s.max_steps == 20 for s in specs)
    assert specs[0].obs == OBS and specs[0].action_dim == 4 and specs[0].instruction
    t0 = time.perf_counter()
    assert probe_envs(cfg, 20) is specs  # the same config again: no process
    assert time.perf_counter() - t0 < 0.2 < first


@pytest.mark.sim
@pytest.mark.parametrize(
    "gym_id, match",
    [
        ("CartPol-v1", r"^env\.gym_id='CartPol-v1': Environment `CartPol` doesn't exist"),
        ("nosuchpkg:Thing-v0", r"module 'nosuchpkg' .*cannot be imported .*install the package"),
        ("No-Such-Suite/Thing-v0", r"namespace 'No-Such-Suite' is not registered .*env\.gym_id=<module>:No-Such-Suite"),
    ],
)  # fmt: skip
def test_gym_ids_that_do_not_resolve_are_one_line(gym_id, match):
    with pytest.raises(EnvError, match=match) as exc:
        probe_envs(EnvConfig(type="gym", gym_id=gym_id), 5)
    assert "\n" not in str(exc.value)


@pytest.mark.sim
def test_a_bad_key_map_is_the_adapters_one_line():
    cfg = EnvConfig(
        type="gym", gym_id="gym_test_envs:ReacherGoal-v0", image_size=24,
        gym_kwargs={"width": 32, "height": 32}, image_map={"agentview_image": "pixels"},
    )  # fmt: skip
    with pytest.raises(EnvError, match=r"env\.image_map\.agentview_image='pixels': not 'render'"):
        probe_envs(cfg, 5)


def _docs_env_examples() -> list[tuple[str, dict]]:
    """Every YAML block of docs/eval.md that configures ``env``."""
    text = (REPO / "docs" / "eval.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    return [(str(b["env"].get("gym_id") or b["env"].get("tasks")), b) for b in blocks if "env" in b]


@pytest.mark.sim
@pytest.mark.parametrize("name, block", _docs_env_examples(), ids=[n for n, _ in _docs_env_examples()])
def test_every_env_example_of_the_docs_builds_as_written(name, block, tmp_path):
    if "Meta-World" in name:
        pytest.importorskip("metaworld")
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump({"base": str(REPO / "configs" / "pick_place.yaml"), **block}))
    cfg = load_config(path)
    specs = probe_envs(cfg.env, 5)
    assert len(specs) == len(cfg.env.tasks or [None])
    for spec in specs:
        images = [k for k, (shape, dtype) in spec.obs.items() if len(shape) == 3 and dtype == "uint8"]
        assert images and spec.action_dim > 0 and spec.max_steps == 5
    if cfg.env.type == "gym":
        assert specs[0].label == "Meta-World/MT1 (reach-v3)"  # named as it ran


@pytest.mark.sim
def test_a_namespaced_gym_id_runs_in_the_workers_without_a_module_prefix():
    pytest.importorskip("metaworld")
    from vla_ft.eval import evaluate

    cfg = EnvConfig(
        type="gym", gym_id="Meta-World/MT1", gym_kwargs={"env_name": "reach-v3", "seed": 0}, image_size=16,
        image_map={"agentview_image": "camera:corner"}, state_map={"ee_pos": "obs[0:3]"},
        success_key="success",
    )  # fmt: skip
    result = evaluate("random", cfg, EvalConfig(episodes=1, workers=1, num_envs=1, max_steps=3))
    assert result.report["manifest"]["tasks"] == ["Meta-World/MT1 (reach-v3)"]
    assert [e.task for e in result.episodes] == ["reach-v3"]


# ------------------------------------------------------------------------------ end to end


@pytest.mark.sim
def test_evaluation_feeds_the_training_instruction_when_the_gym_env_gives_none():
    from vla_ft.eval import evaluate
    from vla_ft.models import ModelDims, build_policy

    dims = ModelDims(
        action_dim=2, state_dim=10, image_keys=["agentview_image"], state_keys=["state"], image_size=(24, 24),
        task_names=["reach_red"], instructions={"reach_red": ["reach the red dot"]},
    )  # fmt: skip
    policy = build_policy(ModelConfig(preset="tiny"), dims).eval()
    cfg = EnvConfig(
        type="gym", gym_id="gym_test_envs:ReacherGoal-v0", image_size=24, gym_kwargs={"width": 32, "height": 32},
        image_map={"agentview_image": "render"}, state_map={"state": "obs"}, success_key="success",
    )  # fmt: skip
    result = evaluate(policy, cfg, EvalConfig(episodes=2, workers=1, num_envs=2, max_steps=3))
    assert [e.instruction for e in result.episodes] == ["reach the red dot"] * 2  # not the env's id
    policy.dims.instructions = {"reach_red": ["reach the red dot"], "reach_blue": ["reach the blue dot"]}
    with pytest.raises(EnvError, match=r"gives no instruction and the policy was trained on 2"):
        evaluate(policy, cfg, EvalConfig(episodes=1, workers=1, num_envs=1, max_steps=3))


def _user_lines(err: io.StringIO) -> list[str]:
    """What the job wrote to stderr, less torch's own log lines (``W1204 ...``: the first torch
    import in a process warns about deprecated registrations)."""
    return [ln for ln in err.getvalue().strip().splitlines() if not re.match(r"[WI]\d{4} ", ln)]


def _gym_demo_file(path: Path, instructions: list[str]) -> Path:
    """Demos shaped like ReacherGoal through the adapter below: a 24 px render, a 10-D state, 2-D actions."""
    from vla_ft.data.writer import DemoWriter

    rng = np.random.default_rng(0)
    with DemoWriter(path, {"env_name": "reacher"}, {"language_instruction": instructions[0]}) as w:
        for i in range(4):
            steps = 6
            w.add_demo(
                {"agentview_image": rng.integers(0, 255, (steps, 24, 24, 3), dtype=np.uint8),
                 "state": rng.normal(size=(steps, 10)).astype(np.float32)},
                rng.uniform(-1, 1, (steps, 2)).astype(np.float32), np.zeros(steps), np.zeros(steps),
                np.zeros((steps, 1)), {"language_instruction": instructions[i % len(instructions)]},
            )  # fmt: skip
        w.close(valid_fraction=0.25, seed=0)
    return path


def _gym_overrides(data: Path, out: Path, **extra) -> list[str]:
    values = {
        "data.paths": f"[{data}]", "data.collect_if_missing": "false", "data.image_keys": "[agentview_image]",
        "data.state_keys": "[state]", "model.pretrained": "null", "model.preset": "tiny", "loss.task_terms": "{}",
        "train.steps": 1, "train.warmup_steps": 0, "train.batch_size": 4, "train.val_every": 0, "train.save_every": 0,
        "train.out_dir": str(out), "train.run_name": "t", "train.threads": 1, "log.wandb": "disabled",
        "log.progress": "false", "log.plots": "false", "env.type": "gym",
        "env.gym_id": "gym_test_envs:ReacherGoal-v0", "env.image_size": 24, "env.gym_kwargs": "{width: 32, height: 32}",
        "env.image_map": "{agentview_image: render}", "env.state_map": "{state: obs}", "env.success_key": "success",
        "eval.episodes": 1, "eval.workers": 1, "eval.num_envs": 1, "eval.max_steps": 3,
    }  # fmt: skip
    values.update(extra)
    return ["--cfg", "pick_place.yaml", *[f"{k}={v}" for k, v in values.items()]]


@pytest.mark.sim
def test_finetune_stops_before_training_when_the_env_gives_no_instruction_and_the_data_has_several(tmp_path):
    from vla_ft.cli import run_command

    data = _gym_demo_file(tmp_path / "two.hdf5", ["reach the red dot", "reach the blue dot"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_command("finetune", _gym_overrides(data, tmp_path / "runs"))
    lines = _user_lines(err)
    assert code == 2 and len(lines) == 1, err.getvalue()
    assert lines[0].startswith("error: env 'gym_test_envs:ReacherGoal-v0' gives no instruction") and (
        "set env.instruction" in lines[0]
    )
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.sim
def test_finetune_warns_at_start_about_an_instruction_and_image_size_it_was_not_trained_on(tmp_path):
    from vla_ft.train.distributed import setup_distributed
    from vla_ft.train.finetune import prepare

    data = _gym_demo_file(tmp_path / "one.hdf5", ["reach the red dot"])
    over = {"env.instruction": "'go to the dot'", "env.image_size": 48}
    _, name, *overrides = _gym_overrides(data, tmp_path / "runs", **over)  # --cfg NAME key=value ...
    cfg = load_config(name, overrides)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        prepare(cfg, setup_distributed("none", "cpu"), tmp_path / "runs" / "t")
    lines = _user_lines(err)
    assert len(lines) == 2, lines
    assert lines[0].startswith("warning: env 'gym_test_envs:ReacherGoal-v0' image 'agentview_image' is 48x48")
    assert lines[1].startswith("warning: env.instruction='go to the dot' is none of the 1 instructions")
    assert not (tmp_path / "runs").exists()


@pytest.mark.sim
def test_a_missing_optional_extra_stops_finetune_with_the_install_command(tmp_path, monkeypatch):
    """metaworld hidden from the job: first on the path a package of that name whose import fails as
    a missing one does (the spawned check inherits the path). Exit 2, one line with the install
    command, no run directory."""
    from vla_ft.cli import run_command

    shadow = tmp_path / "shadow" / "metaworld"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'metaworld'\", name='metaworld')\n"
    )
    monkeypatch.syspath_prepend(str(shadow.parent))
    over = {"env.type": "gym", "env.gym_id": "Meta-World/MT1", "eval.episodes": 2}
    data = write_reach_file(tmp_path / "reach.hdf5", demos=4, steps=6)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_command(
            "finetune", ["--cfg", "pick_place.yaml", *tiny_overrides(data, tmp_path / "runs", **over)]
        )
    assert code == 2 and _user_lines(err) == [
        "error: env.gym_id='Meta-World/MT1': module 'metaworld' (it registers the Meta-World namespace) cannot "
        "be imported (no module named 'metaworld'); pip install -e '.[metaworld]'"
    ], err.getvalue()
    assert not (tmp_path / "runs").exists()


def test_no_env_is_built_when_the_run_does_not_evaluate_in_simulation(tmp_path, monkeypatch):
    from vla_ft.train import finetune
    from vla_ft.train.distributed import setup_distributed

    def no_build(*args):
        raise AssertionError("the env check ran for a run without simulation evaluation")

    monkeypatch.setattr(finetune, "EnvProbe", no_build)
    data = write_reach_file(tmp_path / "reach.hdf5", demos=4, steps=6)
    cfg = load_config("pick_place.yaml", tiny_overrides(data, tmp_path / "runs", **{"env.task": "reach"}))
    assert (cfg.eval.episodes, cfg.train.eval_every) == (0, 0)
    finetune.prepare(cfg, setup_distributed("none", "cpu"), tmp_path / "runs" / "t")
