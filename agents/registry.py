"""Build an agent by name from the run config and the env's spaces."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import gymnasium as gym

from agents.base import Agent
from runtime.config import Config

AgentFactory = Callable[[Config, gym.spaces.Dict, gym.Space], Agent]


def _random(config: Config, obs_space: gym.spaces.Dict, action_space: gym.Space) -> Agent:
    from agents.random_agent import RandomAgent

    return RandomAgent(action_space, seed=config.seed)


def _dreamer(config: Config, obs_space: gym.spaces.Dict, action_space: gym.Space) -> Agent:
    from agents.dreamer import DreamerAgent

    return DreamerAgent(config, obs_space, action_space)


def _op3(config: Config, obs_space: gym.spaces.Dict, action_space: gym.Space) -> Agent:
    from agents.op3 import OP3Agent

    return OP3Agent(config, obs_space, action_space)


_AGENTS: dict[str, AgentFactory] = {"random": _random, "dreamer": _dreamer, "op3": _op3}


def register_agent(name: str, factory: AgentFactory) -> None:
    _AGENTS[name] = factory


def available_agents() -> list[str]:
    return sorted(_AGENTS)


def make_agent(config: Config, obs_space: gym.spaces.Dict, action_space: gym.Space) -> Agent:
    """The agent ``config.agent.name`` for one env's observation and action spaces."""
    name = config.agent.name
    if name not in _AGENTS:
        close = difflib.get_close_matches(name, list(_AGENTS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(
            f"unknown agent '{name}': {hint}available: {', '.join(available_agents())}"
        )
    return _AGENTS[name](config, obs_space, action_space)
