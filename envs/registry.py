"""Env-id parsing, listing and "did you mean" suggestions.

Ids are ``gym:<gymnasium id>`` (e.g. ``gym:Pendulum-v1``), ``dmc:<domain>-<task>`` (e.g.
``dmc:ball_in_cup-catch``) or ``blocks:<push|stack>-<n>`` (``envs.blocks``, n = 1..5).
dm-control domains and tasks may contain underscores but never dashes, so a dmc id is split
on its first ``-``.
"""

from __future__ import annotations

import difflib
from functools import cache
from typing import Literal, NamedTuple

from imagine_rl.envs.blocks import blocks_names, parse_blocks_name

SUITES: tuple[str, ...] = ("gym", "dmc", "blocks")


class UnknownEnvError(ValueError):
    """An env id that names no known suite or task."""


class EnvId(NamedTuple):
    """A parsed env id: ``suite`` is ``"gym"``, ``"dmc"`` or ``"blocks"``, ``name`` the
    suite-local id."""

    suite: Literal["gym", "dmc", "blocks"]
    name: str


@cache
def _dmc_tasks() -> tuple[tuple[str, str], ...]:
    # Imported lazily: dm_control.suite pulls in every domain's XML loader (~1 s).
    from dm_control import suite

    return tuple(suite.ALL_TASKS)


def _gym_ids() -> list[str]:
    import gymnasium

    return sorted(gymnasium.envs.registry.keys())


def list_env_ids(suite: str) -> list[str]:
    """All valid ids of ``suite`` (``"gym"``, ``"dmc"`` or ``"blocks"``), prefixed, sorted."""
    if suite == "blocks":
        return sorted(f"blocks:{name}" for name in blocks_names())
    if suite == "dmc":
        return sorted(f"dmc:{d}-{t}" for d, t in _dmc_tasks())
    if suite == "gym":
        return [f"gym:{name}" for name in _gym_ids()]
    raise ValueError(f"unknown suite {suite!r}; expected one of {list(SUITES)}")


def _unknown(env_id: str, suite: str) -> UnknownEnvError:
    valid = list_env_ids(suite)
    close = difflib.get_close_matches(env_id, valid, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return UnknownEnvError(
        f"unknown env id {env_id!r}; {hint}"
        f"({suite} has {len(valid)} envs: see envs.list_env_ids({suite!r}))"
    )


def parse_env_id(env_id: str) -> EnvId:
    """Validate ``env_id`` and split it into suite and suite-local name.

    Raises:
        UnknownEnvError: bad prefix, or no such env in the suite (with close matches).
    """
    if not isinstance(env_id, str):
        raise UnknownEnvError(f"env id must be a str like 'dmc:walker-walk', got {env_id!r}")
    suite, sep, name = env_id.partition(":")
    if not sep or suite not in SUITES:
        raise UnknownEnvError(
            f"unsupported env id {env_id!r}: expected prefix 'blocks:', 'gym:' or 'dmc:' "
            "(e.g. 'gym:Pendulum-v1', 'dmc:walker-walk', 'blocks:push-3')"
        )
    if suite == "blocks":
        if parse_blocks_name(name) is None:
            raise _unknown(env_id, "blocks")
        return EnvId("blocks", name)
    if suite == "dmc":
        domain, dash, task = name.partition("-")
        if not dash or (domain, task) not in _dmc_tasks():
            raise _unknown(env_id, "dmc")
        return EnvId("dmc", name)
    import gymnasium

    if name not in gymnasium.envs.registry:
        raise _unknown(env_id, "gym")
    return EnvId("gym", name)


def check_env_id(env_id: str) -> None:
    """Raise ``UnknownEnvError`` unless ``env_id`` is valid (cheap: builds no env)."""
    parse_env_id(env_id)


def split_dmc_name(name: str) -> tuple[str, str]:
    """``"ball_in_cup-catch"`` -> ``("ball_in_cup", "catch")``."""
    domain, _, task = name.partition("-")
    return domain, task
