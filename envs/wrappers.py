"""Wrappers gymnasium lacks: action repeat, physics-error guard, square render, dict obs."""

from __future__ import annotations

from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np

from imagine_rl.envs.rendering import close_at_exit, disable_expensive_flags, resize_frame


class ActionRepeat(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Repeat each action ``repeat`` times, summing rewards; stop early at episode end.

    Returns the observation and ``info`` of the last underlying step taken.
    """

    def __init__(self, env: gym.Env, repeat: int) -> None:
        if repeat < 1:
            raise ValueError(f"action_repeat must be >= 1, got {repeat}")
        gym.utils.RecordConstructorArgs.__init__(self, repeat=repeat)
        gym.Wrapper.__init__(self, env)
        self.repeat = repeat

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


def _physics_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    try:
        import mujoco

        errors.append(mujoco.FatalError)
    except ImportError:
        pass
    try:
        from dm_control.rl.control import PhysicsError

        errors.append(PhysicsError)
    except ImportError:
        pass
    return tuple(errors)


class PhysicsErrorGuard(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Turn a MuJoCo divergence into ``truncated=True, info["physics_error"]=True``.

    dm-control raises ``PhysicsError``; gymnasium MuJoCo envs get silently reset by
    ``mj_step`` with a bad-qacc/qpos/qvel warning, which is detected through the warning
    counters of ``unwrapped.data``. The returned observation is the last finite one, reward 0.
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)
        self._errors = _physics_errors()
        self._last_obs: Any = None
        # Repeated with the error so callers still find every info key on that step.
        self._last_info: dict[str, Any] = {}
        self._warning_ids: list[int] = []
        data = getattr(env.unwrapped, "data", None)
        if data is not None and hasattr(data, "warning"):
            import mujoco

            w = mujoco.mjtWarning
            self._warning_ids = [
                int(w.mjWARN_BADQACC),
                int(w.mjWARN_BADQPOS),
                int(w.mjWARN_BADQVEL),
            ]

    def _warning_count(self) -> int:
        if not self._warning_ids:
            return 0
        warning = self.env.unwrapped.data.warning
        return sum(int(warning[i].number) for i in self._warning_ids)

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._last_obs, self._last_info = obs, info
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        before = self._warning_count()
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except self._errors:
            return self._last_obs, 0.0, False, True, {**self._last_info, "physics_error": True}
        if self._warning_count() > before or not _all_finite(obs):
            return self._last_obs, 0.0, False, True, {**self._last_info, "physics_error": True}
        self._last_obs, self._last_info = obs, info
        return obs, reward, terminated, truncated, info


def _all_finite(obs: Any) -> bool:
    if isinstance(obs, np.ndarray) and obs.dtype.kind == "f":
        return bool(np.isfinite(obs).all())
    return True


class SquareRender(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Make ``render()`` return ``size x size`` uint8 RGB frames (area resize if needed).

    With ``quality="fast"`` on a gymnasium MuJoCo env, shadows/reflections are switched off
    on its offscreen viewer's scene (it only exists after the first render, which is redone).

    Shapes:
        ``render()`` -> uint8 (size, size, 3)
    """

    def __init__(self, env: gym.Env, size: int, quality: str = "fast") -> None:
        gym.utils.RecordConstructorArgs.__init__(self, size=size, quality=quality)
        gym.Wrapper.__init__(self, env)
        self.size = size
        self._first_mujoco_render = hasattr(env.unwrapped, "mujoco_renderer")
        self._tune_viewer = quality == "fast" and self._first_mujoco_render

    def render(self) -> np.ndarray | None:
        frame = self.env.render()
        if self._first_mujoco_render:
            # gymnasium creates its offscreen viewer on the first render.
            self._first_mujoco_render = False
            mujoco_renderer = self.env.unwrapped.mujoco_renderer
            close_at_exit(mujoco_renderer)
            viewer = getattr(mujoco_renderer, "viewer", None)
            if self._tune_viewer and viewer is not None and disable_expensive_flags(viewer.scn):
                frame = self.env.render()
        if frame is None:
            return None
        return resize_frame(np.asarray(frame, dtype=np.uint8)[..., :3], self.size)


class DictObservation(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Expose ``{"state": float32 vector, "pixels": uint8 CHW frame}`` (either or both).

    ``state`` is the inner observation flattened (``gymnasium.spaces.flatten``) as float32;
    ``pixels`` is ``render()`` transposed to channels-first, so the inner env must render
    ``rgb_array`` frames of ``size x size`` (see ``SquareRender``). On a physics error the
    previous pixels are repeated, matching the guard's repeated state.

    Shapes:
        state: float32 (state_dim,); pixels: uint8 (3, size, size)
    """

    def __init__(self, env: gym.Env, obs: str, size: int) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, obs=obs, size=size)
        gym.Wrapper.__init__(self, env)
        self._use_state = obs in ("state", "both")
        self._use_pixels = obs in ("pixels", "both")
        self._inner_space = env.observation_space
        spaces: dict[str, gym.Space] = {}
        if self._use_state:
            flat = gym.spaces.flatten_space(env.observation_space)
            spaces["state"] = gym.spaces.Box(
                flat.low.astype(np.float32), flat.high.astype(np.float32), dtype=np.float32
            )
        if self._use_pixels:
            spaces["pixels"] = gym.spaces.Box(0, 255, (3, size, size), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self._last_pixels: np.ndarray | None = None

    def _observe(self, inner_obs: Any, reuse_pixels: bool = False) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self._use_state:
            flat = gym.spaces.flatten(self._inner_space, inner_obs)
            out["state"] = np.asarray(flat, dtype=np.float32)
        if self._use_pixels:
            if not (reuse_pixels and self._last_pixels is not None):
                frame = self.env.render()
                self._last_pixels = np.ascontiguousarray(frame.transpose(2, 0, 1))
            out["pixels"] = self._last_pixels
        return out

    def reset(self, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return self._observe(obs), info

    def step(
        self, action: Any
    ) -> tuple[dict[str, np.ndarray], SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return (
            self._observe(obs, reuse_pixels=bool(info.get("physics_error"))),
            reward,
            terminated,
            truncated,
            info,
        )


class SeedOnFirstReset(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Use ``seed`` for the first ``reset()`` that gets none; seeds the action space too.

    So ``make_env(id, seed=s).reset()`` equals ``make_env(id).reset(seed=s)``.
    """

    def __init__(self, env: gym.Env, seed: int) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, seed=seed)
        gym.Wrapper.__init__(self, env)
        self._pending_seed: int | None = seed
        self.action_space.seed(seed)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if seed is None:
            seed = self._pending_seed
        self._pending_seed = None
        return self.env.reset(seed=seed, options=options)


class GoalObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Add the episode's goal image as observation key ``goal`` (after ``DictObservation``).

    The image comes from ``unwrapped.goal_pixels`` (``envs.blocks.BlocksEnv``), constant
    through an episode.

    Shapes:
        goal: uint8 (3, size, size)
    """

    def __init__(self, env: gym.Env, size: int) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, size=size)
        gym.ObservationWrapper.__init__(self, env)
        if not hasattr(env.unwrapped, "goal_pixels"):
            raise ValueError(f"goal observations need an env with a goal image, got {env}")
        spaces = dict(env.observation_space.spaces)
        spaces["goal"] = gym.spaces.Box(0, 255, (3, size, size), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)

    def observation(self, observation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**observation, "goal": self.env.unwrapped.goal_pixels.copy()}
