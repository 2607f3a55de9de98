"""THE observation transform: env observation (or the same keys read from HDF5) -> model inputs.

``obs_to_inputs`` is used by the dataset for every sample and by the policy at inference on live
env observations, so a recorded frame and the live frame give identical tensors. Keep it the only
place where images are laid out / resized and state is concatenated and normalized.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vla_ft.constants import IMAGES, STATE
from vla_ft.data.normalize import Normalizer
from vla_ft.errors import DataError


@dataclass(frozen=True)
class ObsSpec:
    """Which observation keys feed the model, and how.

    Attributes:
        image_keys: camera keys, in model order (K of them).
        state_keys: proprio keys, concatenated in this order into STATE (S dims in total).
        image_size: (H, W) the model sees; images of another size are resized. None: keep as is.
        history: frames per sample (T); the dataset stacks them, the policy keeps a short queue.
    """

    image_keys: tuple[str, ...]
    state_keys: tuple[str, ...]
    image_size: tuple[int, int] | None = None
    history: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_keys", tuple(self.image_keys))
        object.__setattr__(self, "state_keys", tuple(self.state_keys))
        if self.image_size is not None:
            object.__setattr__(self, "image_size", (int(self.image_size[0]), int(self.image_size[1])))


def resize_images(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 images (..., 3, H, W) -> (..., 3, h, w), deterministic."""
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:]).float()  # (N, 3, H, W)
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out.reshape(*lead, *out.shape[-3:])


def _get(obs: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in obs:
        raise DataError(
            f"observation is missing key '{key}' (has: {', '.join(sorted(obs))}); check image_keys/state_keys"
        )
    return np.asarray(obs[key])


def _image(obs: Mapping[str, np.ndarray], key: str, lead: int) -> np.ndarray:
    arr = _get(obs, key)
    if arr.dtype != np.uint8 or arr.ndim != lead + 3 or arr.shape[-1] != 3:
        raise DataError(
            f"observation '{key}': expected uint8 images (..., H, W, 3) with {lead + 3} dims, "
            f"got {arr.dtype} {arr.shape}; store images as uint8 HWC"
        )
    return arr


def _state(obs: Mapping[str, np.ndarray], key: str, lead: int) -> np.ndarray:
    arr = _get(obs, key)
    if arr.ndim == lead:  # scalar per step
        arr = arr[..., None]
    if arr.ndim != lead + 1:
        raise DataError(
            f"observation '{key}': expected a state vector with {lead + 1} dims, got shape {arr.shape}"
        )
    return arr.astype(np.float32, copy=False)


def _stack_chw(imgs: list[np.ndarray]) -> np.ndarray:
    """K arrays (..., H, W, 3) -> one (..., K, 3, H, W) array in a single strided copy per camera.

    numpy's strided uint8 copy is several times faster than torch's permute().contiguous().
    """
    lead, (h, w, c) = imgs[0].shape[:-3], imgs[0].shape[-3:]
    out = np.empty((*lead, len(imgs), c, h, w), dtype=np.uint8)
    for j, im in enumerate(imgs):
        out[..., j, :, :, :] = np.moveaxis(im, -1, -3)
    return out


def obs_to_inputs(
    obs: Mapping[str, np.ndarray],
    spec: ObsSpec,
    normalizer: Normalizer | None,
    batched: bool = False,
) -> dict[str, torch.Tensor]:
    """Turn an observation mapping into model inputs.

    Args:
        obs: key -> array. Images uint8 (H, W, 3), state (D,) for a single step; a stacked
            history adds a leading T: (T, H, W, 3) / (T, D). With ``batched=True`` every array has
            one more leading N: (N, [T,] H, W, 3) / (N, [T,] D).
        spec: keys, image size and history.
        normalizer: normalizes STATE (``None``: raw units).
        batched: whether arrays carry a leading batch dimension N.

    Returns:
        ``{IMAGES: uint8 ([N,] T, K, 3, H, W), STATE: float32 ([N,] T, S)}``; T = 1 for a single step.
    """
    nb = int(batched)
    probe = _get(obs, spec.image_keys[0]) if spec.image_keys else _get(obs, spec.state_keys[0])
    single = probe.ndim == nb + (3 if spec.image_keys else 1)  # no T axis given
    lead = nb + (0 if single else 1)
    imgs = [_image(obs, k, lead) for k in spec.image_keys]
    if single:
        imgs = [im[(slice(None),) * nb + (None,)] for im in imgs]  # ([N,] 1, H, W, 3)
    images = torch.from_numpy(_stack_chw(imgs)) if imgs else torch.zeros(0, dtype=torch.uint8)
    if imgs and spec.image_size is not None and tuple(images.shape[-2:]) != spec.image_size:
        images = resize_images(images, spec.image_size)
    parts = [_state(obs, k, lead) for k in spec.state_keys]
    if parts:
        state = np.concatenate(parts, axis=-1)
        if normalizer is not None and "state" in normalizer.stats:
            state = normalizer.normalize_state(state)
        if single:
            state = state[..., None, :]  # ([N,] 1, S)
        state_t = torch.from_numpy(np.ascontiguousarray(state, dtype=np.float32))
    else:
        t_shape = images.shape[: nb + 1] if imgs else (1,)
        state_t = torch.zeros(*t_shape, 0)
    return {IMAGES: images, STATE: state_t}
