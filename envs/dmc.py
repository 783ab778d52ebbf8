"""dm-control suite tasks as ``gymnasium.Env`` (dm-control ships no gymnasium adapter)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from imagine_rl.envs.distractors import DistractorVideo, composite
from imagine_rl.envs.rendering import RENDER_QUALITIES, MujocoFrameRenderer


def default_camera(domain: str) -> int:
    # Camera 0 of quadruped is a static wide shot the robot quickly leaves; 2 tracks it
    # (the convention of DrQ/Dreamer pixel benchmarks).
    return 2 if domain == "quadruped" else 0


class DMCEnv(gym.Env[np.ndarray, np.ndarray]):
    """One ``dm_control.suite`` task with a flat float32 state observation.

    The state is the concatenation of the task's observation dict, each entry flattened, in
    the order of the task's ``observation_spec()`` (an OrderedDict, fixed per task; see
    ``state_keys``). Bounds are -inf..inf. Actions use the task's own bounds and are clipped.

    Episode end: a LAST time step with discount 0 is ``terminated``; any other LAST (the
    suite's time limit) is ``truncated``. ``info["discount"]`` carries dm_env's discount.
    With ``suite_time_limit=False`` the suite's limit is disabled (an outer
    ``gymnasium.wrappers.TimeLimit`` is then expected).

    ``distractors=True`` replaces the background of rendered frames (skybox and floor planes,
    found by MuJoCo's segmentation rendering) with a random video (``envs.distractors``), a new
    one each episode drawn from ``np_random`` (so seeded resets give the same frames) that
    advances one frame per step.

    Shapes:
        observation: float32 (state_dim,); action: float32 (action_dim,);
        ``render()``: uint8 (size, size, 3) when ``render_mode="rgb_array"``.
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        domain: str,
        task: str,
        *,
        seed: int | None = None,
        render_mode: str | None = None,
        size: int = 64,
        camera: int | str | None = None,
        render_quality: str = "fast",
        suite_time_limit: bool = True,
        distractors: bool = False,
    ) -> None:
        from dm_control import suite

        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if render_quality not in RENDER_QUALITIES:
            raise ValueError(
                f"render_quality must be one of {RENDER_QUALITIES}, got {render_quality!r}"
            )
        task_kwargs: dict[str, Any] = {"random": _dm_seed(seed)}
        if not suite_time_limit:
            task_kwargs["time_limit"] = float("inf")
        self._env = suite.load(domain, task, task_kwargs=task_kwargs)
        self.domain, self.task = domain, task
        self.render_mode = render_mode
        self.size = size
        self.render_quality = render_quality
        self.camera = _resolve_camera(
            self.physics, default_camera(domain) if camera is None else camera
        )
        self.metadata = {**self.metadata, "render_fps": round(1.0 / self._env.control_timestep())}

        obs_spec = self._env.observation_spec()
        self.state_keys: tuple[str, ...] = tuple(obs_spec.keys())
        dim = sum(int(np.prod(s.shape)) for s in obs_spec.values())
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        act = self._env.action_spec()
        self._act_low = np.broadcast_to(act.minimum, act.shape).astype(np.float64)
        self._act_high = np.broadcast_to(act.maximum, act.shape).astype(np.float64)
        self.action_space = gym.spaces.Box(
            self._act_low.astype(np.float32), self._act_high.astype(np.float32), dtype=np.float32
        )
        self._renderer: MujocoFrameRenderer | None = None
        self._needs_reset = True
        self.distractors = distractors
        self._video: DistractorVideo | None = None
        if distractors:
            import mujoco

            model = self.physics.model
            self._plane_geoms = model.geom_type == int(mujoco.mjtGeom.mjGEOM_PLANE)
            self._geom_type = int(mujoco.mjtObj.mjOBJ_GEOM)

    @property
    def physics(self) -> Any:
        """The task's ``dm_control.mujoco.Physics`` (for tests and custom rendering)."""
        return self._env.physics

    def _flatten(self, observation: dict[str, Any]) -> np.ndarray:
        parts = [np.asarray(observation[k], dtype=np.float32).ravel() for k in self.state_keys]
        return np.concatenate(parts)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            # Episode initial states come from the task's own RandomState, not np_random.
            self._env.task.random.seed(_dm_seed(seed))
        time_step = self._env.reset()
        self._needs_reset = False
        if self.distractors:
            self._video = DistractorVideo(self.size, self.np_random)
        return self._flatten(time_step.observation), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise gym.error.ResetNeeded("DMCEnv.step() called before reset() or after episode end")
        action = np.clip(np.asarray(action, dtype=np.float64), self._act_low, self._act_high)
        time_step = self._env.step(action)
        if self._video is not None:
            self._video.step()
        discount = float(time_step.discount)
        terminated = time_step.last() and discount == 0.0
        truncated = time_step.last() and not terminated
        self._needs_reset = time_step.last()
        obs = self._flatten(time_step.observation)
        return obs, float(time_step.reward or 0.0), terminated, truncated, {"discount": discount}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        physics = self.physics
        if self._renderer is None:
            self._renderer = MujocoFrameRenderer(
                physics.model.ptr, self.size, self.camera, self.render_quality
            )
        frame = self._renderer.render(physics.data.ptr)
        if self._video is None:
            return frame
        return composite(frame, self._video.frame(), self._background_mask())

    def _background_mask(self) -> np.ndarray:
        """bool (size, size): pixels showing the skybox or a plane geom (the floor)."""
        seg = self._renderer.segmentation()
        ids, types = seg[..., 0], seg[..., 1]
        mask = ids < 0
        geom = (types == self._geom_type) & (ids >= 0)
        mask[geom] = self._plane_geoms[ids[geom]]
        return mask

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()


def _dm_seed(seed: int | None) -> int | None:
    # np.random.RandomState only takes seeds < 2**32; gymnasium allows any non-negative int.
    return None if seed is None else int(seed) % 2**32


def _resolve_camera(physics: Any, camera: int | str) -> int:
    import mujoco

    ncam = physics.model.ncam
    if isinstance(camera, str):
        cam_id = mujoco.mj_name2id(physics.model.ptr, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if cam_id < 0:
            raise ValueError(f"camera {camera!r} not found; this model has {ncam} cameras")
        return cam_id
    if not -1 <= int(camera) < ncam:
        raise ValueError(f"camera must be in [-1, {ncam}) for this model (-1 = free), got {camera}")
    return int(camera)
