"""``TrajectoryDataset``: samples (observation history, action chunk, instruction) from demos.

Every frame t of every demo is one sample. Low-dim data (actions, state) lives in RAM; images are
either cached in RAM or read lazily, with one h5py handle per process (reopened after a fork:
h5py handles are not fork-safe); LeRobot v3 roots decode through their scan's ``frames``
(:class:`vla_ft.data.lerobot.LeRobotFrames`, per-process decoders too). Per-sample images and
state go through :func:`vla_ft.data.transforms.obs_to_inputs`, the same function the policy uses
on live observations.

``get_batch(indices)`` builds a whole batch at once (vectorized; the DataLoader reaches it through
``__getitems__``), ``__getitem__`` is ``get_batch([i])`` without the leading B.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from vla_ft.constants import (
    ACTION,
    ACTION_IS_PAD,
    INSTR_IDS,
    INSTR_MASK,
    PROGRESS,
    TARGET_UV,
    TASK_ID,
    WAYPOINT,
)
from vla_ft.data.instruction_noise import NoisyTokens
from vla_ft.data.layout import GRIPPER_DIM, history_indices
from vla_ft.data.normalize import Normalizer
from vla_ft.data.reader import open_h5_handle, read_frames, unreadable
from vla_ft.data.sampler import ResumableSampler
from vla_ft.data.scan import FileScan
from vla_ft.data.transforms import ObsSpec, obs_to_inputs

log = logging.getLogger(__name__)


def next_waypoints(ee: np.ndarray, gripper: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per frame, where the hand is at the next gripper open/close, relative to where it is now.

    Args:
        ee: float (N, 3) end-effector positions of consecutive demos (concatenated).
        gripper: float (N,) gripper commands (sign = open/close, as in robomimic, LIBERO and envs/).
        lengths: (D,) demo lengths summing to N.

    Returns:
        float (N, 3): ``ee[k] - ee[t]`` with ``k`` the first frame after ``t`` whose gripper command
        differs in sign from its predecessor's, or the demo's last frame when none follows.
    """
    out = np.zeros_like(ee, dtype=np.float64)
    start = 0
    for n in np.asarray(lengths, dtype=np.int64):
        e, closed = ee[start : start + n].astype(np.float64), gripper[start : start + n] > 0
        toggles = np.flatnonzero(closed[1:] != closed[:-1]) + 1  # first frame with the new command
        marks = np.append(toggles, n - 1)  # the last frame is a waypoint too
        nxt = marks[np.searchsorted(marks, np.arange(n), side="right").clip(max=len(marks) - 1)]
        out[start : start + n] = e[nxt] - e
        start += n
    return out


class _Samples(list):
    """Per-sample dicts (views) plus the collated batch they came from."""

    def __init__(self, samples: list[dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]):
        super().__init__(samples)
        self.batch = batch


@dataclass
class Tokens:
    """Pre-tokenized instructions: row i is instruction i."""

    ids: torch.Tensor  # int64 (n_instructions, L)
    mask: torch.Tensor  # int64 (n_instructions, L)


@dataclass
class DemoRef:
    """One demo of the dataset: where it lives and its per-demo labels."""

    file: int  # index into the dataset's files
    name: str
    length: int
    instruction: int  # row in Tokens / instructions list
    task: int  # task id


class TrajectoryDataset(Dataset):
    """Windows of demos from one or more scanned HDF5 files.

    Args:
        scans: scanned files (:func:`vla_ft.data.reader.scan_file`).
        demos: per file, the names of the demos this dataset uses (a split).
        spec: model-side keys/size/history; ``spec.image_keys``/``state_keys`` name the slots (a
            file with other key names maps to them by position).
        normalizer: normalizes actions and state (``None``: raw units).
        chunk: action chunk length H.
        instructions: distinct instruction strings; ``instruction_of[(file, demo)]`` picks one.
        task_of: (file, demo) -> task id.
        tokens: pre-tokenized ``instructions`` (``None``: no INSTR_* keys in samples).
        cache_images: read every image into RAM now (True) or lazily per sample (False).
        file_weights: optional per-file mixing weights for :meth:`make_sampler`.
        waypoint_dims: columns of the flat state holding the end-effector position (3 of them),
            or None for no WAYPOINT key in samples.
        waypoint_scale: (3,) per-axis divisor of the waypoint targets (None: this dataset's std;
            pass the training set's to a validation set).
        instruction_noise: noisy instruction variants some samples read instead
            (vla_ft/data/instruction_noise.py; training sets only), or None.
    """

    def __init__(
        self,
        scans: Sequence[FileScan],
        demos: Sequence[Sequence[str]],
        spec: ObsSpec,
        normalizer: Normalizer | None,
        chunk: int,
        instructions: Sequence[str],
        instruction_of: dict[tuple[int, str], int],
        task_of: dict[tuple[int, str], int],
        tokens: Tokens | None = None,
        cache_images: bool = False,
        file_weights: Sequence[float] | None = None,
        waypoint_dims: slice | None = None,
        waypoint_scale: np.ndarray | None = None,
        instruction_noise: NoisyTokens | None = None,
    ):
        self.paths = [s.path for s in scans]
        self.frames = [s.frames for s in scans]  # LeRobot v3 decoders (None: HDF5 file)
        self.file_keys = [s.image_keys for s in scans]
        sizes = [s.image_hw for s in scans]
        self.file_hw = sizes
        self.file_size_id = np.array([sizes.index(hw) for hw in sizes], dtype=np.int64)  # per file
        self.spec, self.normalizer, self.chunk, self.tokens = spec, normalizer, chunk, tokens
        self.instruction_noise = instruction_noise
        self.instructions = list(instructions)
        self.file_weights = None if file_weights is None else list(file_weights)
        self.refs: list[DemoRef] = []
        actions, states, targets = [], [], []
        for f, (scan, names) in enumerate(zip(scans, demos)):
            by_name = {d.name: d for d in scan.demos}
            for name in names:
                d = by_name[name]
                self.refs.append(DemoRef(f, name, d.length, instruction_of[(f, name)], task_of[(f, name)]))
                actions.append(d.actions)
                states.append(d.state)
                targets.append(d.targets)
        if not self.refs:
            raise ValueError("TrajectoryDataset needs at least one demo")
        lengths = np.array([r.length for r in self.refs], dtype=np.int64)
        self.demo_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # (D,)
        self.demo_len = lengths  # (D,)
        self.demo_file = np.array([r.file for r in self.refs], dtype=np.int64)  # (D,)
        self.sample_demo = np.repeat(np.arange(len(self.refs)), lengths)  # (N,)
        self.sample_t = np.arange(int(lengths.sum())) - self.demo_start[self.sample_demo]  # (N,)
        self.sample_file = self.demo_file[self.sample_demo]  # (N,)
        self.raw_actions = np.concatenate(actions).astype(np.float32)  # (N, A) env units
        self.actions = normalizer.normalize_action(self.raw_actions) if normalizer else self.raw_actions
        self.state = np.concatenate(states).astype(np.float32)  # (N, S) raw; obs_to_inputs normalizes
        self.state_dims = list(scans[0].state_dims)  # per state key, to split a flat row back into keys
        self.demo_instr = torch.tensor([r.instruction for r in self.refs], dtype=torch.int64)
        self.demo_task = torch.tensor([r.task for r in self.refs], dtype=torch.int64)
        self.waypoints: np.ndarray | None = None  # (N, 3) normalized WAYPOINT targets
        self.waypoint_scale: np.ndarray | None = None
        if waypoint_dims is not None:
            raw = next_waypoints(self.state[:, waypoint_dims], self.raw_actions[:, GRIPPER_DIM], lengths)
            self.waypoint_scale = (
                np.asarray(waypoint_scale, dtype=np.float32)
                if waypoint_scale is not None
                else np.maximum(raw.std(0), 1e-3).astype(np.float32)
            )
            self.waypoints = (raw / self.waypoint_scale).astype(np.float32)
        # (N, K, 2, 2) TARGET_UV labels, only when every demo of every file has them
        self.target_uv: np.ndarray | None = (
            np.concatenate(targets) if all(s.has_targets for s in scans) else None
        )
        self.image_cache: dict[int, list[np.ndarray]] | None = None  # size id -> per camera slot
        self._handles: dict[int, h5py.File] = {}
        self._datasets: dict[tuple[int, str, str], h5py.Dataset] = {}
        self._pid = os.getpid()
        if cache_images:
            self._cache_images()

    # ---- sizes -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.sample_demo.shape[0])

    @property
    def num_demos(self) -> int:
        return len(self.refs)

    # ---- file handles (one per process) ------------------------------------------------------

    def _handle(self, f: int) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: never touch the parent's handles
            self._handles, self._datasets, self._pid = {}, {}, os.getpid()
        if f not in self._handles:
            self._handles[f] = open_h5_handle(self.paths[f])
        return self._handles[f]

    def _read(self, ref: DemoRef, key: str, frames: np.ndarray) -> np.ndarray:
        """Lazy read of frames (T,) of one camera: uint8 (T, H, W, 3); dataset objects are cached."""
        if self.frames[ref.file] is not None:
            return self.frames[ref.file].read(ref.name, key, frames)
        h5 = self._handle(ref.file)  # resets the caches after a fork
        ds = self._datasets.get((ref.file, ref.name, key))
        if ds is None:
            ds = self._datasets[(ref.file, ref.name, key)] = h5[f"data/{ref.name}/obs/{key}"]
        lo, hi = int(frames.min()), int(frames.max())
        try:
            block = ds[lo : hi + 1]  # (hi-lo+1, H, W, 3)
        except (OSError, RuntimeError):
            raise unreadable(self.paths[ref.file], f"{ref.name}/obs/{key}", f"frames {lo}..{hi}") from None
        return block[frames - lo]

    def close(self) -> None:
        """Close this process's file handles (they reopen on the next read)."""
        if self._pid == os.getpid():
            for h in self._handles.values():
                h.close()
        for fr in self.frames:
            if fr is not None:
                fr.close()
        self._handles, self._datasets = {}, {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["_datasets"] = {}, {}  # spawn/forkserver workers open their own
        return state

    def _cache_images(self) -> None:
        """Read every frame into one array per (stored size, camera slot): (N_g, H, W, 3) uint8."""
        sizes = self.file_size_id[self.demo_file]  # (D,)
        self.cache_rows = np.zeros(len(self), dtype=np.int64)  # global frame -> row in its size group
        cache: dict[int, list[np.ndarray]] = {}
        for sid in np.unique(sizes):
            demos = np.flatnonzero(sizes == sid)
            n = int(self.demo_len[demos].sum())
            hw = self.file_hw[self.refs[int(demos[0])].file]
            arrays = [np.empty((n, *hw, 3), np.uint8) for _ in self.spec.image_keys]
            row = 0
            for d in demos:
                ref = self.refs[int(d)]
                frames = self.frames[ref.file]
                h5 = self._handle(ref.file) if frames is None else None
                for arr, key in zip(arrays, self.file_keys[ref.file]):
                    arr[row : row + ref.length] = (
                        frames.episode(ref.name, key)
                        if frames is not None
                        else read_frames(h5, ref.name, key, np.arange(ref.length))
                    )
                start = int(self.demo_start[d])
                self.cache_rows[start : start + ref.length] = np.arange(row, row + ref.length)
                row += ref.length
            cache[int(sid)] = arrays
        self.image_cache = cache
        self.close()  # no open handles left in the parent before DataLoader workers fork

    # ---- samples -----------------------------------------------------------------------------

    def _images(self, d: np.ndarray, frames: np.ndarray, hist: np.ndarray) -> list[np.ndarray]:
        """Per camera slot: uint8 (B, T, H, W, 3) at global frames ``frames`` (B, T) = demo ``d`` (B,)
        frames ``hist`` (B, T); all demos here share one stored image size."""
        if self.image_cache is not None:
            arrays = self.image_cache[int(self.file_size_id[self.demo_file[d[0]]])]
            rows = self.cache_rows[frames]  # (B, T)
            return [arr[rows] for arr in arrays]
        per_sample = []
        for b in range(len(d)):
            ref = self.refs[int(d[b])]
            per_sample.append([self._read(ref, k, hist[b]) for k in self.file_keys[ref.file]])
        return [np.stack([s[k] for s in per_sample]) for k in range(len(self.spec.image_keys))]

    def _obs_inputs(self, d: np.ndarray, hist: np.ndarray, start: np.ndarray) -> dict[str, torch.Tensor]:
        """IMAGES (B, T, K, 3, H, W) and STATE (B, T, S) through obs_to_inputs, one call per stored size."""
        size = self.file_size_id[self.demo_file[d]]  # (B,) files with different stored image sizes
        groups = (
            [np.arange(len(d))]
            if (size == size[0]).all()
            else [np.flatnonzero(size == g) for g in np.unique(size)]
        )
        parts = []
        for g in groups:
            frames = start[g, None] + hist[g]  # (b, T) global frame indices
            obs = {k: v for k, v in zip(self.spec.image_keys, self._images(d[g], frames, hist[g]))}
            state = self.state[frames]  # (b, T, S)
            for key, part in zip(
                self.spec.state_keys, np.split(state, np.cumsum(self.state_dims)[:-1], axis=-1)
            ):
                obs[key] = part
            parts.append(obs_to_inputs(obs, self.spec, self.normalizer, batched=True))
        if len(parts) == 1:
            return parts[0]
        order = torch.from_numpy(np.argsort(np.concatenate(groups), kind="stable"))
        return {k: torch.cat([p[k] for p in parts])[order] for k in parts[0]}

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Samples ``indices`` as one collated batch (keys of vla_ft.constants, leading B)."""
        idx = np.asarray(indices, dtype=np.int64)
        d, t = self.sample_demo[idx], self.sample_t[idx]  # (B,), (B,)
        start, length = self.demo_start[d], self.demo_len[d]  # (B,)
        hist = history_indices(t, self.spec.history)  # (B, T): frame 0 repeats before the start
        steps = t[:, None] + np.arange(self.chunk)  # (B, H)
        is_pad = steps > (length - 1)[:, None]  # (B, H)
        steps = np.minimum(steps, (length - 1)[:, None])  # repeat the last action
        batch = self._obs_inputs(d, hist, start)
        batch[ACTION] = torch.from_numpy(self.actions[start[:, None] + steps])  # (B, H, A)
        batch[ACTION_IS_PAD] = torch.from_numpy(is_pad)
        dt = torch.from_numpy(d)
        batch[TASK_ID] = self.demo_task[dt]
        batch[PROGRESS] = torch.from_numpy((t / np.maximum(length - 1, 1)).astype(np.float32))
        if self.waypoints is not None:
            batch[WAYPOINT] = torch.from_numpy(self.waypoints[idx])
        if self.target_uv is not None:
            batch[TARGET_UV] = torch.from_numpy(self.target_uv[idx])
        if self.tokens is not None:
            instr = self.demo_instr[dt]
            batch[INSTR_IDS] = self.tokens.ids[instr]
            batch[INSTR_MASK] = self.tokens.mask[instr]
            if self.instruction_noise is not None:
                batch[INSTR_IDS], batch[INSTR_MASK] = self.instruction_noise.apply(
                    idx, instr, batch[INSTR_IDS], batch[INSTR_MASK]
                )
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        return {k: v[0] for k, v in self.get_batch([i % len(self)]).items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Batched fetch used by the DataLoader: the samples, carrying the collated batch along.

        With ``collate_fn=TrajectoryDataset.collate_fn`` the DataLoader returns that batch as is
        (no second copy); the default collate stacks the per-sample views back (same result).
        """
        batch = self.get_batch(indices)
        return _Samples([{k: v[b] for k, v in batch.items()} for b in range(len(indices))], batch)

    @staticmethod
    def collate_fn(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Collate for DataLoaders over this dataset: reuses the batch built by ``__getitems__``."""
        if isinstance(samples, _Samples):
            return samples.batch
        return default_collate(samples)

    def instruction(self, i: int) -> str:
        """The raw instruction string of sample ``i``."""
        return self.instructions[self.refs[int(self.sample_demo[i])].instruction]

    # ---- mixing --------------------------------------------------------------------------------

    def sample_weights(self) -> torch.Tensor | None:
        """(N,) weights giving each file a share of draws proportional to its weight, or None."""
        if self.file_weights is None:
            return None
        counts = np.bincount(self.sample_file, minlength=len(self.paths)).astype(np.float64)
        per_file = np.asarray(self.file_weights, dtype=np.float64) / np.maximum(counts, 1)
        return torch.from_numpy(per_file[self.sample_file])

    def make_sampler(self, seed: int, rank: int = 0, world_size: int = 1) -> ResumableSampler:
        """The training sampler: order = f(seed, epoch), weighted when files have weights."""
        return ResumableSampler(len(self), seed, self.sample_weights(), rank, world_size)
