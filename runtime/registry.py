"""Agents as plug-ins: what an agent brings to the runtime, in one registry entry.

``runtime`` knows no agent by name. An agent module registers an ``AgentEntry``: how to build
the agent, the config sections it owns (its ``agent.*`` keys and whole sections such as
``world_model``), the presets it starts from, the env settings it needs and its validation.
The runtime builds the run's ``Config`` class from the registered entries
(``runtime.config.config_class``), so adding an agent never means editing ``runtime/``.

Agents are found in two ways: an entry registered in this process (``register_agent``), and
the ``imagine_rl.agents`` entry-point group of installed packages, loaded the first time an
agent is looked up (this project's own agents come in that way; a third-party package adds
its agents the same way, with no change here).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "imagine_rl.agents"


@dataclass(frozen=True)
class AgentEntry:
    """Everything the runtime needs to know about one agent.

    name:          the value of ``agent.name`` (``agent=<name>`` on the command line).
    make:          ``(config, obs_space, action_space) -> Agent`` (see ``agents.base``).
    agent_fields:  a dataclass of the agent's own ``agent.*`` keys; merged with the shared
                   ``runtime.config.AgentConfig`` (``name``, ``compile``).
    sections:      top-level config sections it owns, ``{"world_model": WorldModelConfig}``.
                   Sections and ``agent.*`` fields of every registered agent exist in every
                   config (a preset may set them for several agents); each agent reads its own.
    presets:       presets applied when the command line names this agent and no preset.
    preset_dir:    a directory of ``<name>.yaml`` presets it ships (several entries may share
                   one).
    env_settings:  ``config -> None``: env settings it cannot work without, applied after the
                   presets and before the command line (which still wins; ``validate`` then
                   names what is missing).
    validate:      ``config -> None``, raising ``ConfigError``: its sections' cross-field rules
                   (run for every config: its sections are always present) and, where
                   ``config.agent.name`` is this agent, what it needs from the env and the
                   shared sections.
    check_new_run: ``(config, has_init_weights) -> None``, raising ``ConfigError``: what a new
                   training run of this agent needs (e.g. weights from ``init=``).
    default:       the agent of a command line that names none (one entry sets it).
    """

    name: str
    make: Callable[..., Any]
    agent_fields: type | None = None
    sections: Mapping[str, type] = field(default_factory=dict)
    presets: tuple[str, ...] = ()
    preset_dir: Path | None = None
    env_settings: Callable[[Any], None] | None = None
    validate: Callable[[Any], None] | None = None
    check_new_run: Callable[[Any, bool], None] | None = None
    default: bool = False


class _Registry:
    def __init__(self) -> None:
        self.entries: dict[str, AgentEntry] = {}
        self.version = 0  # bumped on every change: cached config classes are rebuilt
        self.loaded_entry_points = False

    def load_entry_points(self) -> None:
        if self.loaded_entry_points:
            return
        self.loaded_entry_points = True
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            # A module (registers its agents on import) or an AgentEntry / list of them.
            loaded = entry_point.load()
            for entry in loaded if isinstance(loaded, list | tuple) else [loaded]:
                if isinstance(entry, AgentEntry) and entry.name not in self.entries:
                    register_agent(entry)


_REGISTRY = _Registry()


def register_agent(entry: AgentEntry, replace: bool = False) -> AgentEntry:
    """Add ``entry``; a second entry of the same name raises unless ``replace``."""
    if not isinstance(entry, AgentEntry):
        raise TypeError(f"register_agent: expected an AgentEntry, got {type(entry).__name__}")
    existing = _REGISTRY.entries.get(entry.name)
    if existing is not None and existing is not entry and not replace:
        raise ValueError(
            f"agent '{entry.name}' is already registered; pass replace=True to override it"
        )
    clash = [
        (section, other.name)
        for other in _REGISTRY.entries.values()
        if other.name != entry.name
        for section in entry.sections
        if section in other.sections and other.sections[section] is not entry.sections[section]
    ]
    if clash:
        section, other = clash[0]
        raise ValueError(
            f"agent '{entry.name}': config section '{section}' is already owned by agent "
            f"'{other}' with another class; share that class or pick another section name"
        )
    if entry.default and any(e.default for e in _REGISTRY.entries.values() if e is not existing):
        raise ValueError(f"agent '{entry.name}': another agent is already the default")
    _REGISTRY.entries[entry.name] = entry
    _REGISTRY.version += 1
    return entry


def unregister_agent(name: str) -> None:
    """Remove a registered agent (tests register toy agents for their duration)."""
    if _REGISTRY.entries.pop(name, None) is not None:
        _REGISTRY.version += 1


@contextmanager
def registered(entry: AgentEntry) -> Iterator[AgentEntry]:
    """``with registered(entry): ...``: the agent exists for the block only."""
    register_agent(entry)
    try:
        yield entry
    finally:
        unregister_agent(entry.name)


def entries() -> list[AgentEntry]:
    """Every registered agent (installed plug-ins included), in registration order."""
    _REGISTRY.load_entry_points()
    return list(_REGISTRY.entries.values())


def registry_version() -> int:
    _REGISTRY.load_entry_points()
    return _REGISTRY.version


def agent_names() -> list[str]:
    return sorted(entry.name for entry in entries())


def default_agent() -> AgentEntry | None:
    """The entry of the agent a command line gets when it names none."""
    return next((entry for entry in entries() if entry.default), None)


def agent_entry(name: str) -> AgentEntry:
    """The entry of ``name``; an unknown name raises ``ValueError`` with the choices."""
    for entry in entries():
        if entry.name == name:
            return entry
    names = agent_names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    listed = ", ".join(names) if names else "none registered (is the imagine-rl package installed?)"
    raise ValueError(f"unknown agent '{name}': {hint}available: {listed}")


def build_agent(
    config: Any, obs_space: Any, action_space: Any, planned_updates: int | None = None
) -> Any:
    """The agent ``config.agent.name`` for these spaces. The trainer tells it how many updates
    the run plans (``planned_updates``, counted by the loop's clock) when its ``make`` takes a
    ``planned_updates`` keyword; a plug-in whose ``make`` does not is built without it."""
    make = agent_entry(config.agent.name).make
    if planned_updates is not None and "planned_updates" in inspect.signature(make).parameters:
        return make(config, obs_space, action_space, planned_updates=planned_updates)
    return make(config, obs_space, action_space)


def preset_dirs() -> list[Path]:
    """Directories of agent presets, in registration order, without repeats."""
    dirs: list[Path] = []
    for entry in entries():
        if entry.preset_dir is not None and entry.preset_dir not in dirs:
            dirs.append(entry.preset_dir)
    return dirs
