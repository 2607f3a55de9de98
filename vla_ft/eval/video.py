"""Episode videos: camera views side by side, instruction drawn on a banner and in the file name."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

FPS = 20
MIN_HEIGHT = 192  # small sim images are upscaled (nearest) to at least this height
BANNER_H = 24


def _slug(text: str, limit: int = 60) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:limit] or "episode"


def compose_frames(frames: dict[str, np.ndarray], instruction: str) -> np.ndarray:
    """Lay camera views side by side and draw the instruction above them.

    Args:
        frames: camera key -> uint8 (T, H, W, 3); all the same T and H.
        instruction: text drawn in the banner.

    Returns:
        uint8 (T, BANNER_H + H', W', 3) with even sizes (H' = H * scale, W' = sum of widths * scale).
    """
    views = [frames[k] for k in sorted(frames)]
    strip = np.concatenate(views, axis=2)  # (T, H, sumW, 3)
    scale = max(1, -(-MIN_HEIGHT // strip.shape[1]))
    strip = strip.repeat(scale, axis=1).repeat(scale, axis=2)
    t, h, w, _ = strip.shape
    banner = _banner(instruction, w)  # (BANNER_H, W, 3)
    out = np.concatenate([np.broadcast_to(banner, (t, *banner.shape)), strip], axis=1)
    pad_h, pad_w = out.shape[1] % 2, out.shape[2] % 2  # H.264 wants even sizes
    if pad_h or pad_w:
        out = np.pad(out, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return np.ascontiguousarray(out)


def _banner(text: str, width: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, BANNER_H), (0, 0, 0))
    ImageDraw.Draw(img).text((4, 6), text, fill=(255, 255, 255))
    return np.asarray(img)


def write_video(
    out_dir: str | Path, index: int, success: bool, instruction: str, frames: dict[str, np.ndarray]
) -> Path:
    """Write one episode as mp4 (H.264 via imageio-ffmpeg).

    The name is ``ep<index>_<success|failure>_<instruction slug>.mp4``.
    """
    import imageio.v2 as imageio

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ep{index:04d}_{'success' if success else 'failure'}_{_slug(instruction)}.mp4"
    video = compose_frames(frames, instruction)
    with imageio.get_writer(path, fps=FPS, codec="libx264", macro_block_size=1, quality=7) as writer:
        for frame in video:
            writer.append_data(frame)
    return path
