"""Agents: act in environments, learn from replay. See ``agents.base`` for the contract."""

from imagine_rl.agents.base import Agent
from imagine_rl.agents.random_agent import RandomAgent
from imagine_rl.agents.registry import available_agents, make_agent

__all__ = ["Agent", "RandomAgent", "available_agents", "make_agent"]
