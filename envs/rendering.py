"""Offscreen MuJoCo rendering helpers and a dependency-free frame resize.

``render_quality="fast"`` turns off what costs most in software (Mesa llvmpipe) rendering and
is invisible at 64x64: shadow maps, reflections and multisampling, and shrinks the offscreen
framebuffer to the frame size. ``"default"`` keeps MuJoCo's settings.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import weakref
from functools import lru_cache
from typing import Any, Literal

import numpy as np

RenderQuality = Literal["fast", "default"]
RENDER_QUALITIES: tuple[str, ...] = ("fast", "default")


def configure_model(model: Any, size: int, quality: str) -> None:
    """Set ``mujoco.MjModel`` visual options; must run before its render context exists.

    Shadow map size and multisampling are baked into the ``MjrContext`` when it is created,
    so changing them afterwards has no effect.
    """
    glob = model.vis.global_
    if quality == "fast":
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        glob.offwidth = size
        glob.offheight = size
    else:
        glob.offwidth = max(glob.offwidth, size)
        glob.offheight = max(glob.offheight, size)


def disable_expensive_flags(scene: Any) -> bool:
    """Switch shadows/reflections off on an ``MjvScene``; True if anything changed."""
    import mujoco

    changed = False
    for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
        if scene.flags[flag]:
            scene.flags[flag] = 0
            changed = True
    return changed


# GL objects still open at interpreter exit are closed by an atexit hook registered *after*
# mujoco's EGL one (atexit is LIFO; we register right after creating a context, so after
# mujoco's first one); otherwise their __del__ runs after eglTerminate and prints
# EGL_BAD_DISPLAY tracebacks.
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()
_atexit_registered = False


def _close_all() -> None:
    for obj in list(_LIVE):
        obj.close()


def close_at_exit(obj: Any) -> None:
    """Call ``obj.close()`` at interpreter exit unless it is garbage-collected before."""
    global _atexit_registered
    _LIVE.add(obj)
    if not _atexit_registered:
        atexit.register(_close_all)
        _atexit_registered = True


class MujocoFrameRenderer:
    """Renders ``size x size`` RGB frames of (model, data) from one camera.

    Shapes:
        ``render(data)`` -> uint8 (size, size, 3)
    """

    def __init__(self, model: Any, size: int, camera: int | str, quality: str) -> None:
        import mujoco

        configure_model(model, size, quality)
        try:
            self._renderer = mujoco.Renderer(model, height=size, width=size)
        except Exception as e:  # noqa: BLE001 - GL failures surface as many exception types
            backend = os.environ.get("MUJOCO_GL", "<unset>")
            raise RuntimeError(
                f"could not create a MuJoCo offscreen renderer with MUJOCO_GL={backend} ({e!r}). "
                "Headless Linux needs libEGL (MUJOCO_GL=egl, default set by `import imagine_rl.envs`) or "
                "libOSMesa (MUJOCO_GL=osmesa); set MUJOCO_GL before anything imports mujoco."
            ) from e
        if quality == "fast":
            disable_expensive_flags(self._renderer.scene)
        self._camera = camera
        close_at_exit(self)

    def render(self, data: Any) -> np.ndarray:
        self._renderer.update_scene(data, camera=self._camera)
        return self._renderer.render()

    def segmentation(self) -> np.ndarray:
        """Object ids and types of the scene last rendered by ``render``: int32
        (size, size, 2), ``(-1, -1)`` where nothing is hit (the skybox).

        Shapes:
            -> int32 (size, size, 2)
        """
        self._renderer.enable_segmentation_rendering()
        try:
            return self._renderer.render()
        finally:
            self._renderer.disable_segmentation_rendering()

    def close(self) -> None:
        if self._renderer is not None:
            # mujoco.Renderer.close frees its GL objects in whatever context is current, which
            # is another live renderer's after that one rendered (and breaks it): make ours
            # current first.
            gl_context = getattr(self._renderer, "_gl_context", None)
            if gl_context is not None:
                gl_context.make_current()
            self._renderer.close()
            self._renderer = None
        _LIVE.discard(self)

    def __del__(self) -> None:
        # Dropped without close() (an env garbage-collected): free in our own context too.
        with contextlib.suppress(Exception):
            self.close()


@lru_cache(maxsize=16)
def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    # Row i averages input cells overlapping [i, i+1) * n_in / n_out (exact area resampling;
    # for upscaling it degenerates to nearest-neighbour).
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    cells = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, cells + 1) - np.maximum(lo, cells), 0.0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """Area-resize an RGB frame to a square.

    Shapes:
        frame: uint8 (H, W, 3) -> uint8 (size, size, 3); returned as-is if already that size.
    """
    h, w = frame.shape[:2]
    if (h, w) == (size, size):
        return frame
    wy, wx = _area_weights(h, size), _area_weights(w, size)
    out = np.einsum("ih,hwc,jw->ijc", wy, frame.astype(np.float32), wx, optimize=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
