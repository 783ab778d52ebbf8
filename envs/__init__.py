"""Environment layer: gymnasium, dm-control and blocks tasks behind one ``make_env``.

Importing this package picks a headless OpenGL backend for MuJoCo when ``MUJOCO_GL`` is
unset, which must happen before anything imports ``mujoco`` or ``dm_control``.
"""

import os as _os
import sys as _sys
import warnings as _warnings


def _configure_mujoco_gl() -> None:
    if "MUJOCO_GL" in _os.environ or not _sys.platform.startswith("linux"):
        return  # user's choice, or macOS/Windows where mujoco picks cgl/wgl itself
    import ctypes

    def loadable(*names: str) -> bool:
        for name in names:
            try:
                ctypes.CDLL(name)
                return True
            except OSError:
                pass
        return False

    if loadable("libEGL.so.1", "libEGL.so"):
        _os.environ["MUJOCO_GL"] = "egl"
    elif loadable("libOSMesa.so.8", "libOSMesa.so.6", "libOSMesa.so"):
        _os.environ["MUJOCO_GL"] = "osmesa"
        _warnings.warn(
            "envs: libEGL not found, using MUJOCO_GL=osmesa (slow software rendering)",
            stacklevel=2,
        )
    else:
        _os.environ["MUJOCO_GL"] = "egl"
        _warnings.warn(
            "envs: neither libEGL nor libOSMesa found; MuJoCo rendering will fail "
            "(install libegl1 or libosmesa6, or set MUJOCO_GL=glfw with a display)",
            stacklevel=2,
        )
    if "mujoco" in _sys.modules:
        _rebind_mujoco_gl()


def _rebind_mujoco_gl() -> None:
    # mujoco picked its GL backend when it was imported (glfw, as MUJOCO_GL was unset then;
    # import sorters happily put `import mujoco` before `import envs`). mujoco.Renderer looks
    # the context class up on this module at construction time, so rebinding it suffices.
    try:
        from mujoco.rendering.classic import gl_context

        if _os.environ["MUJOCO_GL"] == "egl":
            from mujoco.egl import GLContext
        else:
            from mujoco.osmesa import GLContext
        gl_context.GLContext = GLContext
    except Exception as e:  # noqa: BLE001 - best effort; only a warning is lost
        _warnings.warn(
            f"envs: mujoco was imported before envs and its GL backend could not be switched "
            f"to MUJOCO_GL={_os.environ['MUJOCO_GL']} ({e!r}); import imagine_rl.envs first",
            stacklevel=3,
        )


_configure_mujoco_gl()
# pygame (gymnasium's classic-control renderer) needs no window for rgb_array frames.
_os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

from imagine_rl.envs.blocks import BlocksEnv  # noqa: E402
from imagine_rl.envs.dmc import DMCEnv  # noqa: E402
from imagine_rl.envs.make import OBS_MODES, make_env, make_vector_env  # noqa: E402
from imagine_rl.envs.registry import UnknownEnvError, check_env_id, list_env_ids, parse_env_id  # noqa: E402

__all__ = [
    "OBS_MODES",
    "BlocksEnv",
    "DMCEnv",
    "UnknownEnvError",
    "check_env_id",
    "list_env_ids",
    "make_env",
    "make_vector_env",
    "parse_env_id",
]
