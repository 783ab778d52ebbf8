"""The built-in agents' registry entries, and building an agent from the run config.

The compositions' entries (``agents.compose.DREAMER``, ``agents.compose.OP3``; their
config sections live in ``agents/dreamer_config.py`` and ``agents/op3_config.py``); importing
this module registers them all. The registry itself is
``runtime.registry`` (the runtime finds this module through the ``imagine_rl.agents`` entry
point in ``pyproject.toml``).
"""

from __future__ import annotations

import gymnasium as gym

from imagine_rl.agents import compose, random_agent
from imagine_rl.agents.base import Agent
from imagine_rl.runtime.config import Config
from imagine_rl.runtime.registry import AgentEntry, agent_names, build_agent, register_agent

BUILTIN = (compose.DREAMER, compose.OP3, random_agent.ENTRY)


def available_agents() -> list[str]:
    return agent_names()


def make_agent(
    config: Config,
    obs_space: gym.spaces.Dict,
    action_space: gym.Space,
    planned_updates: int | None = None,
) -> Agent:
    """The agent ``config.agent.name`` for one env's observation and action spaces (told the
    run's ``planned_updates`` when it takes them; see ``runtime.registry.build_agent``)."""
    return build_agent(config, obs_space, action_space, planned_updates)


__all__ = ["AgentEntry", "available_agents", "make_agent", "register_agent"]
