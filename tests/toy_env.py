"""A tiny deterministic env for loop tests: no physics, no rendering cost."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class CountingEnv(gym.Env):
    """Observation ``state = [t, episode_id, env_seed]``; terminates after ``length`` steps.

    Reward is the first action component, so a test can tell which action was applied
    (``reward="count"``: ``100 * episode + t`` after the step, the same for every policy).
    ``crash_at`` raises inside ``step`` at that global step to simulate an env crash.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        length: int = 7,
        render_mode: str | None = None,
        crash_at: int | None = None,
        truncate: bool = False,
        reward: str = "action",
    ) -> None:
        self.length = length
        self.render_mode = render_mode
        self.crash_at = crash_at
        self.truncate = truncate
        self.reward = reward
        self.observation_space = gym.spaces.Dict(
            {"state": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)}
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.t = 0
        self.episode = -1
        self.seed_value = 0
        self.global_steps = 0

    def _obs(self) -> dict[str, np.ndarray]:
        return {"state": np.array([self.t, self.episode, self.seed_value], dtype=np.float32)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.seed_value = seed
        self.t = 0
        self.episode += 1
        return self._obs(), {}

    def step(self, action):
        self.global_steps += 1
        if self.crash_at is not None and self.global_steps >= self.crash_at:
            raise RuntimeError("simulated env crash")
        self.t += 1
        done = self.t >= self.length
        terminated = done and not self.truncate
        truncated = done and self.truncate
        if self.reward == "count":
            reward = float(100 * self.episode + self.t)
        else:
            reward = float(np.asarray(action)[0])
        return self._obs(), reward, terminated, truncated, {}

    def render(self):
        frame = np.zeros((16, 16, 3), dtype=np.uint8)
        frame[: self.t % 16] = 255
        return frame


def make_counting_vector_env(num_envs: int, seed: int, **kwargs) -> gym.vector.VectorEnv:
    env = gym.vector.SyncVectorEnv(
        [lambda: CountingEnv(**kwargs) for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP,
    )
    return env
