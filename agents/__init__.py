"""Agents: act in environments, learn from replay. See ``agents.base`` for the contract."""

from agents.base import Agent
from agents.random_agent import RandomAgent
from agents.registry import available_agents, make_agent

__all__ = ["Agent", "RandomAgent", "available_agents", "make_agent"]
