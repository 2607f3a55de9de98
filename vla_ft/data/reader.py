"""Reading trajectory HDF5 files (robomimic and LIBERO layouts) with clear errors.

``scan_file`` opens one file, detects its layout, picks the observation keys, checks every demo
(keys present, lengths equal, images uint8 HWC, finite actions) and reads the low-dim arrays
(actions, state) into RAM. Images are not decoded here; :func:`read_frames` reads them later.

Every problem a user's file can have is a :class:`DataError` naming ``file: demo/key: what, fix``;
h5py exceptions never reach the user.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vla_ft.config import DataConfig
from vla_ft.data.scan import Demo, FileScan
from vla_ft.errors import DataError

# Per layout: slots of candidate keys; each slot takes the first key the file has.
DEFAULT_KEYS: dict[str, dict[str, list[list[str]]]] = {
    "robomimic": {
        "image": [["agentview_image"], ["wrist_image", "robot0_eye_in_hand_image"]],
        "state": [["ee_pos", "robot0_eef_pos"], ["gripper_qpos", "robot0_gripper_qpos"]],
    },
    "libero": {
        "image": [["agentview_rgb"], ["eye_in_hand_rgb"]],
        "state": [["ee_pos"], ["gripper_states"]],
    },
}
INSTRUCTION_ATTRS = ("language_instruction", "instruction")


@contextmanager
def open_h5(path: str | Path) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only, turning every way it can fail into one DataError."""
    h5 = open_h5_handle(path)
    try:
        yield h5
    finally:
        h5.close()


def open_h5_handle(path: str | Path) -> h5py.File:
    """Like :func:`open_h5` but returns the open handle (the caller closes it)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found; check data.paths (or collect demos first)")
    if p.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); re-collect or re-download it")
    if not h5py.is_hdf5(str(p)):
        raise DataError(f"{path}: not an HDF5 file; data.paths must name robomimic/LIBERO .hdf5 files")
    try:
        return h5py.File(str(p), "r")
    except OSError:
        raise DataError(
            f"{path}: cannot open: truncated or corrupt HDF5 file; re-collect or re-download it"
        ) from None


class UnreadableData(DataError):
    """A dataset whose stored bytes cannot be read (a truncated file or a damaged chunk)."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where  # the dataset, relative to data/ (demo_3/obs/agentview_image)


def unreadable(path: str | Path, where: str, what: str = "") -> UnreadableData:
    """The error for stored bytes that cannot be read: file, dataset (``what``, e.g. the frames)
    and the fix."""
    rel = where.removeprefix("data/")
    return UnreadableData(
        f"{path}: {rel}: cannot read{' ' + what if what else ''}: truncated or corrupt data; re-collect "
        "or re-download the file (or set data.bad_demos=skip to check every image chunk at start and "
        "drop the demos that fail)",
        rel,
    )


def read_array(h5: h5py.File, where: str, sel: Any = ()) -> np.ndarray:
    """``h5[where][sel]`` with read failures reported as a DataError naming file and key."""
    try:
        return h5[where][sel]
    except (OSError, RuntimeError):
        raise unreadable(h5.filename, where) from None


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return " ".join(_text(x) for x in v.reshape(-1))
    if isinstance(v, (list, tuple)):
        return " ".join(_text(x) for x in v)
    return str(v)


def _detect_layout(data: h5py.Group, first_obs: Sequence[str]) -> str:
    """Camera key names decide (our writer also stores ``problem_info``); else ``problem_info``."""
    if "agentview_rgb" in first_obs:
        return "libero"
    if "agentview_image" in first_obs:
        return "robomimic"
    return "libero" if "problem_info" in data.attrs else "robomimic"


def _default_keys(layout: str, kind: str, obs_keys: Sequence[str]) -> list[str]:
    out = []
    for slot in DEFAULT_KEYS[layout][kind]:
        found = [k for k in slot if k in obs_keys]
        if found:
            out.append(found[0])
    return out


def _file_keys(data: h5py.Group) -> dict[str, list[str]]:
    """Default keys a file names itself: ``data.attrs["obs_keys"]`` = JSON {"image": [...], "state": [...]}
    (scripts/convert_lerobot.py writes it); {} when absent."""
    raw = data.attrs.get("obs_keys")
    if raw is None:
        return {}
    try:
        keys = json.loads(_text(raw))
    except json.JSONDecodeError:
        keys = None
    if not isinstance(keys, dict) or not all(
        isinstance(v, list) and all(isinstance(k, str) for k in v) for v in keys.values()
    ):
        raise DataError(
            f'{data.file.filename}: data attrs \'obs_keys\' is not JSON {{"image": [...], "state": [...]}}; '
            "fix or remove it"
        )
    return keys


def _file_instruction(data: h5py.Group) -> str | None:
    raw = data.attrs.get("problem_info")
    if raw is None:
        return None
    try:
        info = json.loads(_text(raw))
    except json.JSONDecodeError:
        raise DataError(
            f"{data.file.filename}: data attrs 'problem_info' is not valid JSON; fix or remove it"
        ) from None
    lang = info.get("language_instruction") if isinstance(info, dict) else None
    if isinstance(lang, list) and all(isinstance(c, str) and len(c) == 1 for c in lang):
        lang = "".join(lang)  # some LIBERO tooling stores the instruction as a list of characters
    return _text(lang).strip() if lang else None


def _instruction(grp: h5py.Group, file_lang: str | None, cfg: DataConfig) -> str:
    for attr in INSTRUCTION_ATTRS:
        if attr in grp.attrs and _text(grp.attrs[attr]).strip():
            return _text(grp.attrs[attr]).strip()
    if file_lang:
        return file_lang
    if cfg.instruction:
        return cfg.instruction
    raise DataError(
        f"{grp.file.filename}: {grp.name.removeprefix('/data/')}: no language instruction (no "
        "'language_instruction' attr on the demo, no 'problem_info' in data attrs); set data.instruction"
    )


def _read_masks(h5: h5py.File, demo_names: set[str]) -> dict[str, list[str]]:
    masks: dict[str, list[str]] = {}
    if "mask" not in h5:
        return masks
    for key in h5["mask"]:
        names = [_text(n) for n in read_array(h5, f"mask/{key}")]
        unknown = sorted(set(names) - demo_names)
        if unknown:
            raise DataError(
                f"{h5.filename}: mask/{key}: names demos not in data/: {', '.join(unknown[:5])}; fix the filter key"
            )
        masks[key] = names
    return masks


class _DemoChecker:
    """Checks one demo against the file's keys and reads its low-dim arrays."""

    def __init__(self, path: str, cfg: DataConfig, image_keys: Sequence[str], state_keys: Sequence[str]):
        self.path, self.cfg = path, cfg
        self.image_keys, self.state_keys = list(image_keys), list(state_keys)
        self.image_hw: tuple[int, int] | None = None
        self.action_dim: int | None = None
        self.state_dims: dict[str, int] = {}

    def fail(self, where: str, what: str) -> DataError:
        return DataError(f"{self.path}: {where}: {what}")

    def obs_dataset(self, grp: h5py.Group, key: str) -> h5py.Dataset:
        obs = grp.get("obs")
        if not isinstance(obs, h5py.Group):
            raise self.fail(
                f"{grp.name[6:]}/obs", "missing obs group; every demo needs data/demo_i/obs/<key>"
            )
        ds = obs.get(key)
        if not isinstance(ds, h5py.Dataset):
            have = ", ".join(sorted(obs.keys()))
            raise self.fail(
                f"{grp.name[6:]}/obs/{key}", f"missing (obs has: {have}); set data.image_keys/state_keys"
            )
        return ds

    def actions(self, h5: h5py.File, name: str) -> np.ndarray:
        key = self.cfg.action_key
        if not isinstance(h5["data"][name].get(key), h5py.Dataset):
            raise self.fail(
                f"{name}/{key}", "missing actions dataset; set data.action_key if it has another name"
            )
        act = read_array(h5, f"data/{name}/{key}").astype(np.float32, copy=False)
        if act.ndim == 1:
            act = act[:, None]
        if act.ndim != 2 or act.shape[0] == 0:
            raise self.fail(f"{name}/{key}", f"expected a non-empty (T, A) array, got shape {act.shape}")
        if self.action_dim is None:
            self.action_dim = act.shape[1]
        elif act.shape[1] != self.action_dim:
            raise self.fail(
                f"{name}/{key}", f"action dim {act.shape[1]} differs from other demos ({self.action_dim})"
            )
        return act

    def images(self, grp: h5py.Group, name: str, length: int) -> None:
        for key in self.image_keys:
            ds = self.obs_dataset(grp, key)
            where = f"{name}/obs/{key}"
            if ds.dtype != np.uint8 or ds.ndim != 4 or ds.shape[-1] != 3:
                raise self.fail(
                    where, f"expected uint8 images (T, H, W, 3), got {ds.dtype} {ds.shape}; store uint8 HWC"
                )
            if ds.shape[0] != length:
                raise self.fail(
                    where, f"{ds.shape[0]} steps but {self.cfg.action_key} has {length}; lengths must match"
                )
            hw = (int(ds.shape[1]), int(ds.shape[2]))
            if self.image_hw is None:
                self.image_hw = hw
            elif hw != self.image_hw:
                raise self.fail(
                    where, f"image size {hw} differs from {self.image_hw}; store one size per file"
                )

    def state(self, h5: h5py.File, name: str, length: int) -> np.ndarray:
        parts = []
        for key in self.state_keys:
            ds = self.obs_dataset(h5["data"][name], key)
            where = f"{name}/obs/{key}"
            arr = read_array(h5, f"data/{where}").astype(np.float32, copy=False)
            arr = arr[:, None] if arr.ndim == 1 else arr
            if arr.ndim != 2:
                raise self.fail(where, f"expected a (T, D) state array, got shape {ds.shape}")
            if arr.shape[0] != length:
                raise self.fail(
                    where, f"{arr.shape[0]} steps but {self.cfg.action_key} has {length}; lengths must match"
                )
            if self.state_dims.setdefault(key, arr.shape[1]) != arr.shape[1]:
                raise self.fail(
                    where, f"dim {arr.shape[1]} differs from other demos ({self.state_dims[key]})"
                )
            parts.append(arr)
        return np.concatenate(parts, axis=1) if parts else np.zeros((length, 0), np.float32)

    def targets(self, grp: h5py.Group, name: str, length: int) -> np.ndarray | None:
        """(T, K, 2, 2) grounding targets of every camera, or None when the demo has none."""
        group = grp.get("targets")
        if not isinstance(group, h5py.Group) or not all(k in group for k in self.image_keys):
            return None
        parts = []
        for key in self.image_keys:
            arr = group[key][()]
            if arr.shape != (length, 2, 2):
                raise self.fail(
                    f"{name}/targets/{key}",
                    f"expected (T, 2, 2) = ({length}, 2, 2) image positions, got {arr.shape}; "
                    f"re-collect the file or delete the targets group",
                )
            parts.append(arr.astype(np.float32, copy=False))
        return np.stack(parts, axis=1)


def scan_file(path: str, cfg: DataConfig) -> FileScan:
    """Check a trajectory file and read its low-dim data. See the module docstring.

    A directory (or a hub id ``owner/name``) is a LeRobotDataset v3 root, read by
    :func:`vla_ft.data.lerobot.scan_lerobot` into the same structure.

    Raises:
        DataError: any problem with the file, naming the file, demo and key.
    """
    from vla_ft.data.lerobot import is_lerobot_path, scan_lerobot

    if is_lerobot_path(path):
        return scan_lerobot(path, cfg)
    where = ["data"]  # the object being read, for the message when a corrupt file fails a read
    try:
        return _scan(path, cfg, where)
    except (OSError, RuntimeError):
        raise DataError(
            f"{path}: {where[-1]}: cannot read: truncated or corrupt file; re-collect or re-download it"
        ) from None


def _scan(path: str, cfg: DataConfig, where: list[str]) -> FileScan:
    with open_h5(path) as h5:
        data = h5.get("data")
        if not isinstance(data, h5py.Group):
            raise DataError(
                f"{path}: no 'data' group; expected the robomimic/LIBERO layout data/demo_<i>/..."
            )
        names = sorted((k for k, v in data.items() if isinstance(v, h5py.Group)), key=_natural_key)
        if not names:
            raise DataError(f"{path}: 'data' holds no demos; expected data/demo_<i> groups")
        first_obs = (
            list(data[names[0]]["obs"].keys()) if isinstance(data[names[0]].get("obs"), h5py.Group) else []
        )
        layout = cfg.layout if cfg.layout != "auto" else _detect_layout(data, first_obs)
        own = _file_keys(data)
        image_keys = cfg.image_keys if cfg.image_keys is not None else own.get("image")
        if image_keys is None:
            image_keys = _default_keys(layout, "image", first_obs)
        state_keys = cfg.state_keys if cfg.state_keys is not None else own.get("state")
        if state_keys is None:
            state_keys = _default_keys(layout, "state", first_obs)
        if not image_keys:
            raise DataError(
                f"{path}: {names[0]}/obs: no camera key of the {layout} layout found (obs has: "
                f"{', '.join(sorted(first_obs))}); set data.image_keys"
            )
        check = _DemoChecker(path, cfg, image_keys, state_keys)
        file_lang = _file_instruction(data)
        demos, skipped, reasons = [], [], []
        for name in names:
            where.append(name)
            grp = data[name]
            try:
                actions = check.actions(h5, name)
                check.images(grp, name, len(actions))
                state = check.state(h5, name, len(actions))
                if cfg.bad_demos == "skip":  # every image chunk now, not a failed read mid-training
                    for key in image_keys:
                        _read_all(h5, f"data/{name}/obs/{key}")
            except UnreadableData as exc:
                if cfg.bad_demos == "error":
                    raise
                skipped.append(name)
                reasons.append(f"{exc.where or name}: unreadable")
                continue
            if not (np.isfinite(actions).all() and np.isfinite(state).all()):
                bad = cfg.action_key if not np.isfinite(actions).all() else "obs (state)"
                if cfg.bad_demos == "error":
                    raise check.fail(
                        f"{name}/{bad}", "contains NaN/Inf; fix the file or set data.bad_demos=skip"
                    )
                skipped.append(name)
                reasons.append(f"{name}/{bad}: NaN/Inf")
                continue
            instruction = _instruction(grp, file_lang, cfg)
            task = _text(grp.attrs["task"]).strip() if "task" in grp.attrs else instruction
            targets = check.targets(grp, name, len(actions))
            demos.append(Demo(name, actions, state, instruction, task, targets))
        if skipped:
            more = f" (+{len(reasons) - 10} more)" if len(reasons) > 10 else ""
            warnings.warn(
                f"{path}: skipped {len(skipped)} of {len(names)} demos with NaN/Inf or unreadable data "
                f"(data.bad_demos=skip): {', '.join(reasons[:10])}{more}",
                stacklevel=2,
            )
        if not demos:
            raise DataError(
                f"{path}: every demo was skipped (NaN/Inf or unreadable data); nothing left to train on"
            )
        where.append("mask")
        masks = _read_masks(h5, set(names))
        if skipped:
            masks = {k: [n for n in v if n not in skipped] for k, v in masks.items()}
    state_dims = tuple(check.state_dims[k] for k in state_keys)
    return FileScan(
        path, layout, tuple(image_keys), tuple(state_keys), state_dims, check.image_hw, demos, masks, skipped
    )


def _read_all(h5: h5py.File, where: str, block: int = 64) -> None:
    """Read (and drop) a whole dataset in blocks of ``block`` frames: finds any damaged chunk."""
    n = h5[where].shape[0]
    for lo in range(0, n, block):
        read_array(h5, where, np.s_[lo : lo + block])


def read_frames(h5: h5py.File, demo: str, key: str, frames: np.ndarray) -> np.ndarray:
    """Read frames ``frames`` (sorted or not, repeats allowed) of ``data/<demo>/obs/<key>``.

    Returns:
        uint8 (len(frames), H, W, 3).
    """
    lo, hi = int(frames.min()), int(frames.max())
    block = read_array(h5, f"data/{demo}/obs/{key}", np.s_[lo : hi + 1])  # (hi-lo+1, H, W, 3)
    return block[frames - lo]
