"""Stepping vector envs with a policy, and the one rule that turns env steps into replay steps.

Every producer of replay data goes through ``StepRecorder`` (usually inside a ``Collector``):
the training loop, evaluation, ``runtime.replay.fill_with_random_policy`` and the scripts. The
rule (DreamerV3's, for gymnasium vector envs with ``NEXT_STEP`` autoreset):

- a stored step holds the observation the agent acted on, the ``action`` taken at it, the
  ``reward`` received on *arriving* at that observation (0 where ``is_first``) and three flags;
- ``is_first`` is set on the reset observation (the first step of a stream, and the step after
  every episode end, which is where the autoreset returns the new episode's observation);
- ``is_last`` is set on the final observation of an episode, ``is_terminal`` too when the
  episode terminated (not when it was truncated). The action stored with a final observation is
  the one the autoreset ignored.

Writing it once matters: a replay recorded off by one (the reward of ``(s_t, a_t)`` stored at
``t``, ``is_first`` on the terminal observation) trains a world model on shifted targets with no
error anywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

Policy = Callable[[dict[str, np.ndarray]], np.ndarray]  # obs (with is_first) -> actions [N, ...]


class EnvStepError(RuntimeError):
    """The env raised inside ``step``; the original error is ``__cause__``."""


@dataclass
class RecordedStep:
    """What one vector step produced.

    Shapes: ``step`` values ``[N, ...]`` (a replay step of every env stream); ``ended``,
    ``episode_returns``, ``episode_lengths`` ``[N]`` (the latter two valid where ``ended``,
    i.e. where the observation that arrived ends an episode); ``info`` is the vector env's.
    """

    step: dict[str, np.ndarray]
    ended: np.ndarray
    episode_returns: np.ndarray
    episode_lengths: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def finished_episodes(self) -> list[tuple[float, int]]:
        """(return, length) of each episode that ended with this step, in env order."""
        return [
            (float(self.episode_returns[i]), int(self.episode_lengths[i]))
            for i in np.flatnonzero(self.ended)
        ]


class StepRecorder:
    """Turns the transitions of one ``NEXT_STEP`` vector env into replay steps (module rule).

    ``start(obs)`` after ``env.reset``; ``observation`` is what the policy acts on (the env's
    keys plus ``is_first``); ``record(...)`` takes the action and what ``env.step`` returned and
    gives the stored step of the observation acted on. Episode returns and lengths (env
    transitions, the reset step not counted) are tracked per stream.
    """

    def __init__(self, num_envs: int) -> None:
        if num_envs < 1:
            raise ValueError(f"StepRecorder: num_envs must be >= 1, got {num_envs}")
        self.num_envs = num_envs
        self._obs: dict[str, np.ndarray] | None = None

    def start(self, obs: dict[str, np.ndarray]) -> None:
        """A fresh start of every stream (after ``env.reset``): the next step is ``is_first``."""
        self._check(obs)
        n = self.num_envs
        self._obs = obs
        self.reward = np.zeros(n, dtype=np.float32)
        self.is_first = np.ones(n, dtype=bool)
        self.is_last = np.zeros(n, dtype=bool)
        self.is_terminal = np.zeros(n, dtype=bool)
        self.running_return = np.zeros(n, dtype=np.float64)
        self.running_length = np.zeros(n, dtype=np.int64)

    def begin_stream(self) -> None:
        """Store the next step as the first of a new stream (``is_first``, reward 0) without a
        reset, e.g. where the data goes to another replay from here on. An episode in progress
        is not counted as ended."""
        self._require_started()
        self.is_first[:] = True
        self.is_last[:] = False
        self.is_terminal[:] = False
        self.reward[:] = 0.0
        self.running_return[:] = 0.0
        self.running_length[:] = 0

    @property
    def observation(self) -> dict[str, np.ndarray]:
        """The observation to act on: the env's keys and ``is_first`` ``[N]`` (a copy)."""
        self._require_started()
        return {**self._obs, "is_first": self.is_first.copy()}

    def record(
        self,
        action: np.ndarray,
        next_obs: dict[str, np.ndarray],
        reward: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        info: dict[str, Any] | None = None,
    ) -> RecordedStep:
        """The step of the observation acted on (with ``action``), then move to ``next_obs``."""
        self._require_started()
        self._check(next_obs)
        action = np.asarray(action)
        if action.shape[:1] != (self.num_envs,):
            raise ValueError(
                f"StepRecorder: action has shape {list(action.shape)}, expected a leading env "
                f"dim of {self.num_envs}"
            )
        step = {
            **self._obs,
            "action": action,
            "reward": self.reward,
            "is_first": self.is_first,
            "is_last": self.is_last,
            "is_terminal": self.is_terminal,
        }
        # After a final observation the autoreset ignored the action and returned the reset one.
        was_last = self.is_last
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        self._obs = next_obs
        self.reward = np.where(was_last, 0.0, np.asarray(reward)).astype(np.float32)
        self.is_first = was_last.copy()
        self.is_last = (terminated | truncated) & ~was_last
        self.is_terminal = terminated & ~was_last
        self.running_return = np.where(was_last, 0.0, self.running_return) + self.reward
        self.running_length = np.where(was_last, 0, self.running_length) + ~was_last
        return RecordedStep(
            step=step,
            ended=self.is_last.copy(),
            episode_returns=self.running_return.copy(),
            episode_lengths=self.running_length.copy(),
            info=info or {},
        )

    def _require_started(self) -> None:
        if self._obs is None:
            raise RuntimeError("StepRecorder: call start(obs) with the reset observation first")

    def _check(self, obs: dict[str, np.ndarray]) -> None:
        for key, value in obs.items():
            if np.shape(value)[:1] != (self.num_envs,):
                raise ValueError(
                    f"StepRecorder: observation '{key}' has shape {list(np.shape(value))}, "
                    f"expected a leading env dim of {self.num_envs}"
                )


class AgentPolicy:
    """An agent as a ``Policy``: keeps its recurrent state between calls (``agents.base``)."""

    def __init__(self, agent: Any, num_envs: int, explore: bool) -> None:
        self.agent = agent
        self.explore = explore
        self.state = agent.initial_state(num_envs)

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        action, self.state = self.agent.act(obs, self.state, explore=self.explore)
        return np.asarray(action)


class RandomPolicy:
    """Uniformly random actions from a vector env's (batched) action space, seeded."""

    def __init__(self, action_space: gym.Space, seed: int) -> None:
        self.action_space = action_space
        self.action_space.seed(seed)

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.action_space.sample())


class Collector:
    """Steps one vector env with a policy and records every step through ``StepRecorder``.

    ``reset(seed)`` starts every stream; each ``step()`` acts on the current observation, steps
    the env and returns the ``RecordedStep``. An exception inside ``env.step`` is raised as
    ``EnvStepError`` (nothing is recorded for that step), so callers can tell an env crash from
    a policy bug. ``env_seconds`` sums the time spent in ``env.step``.
    """

    def __init__(self, env: gym.vector.VectorEnv, policy: Policy) -> None:
        self.env = env
        self.policy = policy
        self.recorder = StepRecorder(env.num_envs)
        self.env_seconds = 0.0

    def reset(self, seed: int | None = None) -> dict[str, Any]:
        """Reset every env (seeded) and start the streams; returns the reset's ``info``."""
        obs, info = self.env.reset(seed=seed)
        self.recorder.start(obs)
        return info

    @property
    def observation(self) -> dict[str, np.ndarray]:
        return self.recorder.observation

    def step(self) -> RecordedStep:
        action = self.policy(self.recorder.observation)
        tick = time.time()
        try:
            next_obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as error:
            raise EnvStepError(f"{type(error).__name__}: {error}") from error
        finally:
            self.env_seconds += time.time() - tick
        return self.recorder.record(action, next_obs, reward, terminated, truncated, info)
