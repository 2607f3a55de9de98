"""Headless offscreen rendering: backend choice and a small multi-camera renderer.

The GL backend must be chosen before ``mujoco`` is imported: :func:`select_gl_backend` sets
``MUJOCO_GL`` (and ``PYOPENGL_PLATFORM``) to ``egl`` when libEGL is found, else ``osmesa`` when
libOSMesa is found, unless the user already set them. ``envs/__init__.py`` calls it first thing.

Traps (docs/traps.md): close renderers explicitly (EGL teardown at interpreter exit raises or
segfaults), and never fork a process after a renderer exists (use ``spawn``/``forkserver``).
"""

from __future__ import annotations

import ctypes.util
import os

import numpy as np


def select_gl_backend() -> str:
    """Set ``MUJOCO_GL`` to an available headless backend unless already set; return it."""
    if "MUJOCO_GL" not in os.environ:
        if ctypes.util.find_library("EGL"):
            os.environ["MUJOCO_GL"] = "egl"
        elif ctypes.util.find_library("OSMesa"):
            os.environ["MUJOCO_GL"] = "osmesa"
        else:
            os.environ["MUJOCO_GL"] = "egl"  # the error on first render names the fix
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    return os.environ["MUJOCO_GL"]


def project(model, data, camera: str, points) -> np.ndarray:
    """World points -> image coordinates of a named camera, as the renderer draws them.

    Args:
        model, data: ``mujoco.MjModel`` / ``MjData`` after ``mj_forward`` (camera poses current).
        camera: camera name in the model.
        points: float (N, 3) world positions (m).

    Returns:
        float64 (N, 2) ``(x, y)`` in [-1, 1] across the image, x to the right and y down (the same
        convention as the spatial-softmax keypoints of ``vla_ft.models.vision``); points outside the
        field of view fall outside [-1, 1]; points behind the camera are NaN. Square images only
        (``fovy`` is the vertical field of view; MuJoCo keeps the aspect ratio of the viewport).
    """
    import mujoco

    cid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    if cid < 0:
        from envs.errors import EnvError

        raise EnvError(f"camera '{camera}' is not in the scene")
    rot = data.cam_xmat[cid].reshape(3, 3)  # columns: camera x (right), y (up), z (backwards)
    local = (np.asarray(points, dtype=np.float64).reshape(-1, 3) - data.cam_xpos[cid]) @ rot  # (N, 3)
    focal = 1.0 / np.tan(np.deg2rad(model.cam_fovy[cid]) / 2.0)
    depth = -local[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.stack([focal * local[:, 0] / depth, -focal * local[:, 1] / depth], axis=1)
    uv[depth <= 0] = np.nan
    return uv


class MultiCameraRenderer:
    """Renders named cameras of one model to uint8 (H, W, 3) arrays, right side up.

    Args:
        model: the ``mujoco.MjModel``.
        image_size: square output size in pixels.
        cameras: camera names present in the model.
    """

    def __init__(self, model, image_size: int, cameras: tuple[str, ...]) -> None:
        import mujoco

        from envs.errors import EnvError

        self._mujoco = mujoco
        self.cameras = tuple(cameras)
        for name in self.cameras:
            if mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name) < 0:
                raise EnvError(f"camera '{name}' is not in the scene; valid cameras: agentview, wrist")
        try:
            self._renderer = mujoco.Renderer(model, image_size, image_size)
        except Exception as exc:  # GL context creation failed: say how to pick another backend
            backend = os.environ.get("MUJOCO_GL")
            raise EnvError(
                f"offscreen rendering failed with MUJOCO_GL={backend} ({exc}); install EGL or OSMesa and "
                "set MUJOCO_GL=egl or MUJOCO_GL=osmesa (PYOPENGL_PLATFORM likewise), or pass render=False"
            ) from exc
        flags = self._renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = False

    def render(self, data) -> dict[str, object]:
        """Return ``{camera: uint8 (H, W, 3)}`` for the current ``data`` (fresh arrays)."""
        out = {}
        for name in self.cameras:
            self._renderer.update_scene(data, camera=name)
            out[name] = self._renderer.render()  # (H, W, 3) uint8, already flipped upright
        return out

    def close(self) -> None:
        """Free the GL context now (idempotent)."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
