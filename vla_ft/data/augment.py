"""Batched image augmentation for training batches: random shift, resized crop/rotation, color jitter.

``Augmenter(cfg)(batch, generator)`` returns a NEW batch dict whose ``IMAGES`` are augmented (and
``TARGET_UV``, the image positions of the grounding labels, moved with them); everything else is
passed through untouched. Images stay uint8 (B, T, K, 3, H, W) in and out, on
whatever device they are on. One random draw per (sample, camera) is shared by the T history
frames, so a history stays temporally consistent. Random numbers come from a CPU
``torch.Generator`` (deterministic for a given seed on any device).

Order: affine (resized crop + rotation, bilinear) -> shift (replicate pad + crop, exact integer
pixels) -> color jitter (brightness, contrast, saturation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from vla_ft.config import AugmentConfig
from vla_ft.constants import IMAGES, TARGET_UV

_GRAY = (0.299, 0.587, 0.114)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64).float()


def random_shift(
    x: torch.Tensor, pad: int, g: torch.Generator | None, uv: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Shift each item by up to ``pad`` px (edges replicated), like pad-replicate + random crop.

    Args:
        x: (N, C, H, W) images of any dtype (uint8 stays uint8: pure indexing, no interpolation).
        uv: optional (N, ..., 2) image points (x, y) in [-1, 1], returned moved with the content.
    """
    n, _, h, w = x.shape
    off = torch.randint(0, 2 * pad + 1, (n, 2), generator=g).to(x.device) - pad  # (N, 2) rows, cols
    rows = (torch.arange(h, device=x.device)[None] + off[:, :1]).clamp_(0, h - 1)  # (N, H)
    cols = (torch.arange(w, device=x.device)[None] + off[:, 1:]).clamp_(0, w - 1)  # (N, W)
    items = torch.arange(n, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[items, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    out = out.permute(0, 3, 1, 2).contiguous()
    if uv is None:
        return out
    # output pixel r shows input pixel r + off: content moves by -off
    move = -off.flip(-1).to(uv.dtype) * torch.tensor([2.0 / w, 2.0 / h], device=uv.device)  # (N, 2) x, y
    return out, uv + move.view(n, *([1] * (uv.dim() - 2)), 2).to(uv.device)


def random_affine(
    x: torch.Tensor,
    min_scale: float,
    max_deg: float,
    g: torch.Generator | None,
    uv: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop (area in [min_scale, 1], aspect 3/4..4/3) and rotation, resized back.

    Args:
        x: float (N, C, H, W).
        uv: optional (N, ..., 2) image points (x, y) in [-1, 1], returned moved with the content.
    """
    n = x.shape[0]
    area = _uniform(n, min_scale, 1.0, g)
    log_r = _uniform(n, math.log(3 / 4), math.log(4 / 3), g)
    sx = (area * log_r.exp()).sqrt().clamp(max=1.0)  # crop width / W
    sy = (area / log_r.exp()).sqrt().clamp(max=1.0)  # crop height / H
    tx = _uniform(n, -1.0, 1.0, g) * (1 - sx)  # crop center in [-1, 1] coordinates
    ty = _uniform(n, -1.0, 1.0, g) * (1 - sy)
    ang = _uniform(n, -max_deg, max_deg, g) * (math.pi / 180)
    cos, sin = ang.cos(), ang.sin()
    theta = torch.stack(
        [torch.stack([sx * cos, -sy * sin, tx], -1), torch.stack([sx * sin, sy * cos, ty], -1)], 1
    )  # (N, 2, 3)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if uv is None:
        return out
    # output point p samples input point A p + t: an input point q shows up at A^-1 (q - t)
    inv = torch.linalg.inv(theta[:, :, :2].double()).to(uv.device, uv.dtype)  # (N, 2, 2)
    flat = uv.reshape(n, -1, 2) - theta[:, None, :, 2].to(uv.device, uv.dtype)  # (N, M, 2)
    return out, (flat @ inv.transpose(1, 2)).reshape(uv.shape)


def color_jitter(x: torch.Tensor, strength: float, g: torch.Generator | None) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1 - s, 1 + s], one set per item.

    Args:
        x: float (N, T, 3, H, W) in [0, 255]; the T frames of an item share the factors.
    """
    n = x.shape[0]
    lo = max(0.0, 1.0 - strength)
    b, c, s = (_uniform(n, lo, 1.0 + strength, g).to(x.device)[:, None, None, None, None] for _ in range(3))
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype)[None, None, :, None, None]
    x = x * b
    mean = (x * w).sum(2, keepdim=True).mean((1, 3, 4), keepdim=True)  # (N, 1, 1, 1, 1) gray mean
    x = (x - mean) * c + mean
    gray = (x * w).sum(2, keepdim=True)  # (N, T, 1, H, W)
    x = (x - gray) * s + gray
    return x.clamp(0, 255)


class Augmenter:
    """Callable on a collated batch; see the module docstring.

    Args:
        cfg: the ``data.augment`` config section. ``enabled=False`` makes it the identity (it
            still returns a new dict).
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    @property
    def active(self) -> bool:
        c = self.cfg
        return c.enabled and (c.shift > 0 or c.crop_scale < 1.0 or c.color_jitter > 0 or c.rotation_deg > 0)

    def __call__(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        out = dict(batch)
        if not self.active or IMAGES not in batch:
            return out
        imgs = batch[IMAGES]  # (B, T, K, 3, H, W) uint8
        b, t, k, c, h, w = imgs.shape
        x = imgs.permute(0, 2, 1, 3, 4, 5).reshape(b * k, t * c, h, w)  # one draw per (sample, camera)
        uv = batch[TARGET_UV].reshape(b * k, -1, 2) if TARGET_UV in batch else None  # (B*K, 2, 2)
        cfg = self.cfg
        if cfg.crop_scale < 1.0 or cfg.rotation_deg > 0:
            if uv is None:
                x = random_affine(x.float(), cfg.crop_scale, cfg.rotation_deg, generator)
            else:
                x, uv = random_affine(x.float(), cfg.crop_scale, cfg.rotation_deg, generator, uv)
        if cfg.shift > 0:
            if uv is None:
                x = random_shift(x, cfg.shift, generator)
            else:
                x, uv = random_shift(x, cfg.shift, generator, uv)
        if cfg.color_jitter > 0:
            x = color_jitter(x.float().reshape(b * k, t, c, h, w), cfg.color_jitter, generator)
            x = x.reshape(b * k, t * c, h, w)  # (B*K, T*C, H, W)
        if x.dtype != torch.uint8:
            x = x.round().clamp(0, 255).to(torch.uint8)
        out[IMAGES] = x.reshape(b, k, t, c, h, w).permute(0, 2, 1, 3, 4, 5).contiguous()
        if uv is not None:
            out[TARGET_UV] = uv.reshape(batch[TARGET_UV].shape)
        return out
