"""A uniformly random agent: drives the whole pipeline and gives the chance-level baseline."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from imagine_rl.agents.base import Agent, State
from imagine_rl.runtime.registry import AgentEntry, register_agent


class RandomAgent(Agent):
    """Samples actions uniformly from the single-env action space; learns nothing.

    ``update`` still reads the batch so the replay path is exercised end to end, and reports
    the batch's reward statistics.
    """

    def __init__(self, action_space: gym.Space, seed: int = 0) -> None:
        if not isinstance(action_space, gym.spaces.Box | gym.spaces.Discrete):
            raise TypeError(f"RandomAgent supports Box and Discrete actions, got {action_space}")
        self.action_space = action_space
        self.rng = np.random.default_rng(seed)
        self.updates = 0

    def initial_state(self, batch_size: int) -> State:
        return None

    def act(
        self, obs: dict[str, np.ndarray], state: State, explore: bool
    ) -> tuple[np.ndarray, State]:
        batch = len(obs["is_first"])
        space = self.action_space
        if isinstance(space, gym.spaces.Discrete):
            action = self.rng.integers(space.start, space.start + space.n, size=batch)
            return action.astype(np.int64), state
        low = np.broadcast_to(space.low, (batch, *space.shape))
        high = np.broadcast_to(space.high, (batch, *space.shape))
        return self.rng.uniform(low, high).astype(np.float32), state

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.updates += 1
        reward = batch["reward"].float()
        return {"train/batch_reward_mean": float(reward.mean())}

    def state_dict(self) -> dict[str, Any]:
        # The bit generator state is nested ints and strings: weights_only-safe.
        return {"weights": {}, "updates": self.updates, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.rng.bit_generator.state = state["rng"]


def _make(config: Any, obs_space: gym.spaces.Dict, action_space: gym.Space) -> RandomAgent:
    return RandomAgent(action_space, seed=config.seed)


ENTRY = register_agent(AgentEntry(name="random", make=_make))
