"""``build_datasets``: config -> (train dataset, val dataset, DatasetInfo).

Steps: scan every file (checks + low-dim arrays), split each file by demo (``mask/`` filter keys or
a seeded random split), fit the normalizer on the training demos' actions and state, number the
tasks, tokenize each distinct instruction once, decide image caching from the RAM budget, and
build the two :class:`~vla_ft.data.trajectory.TrajectoryDataset` objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_ft.config import DataConfig
from vla_ft.data.instruction_noise import build_noisy_tokens
from vla_ft.data.normalize import Normalizer
from vla_ft.data.reader import scan_file
from vla_ft.data.scan import FileScan
from vla_ft.data.trajectory import Tokens, TrajectoryDataset
from vla_ft.data.transforms import ObsSpec
from vla_ft.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class DatasetInfo:
    """What the model and trainer need to know about the data."""

    action_dim: int
    state_dim: int
    image_keys: list[str]
    state_keys: list[str]
    image_size: tuple[int, int]  # (H, W) of IMAGES in a sample
    history: int
    chunk: int
    task_names: list[str]  # task id = index
    normalizer: Normalizer
    num_train_demos: int
    num_val_demos: int
    num_train_samples: int
    instructions: list[str] | None = None  # distinct instructions (train + val)
    waypoint_key: str | None = None  # state key the WAYPOINT targets come from (None: no targets)
    files_without_targets: list[str] | None = None  # files lacking TARGET_UV labels ([]: all have them)
    task_instructions: dict[str, list[str]] | None = None  # task name -> its distinct instructions

    def obs_spec(self) -> ObsSpec:
        """The ObsSpec the policy uses at inference (same as the dataset's)."""
        return ObsSpec(tuple(self.image_keys), tuple(self.state_keys), self.image_size, self.history)


def split_demos(
    scan: FileScan, cfg: DataConfig, seed: int, file_index: int = 0
) -> tuple[list[str], list[str]]:
    """Train and validation demo names of one file, split by demo (never by frame).

    ``data.split``: ``mask`` uses ``mask/train`` / ``mask/valid`` (either one; the other is the
    rest), ``random`` shuffles with (seed, file_index) and holds out ``val_fraction``, ``auto`` uses
    the mask when the file has one. ``max_demos`` keeps the first N training demos (file order).
    """
    names = [d.name for d in scan.demos]
    has_mask = "train" in scan.masks or "valid" in scan.masks
    if cfg.split == "mask" and not has_mask:
        raise DataError(
            f"{scan.path}: data.split=mask but the file has no mask/train or mask/valid; use data.split=random"
        )
    if has_mask and cfg.split in ("mask", "auto"):
        valid = set(scan.masks.get("valid", []))
        train = set(scan.masks["train"]) if "train" in scan.masks else set(names) - valid
        if "valid" not in scan.masks:
            valid = set(names) - train
        train_names, val_names = [n for n in names if n in train], [n for n in names if n in valid]
    else:
        rng = np.random.default_rng([seed, file_index])
        order = rng.permutation(len(names))
        n_val = int(round(cfg.val_fraction * len(names)))
        if cfg.val_fraction > 0 and len(names) >= 2:
            n_val = min(max(n_val, 1), len(names) - 1)
        held = {names[i] for i in order[:n_val]}
        train_names, val_names = [n for n in names if n not in held], [n for n in names if n in held]
    if not train_names:
        raise DataError(
            f"{scan.path}: the split leaves no training demos; check mask/train or data.val_fraction"
        )
    if cfg.max_demos is not None:
        train_names = train_names[: cfg.max_demos]
    return train_names, val_names


def _check_compatible(scans: list[FileScan], cfg: DataConfig) -> None:
    ref = scans[0]
    a_dim = ref.demos[0].actions.shape[1]
    for s in scans[1:]:
        where = f"{s.path} vs {ref.path}"
        if s.demos[0].actions.shape[1] != a_dim:
            raise DataError(
                f"{where}: action dims differ ({s.demos[0].actions.shape[1]} vs {a_dim}); mix compatible files"
            )
        if len(s.image_keys) != len(ref.image_keys) or s.state_dims != ref.state_dims:
            raise DataError(
                f"{where}: cameras {s.image_keys} / state dims {s.state_dims} do not match "
                f"{ref.image_keys} / {ref.state_dims}; set data.image_keys/state_keys"
            )
        if cfg.image_size is None and s.image_hw != ref.image_hw:
            raise DataError(
                f"{where}: image sizes differ ({s.image_hw} vs {ref.image_hw}); set data.image_size"
            )


def dataset_stats(scans: list[FileScan], cfg: DataConfig) -> dict[str, dict[str, np.ndarray]]:
    """Normalizer statistics from the datasets' own ``meta/stats.json`` (``data.norm_stats=dataset``).

    They cover every episode of each dataset (validation ones too), as LeRobot's training does.
    Several datasets pool exactly for mean/std/min/max (by frame count); q01/q99 become the
    count-weighted mean of the per-dataset quantiles (an approximation).
    """
    for s in scans:
        if s.stats is None:
            what = (
                "an HDF5 file" if s.frames is None else "a LeRobot dataset without a usable meta/stats.json"
            )
            raise DataError(
                f"{s.path}: data.norm_stats=dataset needs every data.paths entry to be a LeRobotDataset "
                f"with meta/stats.json covering the action and state features; this is {what}: use "
                "data.norm_stats=compute"
            )
    out: dict[str, dict[str, np.ndarray]] = {}
    keys = ["action"] + (["state"] if scans[0].state_dims and sum(scans[0].state_dims) else [])
    for key in keys:
        per = []
        for s in scans:
            st = s.stats.get(key)
            need = ["mean", "std", "min", "max"] + (["q01", "q99"] if cfg.normalization == "quantile" else [])
            missing = [n for n in need if st is None or n not in st]
            if missing:
                raise DataError(
                    f"{s.path}: meta/stats.json lacks {key} statistics {missing}; use data.norm_stats=compute"
                )
            st = dict(st)
            st.setdefault("q01", st["min"])  # unused outside quantile mode
            st.setdefault("q99", st["max"])
            n = float(np.asarray(st.get("count", [sum(d.length for d in s.demos)])).reshape(-1)[0])
            per.append((n, st))
        w = np.array([n for n, _ in per]) / sum(n for n, _ in per)
        mean = sum(wi * st["mean"] for wi, (_, st) in zip(w, per))
        second = sum(wi * (st["std"] ** 2 + st["mean"] ** 2) for wi, (_, st) in zip(w, per))
        out[key] = {
            "mean": mean,
            "std": np.sqrt(np.maximum(second - mean**2, 0.0)) if len(per) > 1 else per[0][1]["std"],
            "min": np.min([st["min"] for _, st in per], axis=0),
            "max": np.max([st["max"] for _, st in per], axis=0),
            "q01": sum(wi * st["q01"] for wi, (_, st) in zip(w, per)),
            "q99": sum(wi * st["q99"] for wi, (_, st) in zip(w, per)),
        }
        dim = scans[0].demos[0].actions.shape[1] if key == "action" else scans[0].demos[0].state.shape[1]
        if out[key]["mean"].shape != (dim,):
            raise DataError(
                f"{scans[0].path}: meta/stats.json {key} statistics have {out[key]['mean'].shape[0]} dims, "
                f"the data {dim}; use data.norm_stats=compute"
            )
    return out


WAYPOINT_KEY_NAMES = ("ee_pos", "eef_pos")


def _waypoint_dims(
    cfg: DataConfig, spec: ObsSpec, state_dims: tuple[int, ...]
) -> tuple[str | None, slice | None]:
    """(key, state columns) of the end-effector position used for WAYPOINT targets, or (None, None)."""
    keys = list(spec.state_keys)
    dims = dict(zip(keys, state_dims))
    if cfg.waypoint_key is None:
        return None, None
    if cfg.waypoint_key == "auto":
        key = next((k for k in keys if k.endswith(WAYPOINT_KEY_NAMES) and dims[k] == 3), None)
        if key is None:
            return None, None
    else:
        key = cfg.waypoint_key
        if key not in dims:
            raise DataError(
                f"data.waypoint_key={key!r} is not a state key (state keys: {keys}); name one of them, "
                f"or set data.waypoint_key=null"
            )
        if dims[key] != 3:
            raise DataError(
                f"data.waypoint_key={key!r} has {dims[key]} dims; it must be a 3-D end-effector position"
            )
    lo = int(sum(state_dims[: keys.index(key)]))
    return key, slice(lo, lo + 3)


def _tokenize(tokenizer: Any, texts: list[str], max_len: int) -> Tokens:
    enc = tokenizer(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    return Tokens(enc["input_ids"].long(), enc["attention_mask"].long())


def _use_cache(cfg: DataConfig, nbytes: int) -> bool:
    fits = nbytes <= cfg.cache_budget_gb * 1e9
    cache = cfg.cache_images == "ram" or (cfg.cache_images == "auto" and fits)
    log.info(
        "data: images take %.2f GB in RAM (budget %.2f GB, cache_images=%s) -> %s",
        nbytes / 1e9,
        cfg.cache_budget_gb,
        cfg.cache_images,
        "cached in RAM" if cache else "read lazily",
    )
    return cache


def build_trajectory_datasets(
    data_cfg: DataConfig, seed: int, tokenizer: Any = None, scans: list[FileScan] | None = None
) -> tuple[TrajectoryDataset, TrajectoryDataset | None, DatasetInfo]:
    """Like :func:`build_datasets`, but the tokenizer is optional (no INSTR_* keys without one)."""
    if scans is None:
        scans = [scan_file(p, data_cfg) for p in data_cfg.paths]
    _check_compatible(scans, data_cfg)
    splits = [split_demos(s, data_cfg, seed, i) for i, s in enumerate(scans)]
    by_name = [{d.name: d for d in s.demos} for s in scans]
    train_demos = [by_name[f][n] for f, (tr, _) in enumerate(splits) for n in tr]
    state = np.concatenate([d.state for d in train_demos])
    if data_cfg.norm_stats == "dataset":
        normalizer = Normalizer(data_cfg.normalization, dataset_stats(scans, data_cfg))
    else:
        normalizer = Normalizer.from_arrays(
            data_cfg.normalization,
            np.concatenate([d.actions for d in train_demos]),
            state if state.shape[1] else None,
        )
    instructions: list[str] = []
    tasks: list[str] = []
    instruction_of, task_of = {}, {}
    task_instructions: dict[str, list[str]] = {}
    for f, s in enumerate(scans):
        for d in s.demos:
            for text, table, out in ((d.instruction, instructions, instruction_of), (d.task, tasks, task_of)):
                if text not in table:
                    table.append(text)
                out[(f, d.name)] = table.index(text)
            said = task_instructions.setdefault(d.task, [])
            if d.instruction not in said:
                said.append(d.instruction)
    tokens = (
        _tokenize(tokenizer, instructions, data_cfg.instruction_max_tokens) if tokenizer is not None else None
    )
    hw = (data_cfg.image_size, data_cfg.image_size) if data_cfg.image_size else scans[0].image_hw
    spec = ObsSpec(scans[0].image_keys, scans[0].state_keys, hw, data_cfg.history)
    nbytes = sum(
        by_name[f][n].length * s.frame_bytes() for f, s in enumerate(scans) for n in sum(splits[f], [])
    )
    cache = _use_cache(data_cfg, nbytes)
    common = dict(
        scans=scans,
        spec=spec,
        normalizer=normalizer,
        chunk=data_cfg.chunk,
        instructions=instructions,
        instruction_of=instruction_of,
        task_of=task_of,
        tokens=tokens,
        cache_images=cache,
    )
    wp_key, wp_dims = _waypoint_dims(data_cfg, spec, scans[0].state_dims)
    aug = data_cfg.augment
    noise = (
        build_noisy_tokens(
            instructions,
            aug.instruction_noise,
            seed,
            lambda texts: _tokenize(tokenizer, texts, data_cfg.instruction_max_tokens),
        )
        if tokenizer is not None and aug.enabled and aug.instruction_noise > 0
        else None
    )
    train = TrajectoryDataset(
        demos=[tr for tr, _ in splits],
        file_weights=data_cfg.weights,
        waypoint_dims=wp_dims,
        instruction_noise=noise,
        **common,
    )
    has_val = any(va for _, va in splits)
    val = (
        TrajectoryDataset(
            demos=[va for _, va in splits],
            waypoint_dims=wp_dims,
            waypoint_scale=train.waypoint_scale,
            **common,
        )
        if has_val
        else None
    )
    info = DatasetInfo(
        action_dim=int(train.actions.shape[1]),
        state_dim=int(train.state.shape[1]),
        image_keys=list(spec.image_keys),
        state_keys=list(spec.state_keys),
        image_size=tuple(hw),
        history=data_cfg.history,
        chunk=data_cfg.chunk,
        task_names=tasks,
        normalizer=normalizer,
        num_train_demos=train.num_demos,
        num_val_demos=val.num_demos if val is not None else 0,
        num_train_samples=len(train),
        instructions=instructions,
        waypoint_key=wp_key,
        files_without_targets=[s.path for s in scans if not s.has_targets],
        task_instructions=task_instructions,
    )
    return train, val, info


def build_datasets(
    data_cfg: DataConfig, tokenizer: Any, seed: int, scans: list[FileScan] | None = None
) -> tuple[TrajectoryDataset, TrajectoryDataset | None, DatasetInfo]:
    """Train dataset, validation dataset (None when no demo is held out) and :class:`DatasetInfo`.

    Args:
        data_cfg: the ``data`` config section.
        tokenizer: a Hugging Face tokenizer (called once on the list of distinct instructions).
        seed: drives the random demo split.
        scans: the files' :func:`scan_file` results when already scanned (one per data path).

    Raises:
        DataError: a file is missing, malformed or inconsistent (names file, demo and key).
    """
    if tokenizer is None:
        raise ValueError("build_datasets needs a tokenizer; use build_trajectory_datasets for raw data")
    return build_trajectory_datasets(data_cfg, seed, tokenizer, scans)
