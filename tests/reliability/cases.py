"""The bad-input battery: every way a user can hand the main job a broken config, checkpoint or file.

Each case builds its broken input from good ones (a small trajectory file and a tiny checkpoint),
runs ``finetune`` (or ``evaluate``) in-process through the CLI entry point and checks what the user
gets: a non-zero exit (2), one line that names the file/key/value and says what to do, no traceback,
and no file written under the output directory (a resumed run's directory stays as it was).

    python -m pytest tests/reliability -q           # the battery as tests
    python tests/reliability/cases.py               # the table of docs/reliability.md
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("WANDB_MODE", "disabled")

import contextlib
import errno
import importlib.util
import io
import json
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vla_ft.cli import run_command  # noqa: E402

_spec = importlib.util.spec_from_file_location("_train_conftest", REPO / "tests" / "train" / "conftest.py")
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)
write_reach_file, tiny_overrides = _train.write_reach_file, _train.tiny_overrides


@dataclass
class Base:
    """The good inputs every case starts from."""

    root: Path
    data: Path  # a small trajectory file (8 demos)
    ckpt: Path  # a trained tiny checkpoint (with training_state/ and manifest.json)
    run: Path  # the run directory ckpt came from (for resume cases)

    def copy_data(self, name: str) -> Path:
        dst = self.root / "inputs" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.data, dst)
        return dst

    def copy_ckpt(self, name: str, manifest: bool = True) -> Path:
        dst = self.root / "inputs" / name
        shutil.copytree(self.ckpt, dst)
        if not manifest:
            (dst / "manifest.json").unlink()
        return dst

    def copy_run(self, name: str) -> Path:
        dst = self.root / "inputs" / name
        shutil.copytree(self.run, dst, symlinks=True)
        return dst


@dataclass
class Run:
    """How a case runs: overrides (on the base config) or a full argv, and what the line must name."""

    expect: list[str]
    overrides: dict[str, object] = field(default_factory=dict)
    argv: list[str] | None = None
    command: str = "finetune"
    lines: int = 1
    patch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    out: Path | None = None  # the output directory to watch (default: the case's own)


@dataclass
class Case:
    name: str
    group: str
    promise: str
    make: Callable[[Base], Run]


CASES: list[Case] = []


def case(group: str, promise: str) -> Callable[[Callable[[Base], Run]], Callable[[Base], Run]]:
    def register(fn: Callable[[Base], Run]) -> Callable[[Base], Run]:
        CASES.append(Case(fn.__name__, group, promise, fn))
        return fn

    return register


# ---------------------------------------------------------------------------------------- helpers


def mutate_h5(b: Base, name: str, fn: Callable[[h5py.File], None]) -> Path:
    path = b.copy_data(name)
    with h5py.File(path, "r+") as h5:
        fn(h5)
    return path


def damage_chunk(path: Path, dataset: str, index: int) -> None:
    """Overwrite the stored (compressed) bytes of chunk ``index`` of ``dataset`` in place."""
    with h5py.File(path, "r") as h5:
        info = h5[dataset].id.get_chunk_info(index)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 4)
        fh.write(b"\xa5" * max(16, info.size // 2))


def replace(h5: h5py.File, where: str, value: np.ndarray) -> None:
    del h5[where]
    h5.create_dataset(where, data=value)


# ----------------------------------------------------------------------------------------- config


@case("config", "an unknown key names the closest valid one")
def unknown_key(b: Base) -> Run:
    return Run(["train.lrr", "train.lr"], {"train.lrr": "1e-4"})


@case("config", "a value of the wrong type names the key and the type")
def wrong_type(b: Base) -> Run:
    return Run(["train.steps"], {"train.steps": "many"})


@case("config", "a value out of range names the key and the valid range")
def out_of_range(b: Base) -> Run:
    return Run(["train.batch_size"], {"train.batch_size": "0"})


@case("config", "a value outside a fixed set lists the choices")
def bad_choice(b: Base) -> Run:
    return Run(["train.precision", "fp8"], {"train.precision": "fp8"})


@case("config", "a missing config file is named")
def missing_config_file(b: Base) -> Run:
    return Run(["nosuch.yaml"], argv=["--cfg", "nosuch.yaml"])


@case("config", "a YAML syntax error names the file")
def malformed_yaml(b: Base) -> Run:
    path = b.root / "inputs" / "broken.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("train:\n  steps: [1, 2\n  lr: 3\n")
    return Run(["broken.yaml"], argv=["--cfg", str(path)])


@case("config", "an override without '=' is named")
def override_without_equals(b: Base) -> Run:
    return Run(["train.steps"], argv=["--cfg", "pick_place.yaml", "train.steps"])


@case("config", "best_metric=success_rate without periodic evaluation")
def success_metric_without_eval(b: Base) -> Run:
    return Run(["train.eval_every"], {"train.best_metric": "success_rate", "train.eval_every": 0})


@case("config", "a global batch that does not split over accumulation steps")
def batch_not_divisible(b: Base) -> Run:
    return Run(["train.batch_size", "train.grad_accum"], {"train.batch_size": 9, "train.grad_accum": 2})


@case("config", "LoRA with progressive unfreezing")
def lora_with_unfreezing(b: Base) -> Run:
    return Run(["train.unfreeze_steps", "model.lora.r"], {"model.lora.r": 4, "train.unfreeze_steps": 2})


@case("model", "an unknown preset names the closest one")
def unknown_preset(b: Base) -> Run:
    return Run(["model.preset", "tiny"], {"model.preset": "tinny"})


# ------------------------------------------------------------------------------------- checkpoint


@case("checkpoint", "model.pretrained pointing at nothing")
def pretrained_missing(b: Base) -> Run:
    return Run(["nosuch_ckpt", "not found"], {"model.pretrained": str(b.root / "nosuch_ckpt")})


@case("checkpoint", "a hub id while offline says to download it elsewhere")
def pretrained_hub_offline(b: Base) -> Run:
    return Run(["model.pretrained", "offline"], {"model.pretrained": "someone/some-vla"})


@case("checkpoint", "a checkpoint without weights")
def ckpt_without_weights(b: Base) -> Run:
    path = b.copy_ckpt("no_weights")
    (path / "model.safetensors").unlink()
    return Run([str(path), "model.safetensors"], {"model.pretrained": str(path)})


@case("checkpoint", "truncated weights are caught by the manifest's size")
def ckpt_truncated(b: Base) -> Run:
    path = b.copy_ckpt("truncated")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return Run(["model.safetensors", "truncated", "re-copy"], {"model.pretrained": str(path)})


@case("checkpoint", "one changed byte is caught by the manifest's sha256")
def ckpt_bit_flip(b: Base) -> Run:
    path = b.copy_ckpt("bit_flip")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    return Run(["model.safetensors", "sha256", "re-copy"], {"model.pretrained": str(path)})


@case("checkpoint", "truncated weights without a manifest: the reader's error, as one line")
def ckpt_truncated_no_manifest(b: Base) -> Run:
    path = b.copy_ckpt("truncated_old", manifest=False)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return Run(["model.safetensors", "truncated or corrupt"], {"model.pretrained": str(path)})


@case("checkpoint", "a config.json that is not JSON")
def ckpt_config_not_json(b: Base) -> Run:
    path = b.copy_ckpt("bad_json", manifest=False)
    (path / "config.json").write_text('{"format": "vla_ft.policy", ')
    return Run(["config.json", "not valid JSON"], {"model.pretrained": str(path)})


@case("checkpoint", "a directory of another format (e.g. a bare HF model)")
def ckpt_other_format(b: Base) -> Run:
    path = b.copy_ckpt("other_format", manifest=False)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return Run(["config.json", "format"], {"model.pretrained": str(path)})


@case("checkpoint", "a damaged manifest.json")
def ckpt_manifest_garbage(b: Base) -> Run:
    path = b.copy_ckpt("bad_manifest")
    (path / "manifest.json").write_text("{{{")
    return Run(["manifest.json", "re-copy"], {"model.pretrained": str(path)})


@case("checkpoint", "train.resume naming a directory that is not a checkpoint")
def resume_not_a_checkpoint(b: Base) -> Run:
    path = b.root / "inputs" / "empty_dir"
    path.mkdir(parents=True, exist_ok=True)
    return Run(["train.resume", "training_state"], {"train.resume": str(path)})


@case("checkpoint", "a resume checkpoint with a damaged optimizer state")
def resume_damaged_optimizer(b: Base) -> Run:
    run = b.copy_run("damaged_optimizer")
    last = (run / "last").resolve()
    opt = last / "training_state" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:200])
    return Run(["optimizer.pt", "re-copy"], {"train.resume": str(last)}, out=run)


@case("checkpoint", "resume=auto when every checkpoint of the run is damaged")
def resume_auto_all_damaged(b: Base) -> Run:
    run = b.copy_run("all_damaged")
    for ckpt in (run / "checkpoints").iterdir():
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8])
    return Run(
        ["train.resume=auto", "passes verification"],
        {"train.resume": "auto", "train.out_dir": str(run.parent), "train.run_name": run.name},
        out=run,
    )


@case("checkpoint", "tokenizer files that do not load")
def ckpt_bad_tokenizer(b: Base) -> Run:
    path = b.copy_ckpt("bad_tokenizer", manifest=False)
    for file in path.glob("tokenizer*.json"):
        file.write_text("{ not json")
    return Run([str(path), "tokenizer"], {"model.pretrained": str(path)})


@case("checkpoint", "evaluate --ckpt on a damaged checkpoint")
def evaluate_damaged_ckpt(b: Base) -> Run:
    path = b.copy_ckpt("eval_damaged")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    out = b.root / "eval_out"
    argv = ["--cfg", "pick_place.yaml", "--ckpt", str(path), "eval.episodes=1", f"eval.out_dir={out}"]
    return Run(["model.safetensors", "re-copy"], argv=argv, command="evaluate", out=out)


SMOLVLA = REPO / "tests" / "fixtures" / "lerobot" / "smolvla_tiny"
FLOW = {
    "model.pretrained": str(SMOLVLA),
    "model.action_head": "flow",
    "loss.task_terms": "{}",
    "data.chunk": 8,
}


@case("checkpoint", "a SmolVLA checkpoint with another chunk length than the data's")
def smolvla_chunk_mismatch(b: Base) -> Run:
    return Run(["data.chunk=4", "set data.chunk=8"], {**FLOW, "data.chunk": 4})


@case("checkpoint", "task loss terms on a SmolVLA checkpoint (it has no task heads)")
def smolvla_task_terms(b: Base) -> Run:
    return Run(["loss.task_terms", "progress"], {**FLOW, "loss.task_terms": "{progress: 1.0}"})


@case("checkpoint", "a SmolVLA checkpoint whose SmolVLM directory is missing")
def smolvla_missing_vlm(b: Base) -> Run:
    path = b.root / "inputs" / "smolvla_no_vlm"
    shutil.copytree(SMOLVLA, path, ignore=shutil.ignore_patterns("vlm"))
    return Run(["vlm", "model.vlm"], {**FLOW, "model.pretrained": str(path)})


# ------------------------------------------------------------------------------------------- data


@case("data", "a missing dataset file names the collect command")
def data_missing(b: Base) -> Run:
    return Run(["nosuch.hdf5", "collect_demos.py"], {"data.paths": f"[{b.root / 'nosuch.hdf5'}]"})


@case("data", "an empty file")
def data_empty(b: Base) -> Run:
    path = b.root / "inputs" / "empty.hdf5"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return Run(["empty.hdf5", "empty file"], {"data.paths": f"[{path}]"})


@case("data", "a file that is not HDF5")
def data_not_hdf5(b: Base) -> Run:
    path = b.root / "inputs" / "notes.hdf5"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("demos, honestly\n" * 50)
    return Run(["notes.hdf5", "not an HDF5 file"], {"data.paths": f"[{path}]"})


@case("data", "a half-copied HDF5 file")
def data_truncated(b: Base) -> Run:
    path = b.copy_data("half.hdf5")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return Run(["half.hdf5", "truncated or corrupt"], {"data.paths": f"[{path}]"})


@case("data", "no data/ group")
def data_no_group(b: Base) -> Run:
    path = mutate_h5(b, "no_group.hdf5", lambda h5: h5.move("data", "demos"))
    return Run(["no_group.hdf5", "'data'"], {"data.paths": f"[{path}]"})


@case("data", "a data/ group without demos")
def data_no_demos(b: Base) -> Run:
    def empty(h5: h5py.File) -> None:
        for name in list(h5["data"]):
            del h5[f"data/{name}"]

    path = mutate_h5(b, "no_demos.hdf5", empty)
    return Run(["no_demos.hdf5", "no demos"], {"data.paths": f"[{path}]"})


@case("data", "a camera key the file does not have lists the keys it has")
def data_unknown_image_key(b: Base) -> Run:
    return Run(
        ["obs/frontview_image", "agentview_image", "data.image_keys"],
        {"data.image_keys": "[frontview_image]"},
    )


@case("data", "a state key the file does not have")
def data_unknown_state_key(b: Base) -> Run:
    return Run(["obs/joint_pos", "data.image_keys/state_keys"], {"data.state_keys": "[ee_pos, joint_pos]"})


@case("data", "an action key the file does not have")
def data_unknown_action_key(b: Base) -> Run:
    return Run(["demo_0/commands", "data.action_key"], {"data.action_key": "commands"})


@case("data", "demos with different action dimensions")
def data_action_dims_differ(b: Base) -> Run:
    path = mutate_h5(
        b, "dims.hdf5", lambda h5: replace(h5, "data/demo_3/actions", h5["data/demo_3/actions"][:, :3])
    )
    return Run(["dims.hdf5", "demo_3/actions", "action dim 3"], {"data.paths": f"[{path}]"})


@case("data", "float images instead of uint8")
def data_float_images(b: Base) -> Run:
    key = "data/demo_2/obs/agentview_image"
    path = mutate_h5(b, "floats.hdf5", lambda h5: replace(h5, key, h5[key][()].astype(np.float32) / 255))
    return Run(["floats.hdf5", "demo_2/obs/agentview_image", "uint8"], {"data.paths": f"[{path}]"})


@case("data", "an image stream shorter than the actions")
def data_length_mismatch(b: Base) -> Run:
    key = "data/demo_5/obs/wrist_image"
    path = mutate_h5(b, "short.hdf5", lambda h5: replace(h5, key, h5[key][:-3]))
    return Run(["short.hdf5", "demo_5/obs/wrist_image", "lengths must match"], {"data.paths": f"[{path}]"})


@case("data", "NaN actions (data.bad_demos=error)")
def data_nan_actions(b: Base) -> Run:
    def nan(h5: h5py.File) -> None:
        acts = h5["data/demo_4/actions"][()]
        acts[3, 1] = np.nan
        replace(h5, "data/demo_4/actions", acts)

    path = mutate_h5(b, "nan.hdf5", nan)
    return Run(["nan.hdf5", "demo_4/actions", "data.bad_demos=skip"], {"data.paths": f"[{path}]"})


@case("data", "every demo skipped under data.bad_demos=skip")
def data_all_skipped(b: Base) -> Run:
    def nan_all(h5: h5py.File) -> None:
        for name in list(h5["data"]):
            acts = h5[f"data/{name}/actions"][()]
            acts[0, 0] = np.inf
            replace(h5, f"data/{name}/actions", acts)

    path = mutate_h5(b, "all_nan.hdf5", nan_all)
    return Run(
        ["all_nan.hdf5", "every demo was skipped"], {"data.paths": f"[{path}]", "data.bad_demos": "skip"}
    )


@case("data", "a damaged image chunk, images cached in RAM: found at start")
def data_damaged_chunk_ram(b: Base) -> Run:
    path = b.copy_data("chunk_ram.hdf5")
    damage_chunk(path, "data/demo_6/obs/agentview_image", 7)
    return Run(
        ["chunk_ram.hdf5", "demo_6/obs/agentview_image", "cannot read"],
        {"data.paths": f"[{path}]", "data.cache_images": "ram"},
    )


def _damage_demo(b: Base, name: str) -> Path:
    path = b.copy_data(name)
    for t in range(16):
        damage_chunk(path, "data/demo_6/obs/agentview_image", t)
    return path


@case("data", "a damaged image chunk read lazily: one line mid-training, the last state saved")
def data_damaged_chunk_lazy(b: Base) -> Run:
    path = _damage_demo(b, "chunk_lazy.hdf5")
    over = {"data.paths": f"[{path}]", "data.cache_images": "lazy", "train.steps": 12}
    return Run(["chunk_lazy.hdf5", "demo_6/obs/agentview_image", "training stopped before step"], over)


@case("data", "the same in a DataLoader worker process (no worker traceback)")
def data_damaged_chunk_worker(b: Base) -> Run:
    path = _damage_demo(b, "chunk_worker.hdf5")
    over = {"data.paths": f"[{path}]", "data.cache_images": "lazy", "train.steps": 12, "data.num_workers": 1}
    return Run(["chunk_worker.hdf5", "demo_6/obs/agentview_image", "training stopped before step"], over)


@case("data", "a damaged chunk of the actions")
def data_damaged_actions(b: Base) -> Run:
    path = b.copy_data("chunk_actions.hdf5")
    with h5py.File(path, "r+") as h5:  # actions are stored contiguous: rewrite them chunked + gzip
        acts = h5["data/demo_1/actions"][()]
        del h5["data/demo_1/actions"]
        h5.create_dataset("data/demo_1/actions", data=acts, chunks=(4, acts.shape[1]), compression="gzip")
    damage_chunk(path, "data/demo_1/actions", 1)
    return Run(["chunk_actions.hdf5", "demo_1/actions", "cannot read"], {"data.paths": f"[{path}]"})


@case("data", "a mask naming a demo the file does not have")
def data_mask_unknown_demo(b: Base) -> Run:
    def bad_mask(h5: h5py.File) -> None:
        del h5["mask/valid"]
        h5.create_dataset("mask/valid", data=np.array([b"demo_99"]))

    path = mutate_h5(b, "mask.hdf5", bad_mask)
    return Run(["mask.hdf5", "demo_99"], {"data.paths": f"[{path}]"})


@case("data", "two files with different action dimensions")
def data_files_disagree(b: Base) -> Run:
    other = b.root / "inputs" / "other_dims.hdf5"
    write_reach_file(other, demos=4, steps=8)
    with h5py.File(other, "r+") as h5:
        for name in h5["data"]:
            replace(h5, f"data/{name}/actions", h5[f"data/{name}/actions"][:, :2])
    return Run(["other_dims.hdf5"], {"data.paths": f"[{b.data}, {other}]"})


@case("data", "a LeRobot dataset directory without meta/info.json")
def lerobot_without_info(b: Base) -> Run:
    root = b.root / "inputs" / "lerobot_broken"
    shutil.copytree(REPO / "tests" / "fixtures" / "lerobot" / "dataset_v3_image", root)
    (root / "meta" / "info.json").unlink()
    return Run(["info.json"], {"data.paths": f"[{root}]"})


# ------------------------------------------------------------------------------------ loss labels


@case("labels", "the waypoint term on data without an end-effector position")
def waypoint_without_ee(b: Base) -> Run:
    return Run(["loss.task_terms.waypoint", "data.waypoint_key"], {"data.state_keys": "[gripper_qpos]"})


@case("labels", "the grounding term on a file without image targets")
def grounding_without_targets(b: Base) -> Run:
    path = mutate_h5(
        b, "no_targets.hdf5", lambda h5: [h5.__delitem__(f"data/{n}/targets") for n in list(h5["data"])]
    )
    return Run(["loss.task_terms.grounding", "no_targets.hdf5"], {"data.paths": f"[{path}]"})


@case("labels", "the grounding term on a model without keypoint heat maps")
def grounding_without_heatmaps(b: Base) -> Run:
    return Run(["loss.task_terms.grounding", "keypoints"], {"model.preset": "tiny-vlm"})


# -------------------------------------------------------------------------------------------- env


@case("env", "a misspelt task is named before training, with the closest task")
def env_task_typo(b: Base) -> Run:
    return Run(["env.task='pick_plase'", "pick_place"], {"env.task": "pick_plase", "eval.episodes": 2})


@case("env", "a gym id whose module does not import")
def env_gym_module_missing(b: Base) -> Run:
    return Run(
        ["env.gym_id", "nosuchpkg"],
        {"env.type": "gym", "env.gym_id": "nosuchpkg:Thing-v0", "eval.episodes": 2},
    )


@case("env", "a gym namespace no module registers says which module: prefix to write")
def env_gym_namespace(b: Base) -> Run:
    over = {"env.type": "gym", "env.gym_id": "No-Such-Suite/Thing-v0", "eval.episodes": 2}
    return Run(["env.gym_id", "<module>:No-Such-Suite/Thing-v0"], over)


@case("env", "a gym id that is not registered")
def env_gym_unknown(b: Base) -> Run:
    return Run(["env.gym_id", "CartPol"], {"env.type": "gym", "env.gym_id": "CartPol-v1", "eval.episodes": 2})


# The env check (vla_ft/eval/env_check.py): one env built as a worker builds it, compared with the
# data. The base file: 32 px agentview + wrist images, ee_pos (3) + gripper_qpos (2), 4-D actions.
ENV_OK = {"eval.episodes": 2, "env.image_size": 32}


@case("env", "the env lacks a camera the data has")
def env_missing_camera(b: Base) -> Run:
    return Run(["'wrist_image'", "env.cameras"], {**ENV_OK, "env.cameras": "[agentview]"})


@case("env", "the env's images have another aspect ratio than the data's")
def env_image_aspect(b: Base) -> Run:
    def widen(h5: h5py.File) -> None:  # 32x32 -> 32x48 (H x W)
        for name in list(h5["data"]):
            for key in ("agentview_image", "wrist_image"):
                where = f"data/{name}/obs/{key}"
                replace(h5, where, np.pad(h5[where][()], ((0, 0), (0, 0), (8, 8), (0, 0))))

    path = mutate_h5(b, "wide.hdf5", widen)
    return Run(["'agentview_image'", "32x32", "32x48", "stretched"], {**ENV_OK, "data.paths": f"[{path}]"})


@case("env", "a state key with another number of values than the data's")
def env_state_dim(b: Base) -> Run:
    def grow(h5: h5py.File) -> None:  # gripper_qpos: 2 -> 7 values
        for name in list(h5["data"]):
            where = f"data/{name}/obs/gripper_qpos"
            replace(h5, where, np.tile(h5[where][()], (1, 4))[:, :7])

    path = mutate_h5(b, "state7.hdf5", grow)
    return Run(
        ["'gripper_qpos' has 2 values", "has 7", "data.state_keys"], {**ENV_OK, "data.paths": f"[{path}]"}
    )


@case("env", "the env's action dimension differs from the data's")
def env_action_dim(b: Base) -> Run:
    def seven(h5: h5py.File) -> None:
        for name in list(h5["data"]):
            acts = h5[f"data/{name}/actions"][()]
            replace(h5, f"data/{name}/actions", np.concatenate([acts, acts[:, :3]], axis=1))

    path = mutate_h5(b, "actions7.hdf5", seven)
    return Run(["4-dim actions", "have 7 dims", "env.task"], {**ENV_OK, "data.paths": f"[{path}]"})


@case("env", "a gym id whose env cannot be made with the given kwargs")
def env_gym_build_fails(b: Base) -> Run:
    over = {**ENV_OK, "env.type": "gym", "env.gym_id": "CartPole-v1", "env.gym_kwargs": "{no_such_kwarg: 1}"}
    return Run(["env.gym_id='CartPole-v1'", "could not be built", "env.gym_kwargs"], over)


@case("env", "evaluate --ckpt in an env without a camera the checkpoint reads")
def evaluate_env_missing_camera(b: Base) -> Run:
    out = b.root / "eval_cam_out"
    argv = ["--cfg", "pick_place.yaml", "--ckpt", str(b.ckpt), "eval.episodes=1", "env.image_size=32",
            "env.cameras=[agentview]", f"eval.out_dir={out}"]  # fmt: skip
    return Run(["'wrist_image'", "the checkpoint", "env.cameras"], argv=argv, command="evaluate", out=out)


# ----------------------------------------------------------------------------------------- output


@case("output", "an output directory under a regular file")
def out_dir_under_file(b: Base) -> Run:
    blocker = b.root / "inputs" / "a_file"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("x")
    return Run(
        ["train.out_dir", "is a file"], {"train.out_dir": str(blocker / "runs")}, out=blocker.parent / "none"
    )


@contextlib.contextmanager
def _tiny_disk() -> Iterator[None]:
    from vla_ft.train import preflight

    real = preflight.shutil.disk_usage
    preflight.shutil.disk_usage = lambda p: real(p)._replace(free=1 << 20)  # 1 MiB left
    try:
        yield
    finally:
        preflight.shutil.disk_usage = real


@case("output", "too little free disk for one checkpoint (before training)")
def out_dir_disk_full(b: Base) -> Run:
    return Run(["train.out_dir", "free", "needs about"], patch=_tiny_disk)


@contextlib.contextmanager
def _enospc_on_save() -> Iterator[None]:
    import torch

    real = torch.save

    def full(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    torch.save = full
    try:
        yield
    finally:
        torch.save = real


@case("output", "the disk fills up during a checkpoint save (mid-training)")
def disk_full_mid_save(b: Base) -> Run:
    return Run(
        ["disk full while saving", "needs about"],
        {"train.steps": 3, "train.save_every": 2},
        patch=_enospc_on_save,
    )


# ---------------------------------------------------------------------------------------- several


@case("several", "three independent problems are reported together")
def three_problems(b: Base) -> Run:
    over = {
        "model.preset": "tinny",
        "data.paths": f"[{b.root / 'absent.hdf5'}]",
        "env.task": "stack_cubez",
        "eval.episodes": 2,
    }
    return Run(["3 problems", "model.preset", "absent.hdf5", "env.task"], over, lines=4)


@case("several", "a wrong preset and a malformed data file are both reported")
def preset_and_bad_file(b: Base) -> Run:
    path = mutate_h5(b, "both.hdf5", lambda h5: h5.move("data", "demos"))
    return Run(
        ["2 problems", "model.preset", "both.hdf5"],
        {"model.preset": "tinny", "data.paths": f"[{path}]"},
        lines=3,
    )


CASE_NAMES = [c.name for c in CASES]
# cases whose run trains (and so may write a run directory) before failing
TRAINS = {"disk_full_mid_save", "data_damaged_chunk_lazy", "data_damaged_chunk_worker"}


# ----------------------------------------------------------------------------------------- runner


def make_base(root: Path) -> Base:
    """A trajectory file and a 4-step tiny run (its checkpoint and run directory)."""
    root.mkdir(parents=True, exist_ok=True)
    data = write_reach_file(root / "reach.hdf5")
    argv = [
        "--cfg",
        "pick_place.yaml",
        *tiny_overrides(data, root / "base_runs", **{"train.steps": 4, "train.save_every": 2}),
    ]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run_command("finetune", argv) == 0
    run = root / "base_runs" / "t"
    return Base(root, data, (run / "last").resolve(), run)


def listing(path: Path) -> list[str]:
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@dataclass
class Outcome:
    code: int
    stderr: str
    written: list[str]  # files that appeared (or vanished) under the watched output directory
    problems: list[str]  # why the case is not handled (empty: handled)


def run_case(c: Case, base: Base) -> Outcome:
    spec = c.make(base)
    out = base.root / "cases" / c.name
    if spec.argv is not None:
        argv = spec.argv
    else:
        over = {"train.steps": 4, "train.save_every": 0, "train.val_every": 0, **spec.overrides}
        argv = ["--cfg", "pick_place.yaml", *tiny_overrides(base.data, out, **over)]
    watch = spec.out or out
    before = listing(watch)
    err = io.StringIO()
    with (
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        with spec.patch():
            try:
                code = run_command(spec.command, argv)
            except BaseException as exc:  # noqa: BLE001 (the battery records what escaped)
                code = -1
                err.write(f"Traceback (escaped): {type(exc).__name__}: {exc}\n")
    text = err.getvalue()
    after = listing(watch)
    written = sorted(set(after) ^ set(before))
    if c.name in TRAINS:  # a training run keeps its completed checkpoints; nothing partial may remain
        written = [p for p in written if ".tmp" in p]
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    problems = []
    if code != 2:
        problems.append(f"exit status {code}, expected 2")
    if "Traceback" in text:
        problems.append("a traceback reached the user")
    if len(lines) != spec.lines:
        problems.append(f"{len(lines)} lines on stderr, expected {spec.lines}")
    if lines and not lines[0].startswith("error: "):
        problems.append("the message does not start with 'error: '")
    missing = [e for e in spec.expect if e not in text]
    if missing:
        problems.append(f"the message does not name {missing}")
    if written:
        problems.append(f"files written: {written[:5]}")
    return Outcome(code, text, written, problems)


def main() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(Path(tmp))
        rows, handled = [], 0
        for c in CASES:
            outcome = run_case(c, base)
            ok = not outcome.problems
            handled += ok
            first = outcome.stderr.strip().splitlines()[0] if outcome.stderr.strip() else ""
            first = first.replace(str(base.root), "<tmp>").replace(str(REPO), "<repo>")
            first = first.replace("|", "\\|").replace("`", "'")
            rows.append(
                f"| {c.group} | {c.promise} | {'yes' if ok else 'NO: ' + '; '.join(outcome.problems)} | `{first[:160]}` |"
            )
    print(f"{handled} of {len(CASES)} cases handled\n")
    print("| group | case | handled | what the user reads (first line, shortened) |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0 if handled == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
