"""Agents as compositions of a world model and a behaviour, chosen by configuration.

Two keys pick the parts: ``world_model.kind`` (``rssm``: ``worldmodels.WorldModel``;
``slots``: ``worldmodels.slots.SlotWorldModel``) and ``agent.behaviour`` (``actor_critic``:
``worldmodels.actor_critic.ActorCritic`` learned in imagination; ``planner``:
``worldmodels.planning.CEMPlanner``, on predicted return for the RSSM and toward the goal's
slots for slots). ``agent=dreamer`` names rssm + actor_critic and ``agent=op3`` slots +
planner (``dreamer_config.COMPOSITIONS``; ``auto`` keeps them); any of the four pairs is
built by the class that owns its world model (``DreamerAgent`` for the RSSM, ``OP3Agent`` for
slots), and a part brings the env settings it needs (pixels and the goal image for slots).
"""

from __future__ import annotations

from typing import Any

from imagine_rl.agents import dreamer_config, op3_config
from imagine_rl.agents.base import Agent
from imagine_rl.agents.dreamer import DreamerAgent
from imagine_rl.agents.op3 import OP3Agent
from imagine_rl.runtime.registry import AgentEntry, register_agent

BUILDERS = {"rssm": DreamerAgent, "slots": OP3Agent}


def make(
    config: Any, obs_space: Any, action_space: Any, planned_updates: int | None = None
) -> Agent:
    """The agent of ``config``'s composition (``dreamer_config.composition``)."""
    kind, _ = dreamer_config.composition(config)
    return BUILDERS[kind](config, obs_space, action_space, planned_updates)


def env_settings(config: Any) -> None:
    """The env settings of the chosen world model (slots: ``op3_config.env_settings``)."""
    op3_config.env_settings(config)


def validate(config: Any) -> None:
    dreamer_config.validate(config)
    op3_config.validate(config)


SECTIONS = {
    "world_model": dreamer_config.WorldModelConfig,
    "planner": dreamer_config.PlannerConfig,
    "op3": op3_config.OP3Config,
}

DREAMER = register_agent(
    AgentEntry(
        name="dreamer",
        make=make,
        agent_fields=dreamer_config.DreamerAgentConfig,
        sections=SECTIONS,
        # The main job: a small Dreamer on a short Pendulum run that fits a CPU in minutes.
        presets=("dreamer_tiny", "quickstart"),
        preset_dir=dreamer_config.PRESET_DIR,
        env_settings=env_settings,
        validate=validate,
        default=True,
    )
)

OP3 = register_agent(
    AgentEntry(
        name=op3_config.NAME,
        make=make,
        presets=("op3",),
        preset_dir=op3_config.PRESET_DIR,
        env_settings=env_settings,
        check_new_run=op3_config.check_new_run,
    )
)

__all__ = ["BUILDERS", "DREAMER", "OP3", "env_settings", "make"]
