"""Normalization statistics for actions and proprio state, and the affine map they define.

Every mode is the same affine map ``x_n = (x - center) / scale`` (quantile mode also clips to
[-1, 1]), so normalize/unnormalize share one code path for numpy and torch:

* ``mean_std``: center = mean, scale = std.
* ``min_max``:  center = (max + min) / 2, scale = (max - min) / 2  -> [-1, 1].
* ``quantile``: center = (q99 + q01) / 2, scale = (q99 - q01) / 2  -> [-1, 1], clipped.
* ``none``:     identity.

A dimension whose scale is below ``_EPS`` (1e-4 in the data's own units), e.g. a constant one,
gets scale 1: it normalizes to ``x - center`` (0 for the constant) and unnormalizes back exactly.
The threshold is not 1e-6 on purpose: a *nearly* constant dimension must not be blown up to unit
variance. Our gripper fingers lag the hand by ~3e-5 m when it accelerates sideways; on data where
the gripper stays open (finger std ~1e-5) mean/std scaling would turn that lag into a +-3 sigma
velocity signal, which a policy copies instead of finding the target (see
docs/experiments/2026-11-scene-and-expert-changes.md). Diffusion Policy's normalizer uses the same 1e-4 range floor.

Statistics come from low-dim arrays only (never images); 1M frames x 10 dims take well under a
second (``np.quantile`` partitions, it does not sort).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vla_ft.errors import CheckpointError
from vla_ft.io import write_atomic

MODES = ("mean_std", "min_max", "quantile", "none")
KEYS = ("action", "state")
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
_EPS = 1e-4  # scales below this (data units) count as constant; see the module docstring
FILENAME = "normalization.json"


def compute_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-dimension statistics of ``x`` (N, D): mean, std, min, max, 1st/99th percentile.

    Raises:
        ValueError: ``x`` is empty or not 2-D (the dataset checks its arrays before this).
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"compute_stats needs a non-empty (N, D) array, got shape {x.shape}")
    x64 = np.asarray(x, dtype=np.float64)
    q01, q99 = np.quantile(x64, [0.01, 0.99], axis=0)
    return {
        "mean": x64.mean(axis=0),
        "std": x64.std(axis=0),
        "min": x64.min(axis=0),
        "max": x64.max(axis=0),
        "q01": q01,
        "q99": q99,
    }


class Normalizer:
    """Affine normalization of ``action`` and ``state`` vectors.

    Args:
        mode: one of ``mean_std``, ``min_max``, ``quantile``, ``none``.
        stats: ``{"action": {stat: (D,) array}, "state": {...}}`` with the names of ``STAT_NAMES``;
            ``state`` may be missing when the data has no proprio state.
    """

    def __init__(self, mode: str, stats: Mapping[str, Mapping[str, Any]]):
        if mode not in MODES:
            raise ValueError(f"normalization mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.stats: dict[str, dict[str, np.ndarray]] = {}
        self._affine: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key, st in stats.items():
            missing = [s for s in STAT_NAMES if s not in st]
            if missing:
                raise ValueError(f"normalizer stats for {key!r} lack {missing}")
            self.stats[key] = {s: np.asarray(st[s], dtype=np.float64).reshape(-1) for s in STAT_NAMES}
            self._affine[key] = self._center_scale(self.stats[key])

    @classmethod
    def from_arrays(cls, mode: str, action: np.ndarray, state: np.ndarray | None = None) -> Normalizer:
        """Compute statistics from ``action`` (N, A) and optionally ``state`` (N, S)."""
        stats = {"action": compute_stats(action)}
        if state is not None and state.shape[-1] > 0:
            stats["state"] = compute_stats(state)
        return cls(mode, stats)

    def _center_scale(self, st: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "mean_std":
            center, scale = st["mean"], st["std"]
        elif self.mode == "min_max":
            center, scale = (st["max"] + st["min"]) / 2, (st["max"] - st["min"]) / 2
        elif self.mode == "quantile":
            center, scale = (st["q99"] + st["q01"]) / 2, (st["q99"] - st["q01"]) / 2
        else:
            center, scale = np.zeros_like(st["mean"]), np.ones_like(st["mean"])
        scale = np.where(scale < _EPS, 1.0, scale)  # constant dimension: keep it finite
        return center.astype(np.float32), scale.astype(np.float32)

    def dim(self, key: str) -> int:
        return int(self.stats[key]["mean"].shape[0])

    # ---- the map -----------------------------------------------------------------------------

    def _params(self, key: str, x: Any) -> tuple[Any, Any]:
        if key not in self._affine:
            raise KeyError(f"normalizer has no statistics for {key!r} (has: {', '.join(self._affine)})")
        center, scale = self._affine[key]
        if x.shape[-1] != center.shape[0]:
            raise ValueError(f"{key} has {x.shape[-1]} dims but the normalizer was fit on {center.shape[0]}")
        if isinstance(x, np.ndarray):
            return center, scale
        import torch

        dtype = x.dtype if x.is_floating_point() else torch.float32
        return (
            torch.as_tensor(center, device=x.device, dtype=dtype),
            torch.as_tensor(scale, device=x.device, dtype=dtype),
        )

    def normalize(self, key: str, x: Any) -> Any:
        """Map ``x`` (..., D) (numpy or torch) to normalized units; returns the same array type."""
        if self.mode == "none":
            return x.astype(np.float32) if isinstance(x, np.ndarray) else x.float()
        center, scale = self._params(key, x)
        out = (x - center) / scale
        if self.mode == "quantile":
            out = np.clip(out, -1.0, 1.0) if isinstance(out, np.ndarray) else out.clamp(-1.0, 1.0)
        return out.astype(np.float32) if isinstance(out, np.ndarray) else out

    def unnormalize(self, key: str, x: Any) -> Any:
        """Inverse of :meth:`normalize` (quantile mode: exact only inside the 1-99% range)."""
        if self.mode == "none":
            return x.astype(np.float32) if isinstance(x, np.ndarray) else x.float()
        center, scale = self._params(key, x)
        out = x * scale + center
        return out.astype(np.float32) if isinstance(out, np.ndarray) else out

    def normalize_action(self, x: Any) -> Any:
        return self.normalize("action", x)

    def unnormalize_action(self, x: Any) -> Any:
        return self.unnormalize("action", x)

    def normalize_state(self, x: Any) -> Any:
        return self.normalize("state", x)

    def unnormalize_state(self, x: Any) -> Any:
        return self.unnormalize("state", x)

    # ---- persistence -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "stats": {k: {s: v.tolist() for s, v in st.items()} for k, st in self.stats.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalizer:
        return cls(d["mode"], d["stats"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Normalizer:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write ``normalization.json`` (``path`` is the file, or a directory to put it in)."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        return write_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        """Read a ``normalization.json`` file (or the one inside directory ``path``).

        Raises:
            CheckpointError: the file is missing or not a valid normalization file.
        """
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(
                f"{path}: normalization file not found; save it with Normalizer.save"
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a valid normalization file ({exc}); re-save it") from None

    def __repr__(self) -> str:
        dims = ", ".join(f"{k}={self.dim(k)}" for k in self.stats)
        return f"Normalizer(mode={self.mode!r}, {dims})"
