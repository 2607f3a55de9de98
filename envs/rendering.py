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
