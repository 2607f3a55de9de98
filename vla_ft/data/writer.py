"""Write trajectories to HDF5 in the robomimic / LIBERO layout (h5py + numpy only, no torch).

Layout (docs/reference/hdf5-layouts.md)::

    data/                    attrs: env_args (JSON), problem_info (JSON), total
    data/demo_<i>/           attrs: num_samples, language_instruction, task, seed
    data/demo_<i>/obs/<key>  images uint8 (T, H, W, 3) chunked per frame + gzip; others as given
    data/demo_<i>/actions    float32 (T, A)
    data/demo_<i>/rewards    float32 (T,)
    data/demo_<i>/dones      uint8 (T,)
    data/demo_<i>/states     float64 (T, S)
    data/demo_<i>/targets/<image key>  float32 (T, 2, 2) optional: image (x, y) of the named object
                             and the destination (labels of the ``grounding`` loss term)
    mask/train, mask/valid   byte-string demo names

The file is written to ``<path>.tmp`` and renamed to ``<path>`` only by :meth:`DemoWriter.close`;
leaving the ``with`` block through an exception deletes the temporary file, so an interrupted run
never leaves a file that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vla_ft.errors import DataError


class DemoWriter:
    """Append demos one by one, then ``close()`` to write the masks and publish the file.

    Args:
        path: final ``.hdf5`` path (parent directories are created).
        env_args: JSON-able env description (``data.attrs["env_args"]``).
        problem_info: JSON-able task description with ``language_instruction``.
        compression_level: gzip level for image datasets (0-9).
    """

    def __init__(
        self,
        path: str | Path,
        env_args: dict[str, Any],
        problem_info: dict[str, Any],
        compression_level: int = 4,
    ) -> None:
        if "language_instruction" not in problem_info:
            raise DataError("problem_info needs a 'language_instruction' entry (robomimic/LIBERO layout)")
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self.tmp_path, "w")
        self._data = self._file.create_group("data")
        self._data.attrs["env_args"] = json.dumps(env_args)
        self._data.attrs["problem_info"] = json.dumps(problem_info)
        self._level = compression_level
        self.names: list[str] = []
        self.total = 0

    def add_demo(
        self,
        obs: dict[str, np.ndarray],
        actions: np.ndarray,
        rewards: np.ndarray,
        dones: np.ndarray,
        states: np.ndarray,
        attrs: dict[str, Any],
        targets: dict[str, np.ndarray] | None = None,
    ) -> str:
        """Write one demo; every array has leading length T. Returns its name (``demo_<i>``).

        Args:
            obs: key -> (T, ...) arrays; uint8 (T, H, W, 3) arrays are stored as images.
            actions: (T, A). rewards: (T,). dones: (T,). states: (T, S).
            attrs: per-demo attributes (``language_instruction``, ``task``, ``seed``, ...).
            targets: image key -> float32 (T, 2, 2) image positions of the instruction's objects
                (``TabletopEnv.target_uv``), stored as ``targets/<image key>``: labels for the
                ``grounding`` loss term, never model inputs.
        """
        steps = len(actions)
        targets = targets or {}
        arrays = {"actions": actions, "rewards": rewards, "dones": dones, "states": states, **obs}
        arrays.update({f"targets/{k}": v for k, v in targets.items()})
        for key, arr in arrays.items():
            if len(arr) != steps:
                raise DataError(
                    f"demo {len(self.names)}: '{key}' has {len(arr)} steps but actions has {steps}"
                )
        if steps == 0:
            raise DataError(f"demo {len(self.names)} is empty; only write episodes with at least one step")
        name = f"demo_{len(self.names)}"
        grp = self._data.create_group(name)
        grp.create_dataset("actions", data=np.asarray(actions, dtype=np.float32))
        grp.create_dataset("rewards", data=np.asarray(rewards, dtype=np.float32))
        grp.create_dataset("dones", data=np.asarray(dones, dtype=np.uint8))
        grp.create_dataset("states", data=np.asarray(states, dtype=np.float64))
        obs_grp = grp.create_group("obs")
        for key, arr in obs.items():
            arr = np.asarray(arr)
            if arr.dtype == np.uint8 and arr.ndim == 4:  # (T, H, W, C) image: one chunk per frame
                obs_grp.create_dataset(
                    key,
                    data=arr,
                    chunks=(1, *arr.shape[1:]),
                    compression="gzip",
                    compression_opts=self._level,
                )
            else:
                obs_grp.create_dataset(key, data=arr)
        for key, arr in targets.items():
            grp.create_dataset(f"targets/{key}", data=np.asarray(arr, dtype=np.float32))
        grp.attrs["num_samples"] = steps
        for key, value in attrs.items():
            grp.attrs[key] = value
        self.names.append(name)
        self.total += steps
        return name

    def set_problem_info(self, problem_info: dict[str, Any]) -> None:
        """Replace ``data.attrs["problem_info"]`` (e.g. once all instructions are known)."""
        if "language_instruction" not in problem_info:
            raise DataError("problem_info needs a 'language_instruction' entry (robomimic/LIBERO layout)")
        self._data.attrs["problem_info"] = json.dumps(problem_info)

    def set_obs_keys(self, obs_keys: dict[str, list[str]]) -> None:
        """Name the file's default observation keys (``data.attrs["obs_keys"]``: JSON
        ``{"image": [...], "state": [...]}``), read when ``data.image_keys`` / ``state_keys`` are null."""
        self._data.attrs["obs_keys"] = json.dumps(obs_keys)

    def close(self, valid_fraction: float = 0.1, seed: int = 0) -> Path:
        """Write ``mask/train`` and ``mask/valid`` (split by demo, seeded), rename to the final path."""
        n_valid = int(round(valid_fraction * len(self.names))) if len(self.names) > 1 else 0
        order = np.random.default_rng(seed).permutation(len(self.names))
        valid = sorted(order[:n_valid].tolist())
        train = sorted(order[n_valid:].tolist())
        mask = self._file.create_group("mask")
        for key, idx in (("train", train), ("valid", valid)):
            names = [self.names[i].encode() for i in idx]
            mask.create_dataset(key, data=np.array(names, dtype="S32"))
        self._data.attrs["total"] = self.total
        self._file.close()
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file."""
        if self._file.id.valid:
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> DemoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._file.id.valid:
            self.abort()
            raise DataError(f"DemoWriter for {self.path} left without close(): the file was not published")
