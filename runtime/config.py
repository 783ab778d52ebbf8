"""Typed configuration: dataclass sections, YAML presets and ``key=value`` overrides.

A run's configuration is built in layers, later layers winning:

1. the dataclass defaults below,
2. the named presets (``runtime/presets/<name>.yaml``), in the order given,
3. command-line overrides ``section.key=value`` (values parsed as YAML scalars/lists).

Shorthands: ``env=<id>`` sets ``env.id``, ``agent=<name>`` sets ``agent.name``,
``accelerator=<name>`` sets ``accelerator.name``, ``preset=a,b`` (or ``preset=[a,b]``) picks
presets. Derived values are properties, never fields filled in later.

Every error is a ``ConfigError`` with a one-line message naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from imagine_rl import sparse
from imagine_rl.runtime import registry
from imagine_rl.sparse import SparseSettings

# Presets of the runtime's own sections (env, run); agents ship theirs (AgentEntry.preset_dir).
PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration key, type or value is invalid. The message says which and why."""


def at_least(min_value: float = 1) -> dict[str, Any]:
    """Field metadata: the value must be ``>= min_value`` (checked by ``validate``)."""
    return {"min": min_value}


def _default_agent_name() -> str:
    entry = registry.default_agent()
    return entry.name if entry is not None else ""


def default_presets() -> list[str]:
    """The presets of a command line that names neither an agent nor a preset: the default
    agent's (``AgentEntry.presets``)."""
    entry = registry.default_agent()
    return list(entry.presets) if entry is not None else []


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class EnvConfig:
    """Which task the agent faces and how it is observed (see ``envs.make_env``)."""

    id: str = "dmc:cartpole-balance"
    obs: Literal["state", "pixels", "both"] = "state"
    size: int = field(default=64, metadata=at_least(8))
    # Env steps (frames) per agent step; rewards are summed over the repeat.
    action_repeat: int = field(default=2, metadata=at_least(1))
    # Episode length limit in env steps (frames); None keeps the task's own limit.
    time_limit: int | None = field(default=None, metadata=at_least(1))
    num_envs: int = field(default=1, metadata=at_least(1))
    eval_num_envs: int = field(default=1, metadata=at_least(1))
    # Subprocess workers for the vector env; worth it for pixel tasks with several envs.
    asynchronous: bool = False
    render_quality: Literal["fast", "default"] = "fast"
    camera: int | None = None
    # dmc: tasks only: moving random shapes over drifting colour noise replace the background
    # (sky and floor) of every rendered frame, a distraction that reconstruction must model.
    distractors: bool = False
    # blocks: tasks only: add the episode's goal image as observation key `goal` (OP3 needs it).
    goal_obs: bool = False
    # blocks: tasks only: pick_place = (pick xy, place xy) per action, 10 actions an episode;
    # pusher = planar velocity of a pusher, 100 steps an episode.
    blocks_action: Literal["pick_place", "pusher"] = "pick_place"
    # blocks: tasks only: end the episode (terminated) on the step that reaches success, so a
    # reached goal configuration counts even if a later action would have undone it.
    terminate_on_success: bool = False
    # Change one mechanism of a MuJoCo task at a chosen env step of each training env, e.g.
    # "body_mass:pole_1*2@step=20000" or "gravity:z=-5@step=0;actuator_gear:slide*0.5@step=10"
    # (grammar in envs/interventions.py; eval envs keep the original task).
    intervention: str | None = None


@dataclass
class AgentConfig:
    """Which agent acts and learns (``agent=<name>``), and the settings of its update that the
    runtime reads too. An agent's own ``agent.*`` keys come from its registry entry
    (``runtime.registry.AgentEntry.agent_fields``), merged into this section."""

    # A registered agent (runtime.registry); default: the registry's default agent.
    name: str = field(default_factory=lambda: _default_agent_name())
    # torch.compile the whole update (world-model step and behaviour step, each one graph
    # with its backward; CUDA graphs on cuda): true, false, or auto (see
    # runtime.accelerator.resolve_compile).
    compile: bool | Literal["auto"] = "auto"


@dataclass
class ReplayFractions:
    """How each sampled batch is drawn (DreamerV3's ``replay.fracs`` and ``replay.online``);
    the three shares must sum to 1. The default, all uniform, is the plain uniform replay."""

    # Share of windows drawn uniformly over every (stream, start) pair.
    uniform: float = field(default=1.0, metadata=at_least(0))
    # Share drawn by recency: a window of age a (in windows, newest 0) with probability
    # proportional to 1 / (a + 1), as DreamerV3's recency selector (recexp 1).
    recency: float = field(default=0.0, metadata=at_least(0))
    # Share taken from the online queue: consecutive non-overlapping windows of new data, each
    # handed out once in the order written, before any other draw. What the queue cannot fill
    # (no new window yet) is drawn like the rest: uniform and recency in proportion, or uniform
    # when both are 0. online=1 with the others 0 is DreamerV3's `replay.online: True` with
    # `fracs.uniform: 1`.
    online: float = field(default=0.0, metadata=at_least(0))


@dataclass
class ReplayConfig:
    """Sequence replay: capacity in steps, sampled windows of ``batch_size x batch_length``."""

    capacity: int = field(default=1_000_000, metadata=at_least(1))
    batch_size: int = field(default=16, metadata=at_least(1))
    batch_length: int = field(default=64, metadata=at_least(1))
    # Steps per stored chunk (per env stream); full chunks are written to disk once.
    chunk_size: int = field(default=1024, metadata=at_least(1))
    # Keep the replay on disk with the checkpoints so a resume restores it exactly.
    save: bool = True
    # Which windows each batch holds: uniform, recency and online shares (sum 1).
    fractions: ReplayFractions = field(default_factory=ReplayFractions)
    # 1: DreamerV3's replay context. Windows start at least one step into a stream's kept
    # range, batches carry the stored latent of the step before each window (context/<key>,
    # context_valid), and every update's latents are written back (replay.update_latents).
    # Memory: capacity x (floats of one step's latents) x 4 bytes, allocated at the first
    # write, e.g. 1M steps x (512 deter + 32 x 16 stoch floats) = 4.1 GB. 0: off.
    context: int = field(default=0, metadata=at_least(0))

    @property
    def steps_per_batch(self) -> int:
        return self.batch_size * self.batch_length


@dataclass
class SparseConfig(SparseSettings):
    """Dynamic-sparse layers (see ``sparse`` and README "Dynamic-sparse layers"). Off by default.

    The fields are ``sparse.SparseSettings``'s (defined once, in the library), plus ``enabled``;
    ``skip`` defaults to the agent's own list of layers kept dense. Not set here, derived by
    the agent from the run: ``total_steps`` (the world-model updates the run will do), ``seed``
    (the top-level ``seed``) and ``fast_path_batch`` (``replay.batch_size *
    replay.batch_length``).
    """

    enabled: bool = field(default=False, metadata={"doc": "sparsify the agent's world model"})
    behaviour: bool = field(
        default=False,
        metadata={
            "doc": "also sparsify the actor and the critic (with sparse.enabled; the same "
            "density, method and blocks, their own masks and schedule; their output layers "
            "stay dense and the slow critic, an EMA of the masked critic, runs dense)"
        },
    )
    # null: the agent's own default list (typically the first layer on each input and the
    # output layers; each agent's config module documents it); `sparse.skip=[]` sparsifies
    # every linear/conv layer.
    skip: list[str] | None = field(
        default=None, metadata={"doc": "layers kept dense (patterns); null: the agent's default"}
    )

    def library_config(
        self, *, total_steps: int, seed: int, fast_path_batch: int, skip: list[str] | None = None
    ) -> sparse.SparseConfig:
        """The ``sparse.SparseConfig`` for these settings (``skip`` replaces ``self.skip``),
        validated by the sparse library (a bad value raises ``ConfigError`` naming the key)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(SparseSettings)}
        values["skip"] = list(skip if skip is not None else self.skip or [])
        try:
            return sparse.SparseConfig(
                **values, total_steps=total_steps, seed=seed, fast_path_batch=fast_path_batch
            )
        except ValueError as error:
            raise ConfigError(str(error)) from error


@dataclass
class AcceleratorConfig:
    """Where training runs (``runtime.accelerator``): ``auto`` picks cuda when present, else cpu;
    ``ipu-sim`` runs on the host and enforces/estimates a Graphcore IPU (settings: ``ipu.*``)."""

    name: Literal["auto", "cpu", "cuda", "ipu-sim"] = "auto"
    # Torch intra-op threads; 0 = leave torch's default. 1 is best beside env workers.
    threads: int = field(default=1, metadata=at_least(0))
    deterministic: bool = False
    # fp32, bf16 (autocast) or fp16 (autocast + gradient scaler); auto: fp32. ipu-sim: fp32 or
    # fp16 (no bf16). The one precision key, for every accelerator: autocast covers the forward
    # passes (losses and optimizer states stay fp32); fp16 on ipu-sim also emulates fp16
    # storage (weights rounded after every step, see ipu.stochastic_rounding).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # cuda only: TF32 tensor-core matmuls for fp32 work (off when deterministic=true).
    tf32: bool = True

    @property
    def resolved_precision(self) -> str:
        """fp32 | bf16 | fp16: ``precision`` with ``auto`` resolved (fp32 on every accelerator,
        ipu-sim included)."""
        return "fp32" if self.precision == "auto" else self.precision


@dataclass
class IPUConfig:
    """The simulated IPU (``accelerator=ipu-sim``; see ``runtime/ipu_sim``). Results are computed
    on the host; IPU limits are enforced and IPU speed is estimated, never measured. Its
    precision is ``accelerator.precision`` (fp32 or fp16)."""

    # Device constants (each tagged sourced/derived/assumed in runtime/ipu_sim/presets.py):
    # ipu2 (GC200), bow (Bow IPU), ipu1 (GC2), small (4 tiles, for tests).
    preset: Literal["ipu2", "bow", "ipu1", "small"] = "ipu2"
    num_ipus: int = field(default=1, metadata=at_least(1))
    # accelerator.precision=fp16 only: weights are rounded fp32 -> fp16 stochastically (seeded
    # by `seed`), as the IPU's hardware stochastic rounding does; false rounds to nearest.
    stochastic_rounding: bool = True
    # Micro-batches per step for the pipeline estimate; must be >= the pipeline stages.
    # 0 = the number of stages.
    gradient_accumulation: int = field(default=0, metadata=at_least(0))
    # Pipeline placement, `<module prefix>:<ipu>` in execution order with non-decreasing ipu
    # ids, e.g. [world_model.encoder:0, world_model.rssm:1, actor:1, critic:1]. Empty: one
    # IPU holds everything, or with num_ipus > 1 contiguous groups of modules balanced by size.
    placement: list[str] = field(default_factory=list)


@dataclass
class DistributedConfig:
    """Data-parallel training under ``torchrun`` (``runtime.distributed``). A plain
    ``imagine-rl train`` run (no ``WORLD_SIZE`` > 1 in the environment) ignores it."""

    # auto: nccl when the accelerator is cuda, else gloo. gloo also moves cuda tensors (through
    # the host), which lets several ranks share one GPU.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Seconds a collective waits for the other ranks before failing (a hung or lost rank).
    # The other ranks wait while rank 0 evaluates, so keep it above one evaluation's duration.
    timeout: float = field(default=1800.0, metadata=at_least(1))


@dataclass
class LoggingConfig:
    """Logger backends. ``metrics.jsonl`` in the run directory is always written."""

    console: bool = True
    wandb: bool = True
    tensorboard: bool = False
    project: str = "imagine-rl"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    # offline never blocks and needs no account; "online" needs `wandb login`.
    mode: Literal["offline", "online", "disabled"] = "offline"
    video_fps: int = field(default=20, metadata=at_least(1))


@dataclass
class RunConfig:
    """The training schedule. Step counts are env steps (frames, action repeat included)."""

    dir: str = "runs/default"
    steps: int = field(default=20_000, metadata=at_least(1))
    # Replayed steps (batch_size x batch_length per update) per agent (policy) step.
    replay_ratio: float = field(default=512.0, metadata=at_least(0))
    # Env steps collected before the first update.
    learning_starts: int = field(default=1000, metadata=at_least(0))
    eval_every: int = field(default=5000, metadata=at_least(1))
    eval_episodes: int = field(default=5, metadata=at_least(0))
    eval_initial: bool = False
    video: bool = True
    checkpoint_every: int = field(default=5000, metadata=at_least(1))
    keep_checkpoints: int = field(default=3, metadata=at_least(1))
    log_every: int = field(default=1000, metadata=at_least(1))
    # Presets run one after another by `imagine-rl train`, each a whole run: this command's
    # presets with the stage's appended, then the command line (every stage gets it). Stage i
    # starts from stage i-1's weights (init=); all but the last write to <run.dir>/<stage>/,
    # the last to run.dir. Re-running the command skips finished stages and resumes a
    # stopped one. Empty: one ordinary run.
    stages: list[str] = field(default_factory=list)


@dataclass
class Config:
    """The run's shared sections. ``seed`` seeds envs, torch and numpy; ``preset`` records the
    presets used.

    The config of a run is an instance of ``config_class()``: this class extended with the
    ``agent.*`` keys and the sections of every registered agent (``runtime.registry``), e.g.
    ``world_model``. Without ``preset=`` on the command line the presets of the agent it names
    apply, or the default agent's (the main job that fits a CPU in minutes); naming any preset
    replaces them, leaving the dataclass defaults below.
    """

    seed: int = 0
    preset: list[str] = field(default_factory=default_presets)
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    accelerator: AcceleratorConfig = field(default_factory=AcceleratorConfig)
    ipu: IPUConfig = field(default_factory=IPUConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def policy_steps(self) -> int:
        """Agent steps per env stream needed to reach ``run.steps`` env steps in total."""
        return -(-self.run.steps // self.env.action_repeat)


_CONFIG_CLASSES: dict[int, type[Config]] = {}


def config_class() -> type[Config]:
    """``Config`` with every registered agent's ``agent.*`` keys and sections (cached until the
    registry changes). A section name may not shadow a shared one."""
    version = registry.registry_version()
    cached = _CONFIG_CLASSES.get(version)
    if cached is not None:
        return cached
    shared = {f.name for f in dataclasses.fields(Config)}
    mixins = tuple(e.agent_fields for e in registry.entries() if e.agent_fields is not None)
    agent_cls = dataclasses.make_dataclass(
        "AgentConfig", [], bases=(*dict.fromkeys(mixins), AgentConfig)
    )
    agent_cls.__doc__, agent_cls.__module__ = AgentConfig.__doc__, __name__
    sections: list[tuple[str, Any, Any]] = [("agent", agent_cls, field(default_factory=agent_cls))]
    for entry in registry.entries():
        for name, cls in entry.sections.items():
            if name in shared:
                raise ConfigError(
                    f"agent '{entry.name}' registers a section '{name}', which is a shared "
                    "section of runtime.config.Config; pick another name"
                )
            if name not in {n for n, _, _ in sections}:
                sections.append((name, cls, field(default_factory=cls)))
    cls = dataclasses.make_dataclass("Config", sections, bases=(Config,))
    cls.__doc__, cls.__module__ = Config.__doc__, __name__
    _CONFIG_CLASSES.clear()
    _CONFIG_CLASSES[version] = cls
    return cls


# `section=value` sets this field of the section.
SHORTHANDS: dict[str, str] = {"env": "id", "agent": "name", "accelerator": "name"}
# Top-level keys handled by the CLI rather than stored in Config.
CLI_KEYS = ("resume", "resume.replay")


# --------------------------------------------------------------------------------------
# Conversion between dicts and dataclasses
# --------------------------------------------------------------------------------------


def to_dict(config: Any) -> Any:
    """Plain nested dict of a config (lists copied), suitable for YAML/JSON."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list | tuple):
        return [to_dict(v) for v in config]
    return config


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return " or ".join(_type_name(a) for a in args) + (" or null" if optional else "")
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{hint}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value)  # accepts "1e6" (a string in YAML 1.1)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


# Keys that no longer exist -> what replaces them ({value}: the value given). Set by a user (the
# command line, a preset, an experiment file) each is refused in one line naming its replacement
# (``parse_overrides``, ``_apply``), before anything is built. A saved run's config (its
# config.yaml, a checkpoint's manifest) is translated instead: ``upgrade_saved_config``.
REMOVED_KEYS: dict[str, str] = {
    "agent.precision": "use accelerator.precision={value} (one key for every accelerator)",
    "ipu.precision": (
        "use accelerator.precision={value} (one key for every accelerator; the IPU runs fp32 "
        "or fp16)"
    ),
}


def _removed_key(key: str, value: Any) -> ConfigError | None:
    """The one-line refusal of a removed key (``REMOVED_KEYS``), or None for any other key."""
    hint = REMOVED_KEYS.get(key)
    if hint is None:
        return None
    if not isinstance(value, str) or value not in ("fp32", "bf16", "fp16"):
        value = "fp32|bf16|fp16"
    return ConfigError(f"{key} was removed: {hint.format(value=value)}")


def upgrade_saved_config(data: dict[str, Any]) -> dict[str, Any]:
    """A saved run's config in today's keys: the precision keys runs saved before
    ``accelerator.precision`` became the only one (``agent.precision``, ``ipu.precision``) are
    dropped, and the precision they chose moves to ``accelerator.precision`` where ``auto``
    would now pick another one, so the run goes on (or is evaluated) at the precision it
    trained with. Old runs saved ``agent: {precision: fp32}`` and ``ipu: {precision: fp32}``:
    those go silently, as ``auto`` is fp32."""
    agent, ipu = data.get("agent"), data.get("ipu")
    if not any(isinstance(s, dict) and "precision" in s for s in (agent, ipu)):
        return data
    sections = {
        name: dict(data[name])
        for name in ("agent", "ipu", "accelerator")
        if isinstance(data.get(name), dict)
    }
    agent_precision = sections.get("agent", {}).pop("precision", "fp32")
    ipu_precision = sections.get("ipu", {}).pop("precision", "fp32")
    accelerator = sections.setdefault("accelerator", {})
    if isinstance(data.get("accelerator"), str):  # hand-written `accelerator: <name>`
        accelerator["name"] = data["accelerator"]
    if accelerator.get("precision", "auto") == "auto":
        # How the run resolved its precision: ipu.precision on ipu-sim, else agent.precision.
        trained = ipu_precision if accelerator.get("name") == "ipu-sim" else agent_precision
        if trained != "fp32":
            accelerator["precision"] = trained
    if not accelerator and "accelerator" not in data:
        del sections["accelerator"]
    return {**data, **sections}


def _unknown_key(prefix: str, name: str, valid: list[str]) -> ConfigError:
    full = f"{prefix}{name}"
    candidates = [f"{prefix}{v}" for v in valid]
    close = difflib.get_close_matches(full, candidates, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(candidates)}"
    return ConfigError(f"unknown config key '{full}': {hint}")


def _apply(config: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Recursively write ``updates`` into the dataclass ``config``, type-checking each value."""
    hints = typing.get_type_hints(type(config))
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name, value in updates.items():
        if name not in fields:
            raise _removed_key(f"{prefix}{name}", value) or _unknown_key(prefix, name, list(fields))
        key = f"{prefix}{name}"
        current = getattr(config, name)
        if dataclasses.is_dataclass(current):
            if isinstance(value, dict):
                _apply(current, value, prefix=f"{key}.")
                continue
            shorthand = SHORTHANDS.get(name) if not prefix else None
            if shorthand is None:
                raise ConfigError(f"{key}: is a section; set its keys as {key}.<key>=value")
            _apply(current, {shorthand: value}, prefix=f"{key}.")
            continue
        setattr(config, name, _coerce(key, value, hints[name]))


def _check_ranges(config: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_ranges(value, prefix=f"{key}.")
            continue
        minimum = f.metadata.get("min")
        if minimum is not None and value is not None and value < minimum:
            raise ConfigError(f"{key}: must be >= {minimum}, got {value!r}")


def _check_accelerator(config: Config) -> None:
    """What the simulated IPU cannot do: bf16 (it runs fp32 or fp16) and a compiled update."""
    acc = config.accelerator
    if acc.name == "ipu-sim":
        if acc.precision == "bf16":
            raise ConfigError(
                "accelerator.precision=bf16 with accelerator=ipu-sim: the IPU has no bf16: use "
                "accelerator.precision=fp16 or fp32"
            )
        if config.agent.compile is True:
            raise ConfigError(
                "agent.compile=true with accelerator=ipu-sim: the simulated IPU runs eager on the "
                "host (its op trace is the cost model); set agent.compile=false"
            )


def _check_agent(config: Config) -> registry.AgentEntry:
    try:
        return registry.agent_entry(config.agent.name)
    except ValueError as error:
        raise ConfigError(f"agent.name: {error}") from error


def _check_replay(replay: ReplayConfig) -> None:
    if replay.context > 1:
        raise ConfigError(
            f"replay.context: must be 0 (off) or 1 (start each window from the stored latent of "
            f"the step before it), got {replay.context}"
        )
    if replay.batch_length + replay.context > replay.capacity:
        what = "replay.batch_length" + (" + replay.context" if replay.context else "")
        raise ConfigError(
            f"{what} ({replay.batch_length + replay.context}) exceeds replay.capacity "
            f"({replay.capacity}); raise the capacity or shorten the windows"
        )
    shares = replay.fractions
    total = shares.uniform + shares.recency + shares.online
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"replay.fractions: uniform + recency + online must sum to 1, got {shares.uniform} "
            f"+ {shares.recency} + {shares.online} = {total:g}; e.g. set "
            f"replay.fractions.uniform={max(0.0, 1.0 - shares.recency - shares.online):g}"
        )


def stage_dir_name(stage: str) -> str:
    """The directory of a ``run.stages`` entry under ``run.dir``: the preset's name (the file
    name without ``.yaml`` for a preset given as a path)."""
    path = Path(stage)
    return path.stem if path.suffix in (".yaml", ".yml") else stage


def _check_stages(stages: list[str]) -> None:
    """Each stage a preset that exists, listed once, that does not stage runs itself."""
    seen: dict[str, str] = {}
    for stage in stages:
        try:
            preset = load_preset(stage)
        except ConfigError as error:
            raise ConfigError(f"run.stages: {error}") from None
        run = preset.get("run")
        inner = run.get("stages") if isinstance(run, dict) else None
        if inner:
            raise ConfigError(
                f"run.stages: stage preset '{stage}' sets run.stages itself ({inner}) and "
                f"stages do not nest; list those stages here instead, or set `run: {{stages: "
                f"[]}}` in '{stage}'"
            )
        name = stage_dir_name(stage)
        if name in seen:
            also = f" (also as '{seen[name]}')" if seen[name] != stage else ""
            raise ConfigError(
                f"run.stages: '{stage}' is listed twice{also}, and each stage writes its own "
                f"<run.dir>/{name}/; list each stage preset once"
            )
        seen[name] = stage


def validate(config: Config) -> Config:
    """Range checks and cross-field rules, the shared ones here and each registered agent's
    own (``AgentEntry.validate``). Returns the config for chaining."""
    _check_agent(config)
    _check_ranges(config)
    try:
        config.sparse.validate()
    except ValueError as error:
        raise ConfigError(str(error)) from error
    _check_accelerator(config)
    _check_replay(config.replay)
    _check_stages(config.run.stages)
    if config.env.obs != "state" and config.env.size < 8:
        raise ConfigError(f"env.size: must be >= 8 for pixel observations, got {config.env.size}")
    if config.env.distractors and not config.env.id.startswith("dmc:"):
        raise ConfigError(
            f"env.distractors: needs a dmc:<domain>-<task> env, got {config.env.id!r}; "
            "set env.distractors=false or pick a dmc: task"
        )
    if not config.env.id.startswith("blocks:"):
        if config.env.goal_obs:
            raise ConfigError(
                f"env.goal_obs: needs a blocks:<push|stack>-<n> env, got {config.env.id!r}; "
                "set env.goal_obs=false or pick a blocks: task"
            )
        if config.env.blocks_action != "pick_place":
            raise ConfigError(
                f"env.blocks_action={config.env.blocks_action}: needs a blocks:<push|stack>-<n> "
                f"env, got {config.env.id!r}; drop it or pick a blocks: task"
            )
        if config.env.terminate_on_success:
            raise ConfigError(
                f"env.terminate_on_success: needs a blocks:<push|stack>-<n> env, got "
                f"{config.env.id!r}; set env.terminate_on_success=false or pick a blocks: task"
            )
    if config.env.intervention is not None:
        from imagine_rl.envs.interventions import parse_interventions

        try:
            parse_interventions(config.env.intervention)
        except ValueError as error:
            raise ConfigError(f"env.intervention: {error}") from error
    for entry in registry.entries():
        if entry.validate is not None:
            entry.validate(config)
    return config


# --------------------------------------------------------------------------------------
# Presets and overrides
# --------------------------------------------------------------------------------------


def _preset_dirs() -> list[Path]:
    """Where named presets are looked up: the runtime's, then each registered agent's."""
    return [PRESET_DIR, *(d for d in registry.preset_dirs() if d != PRESET_DIR)]


def _read_yaml(path: Path, what: str) -> Any:
    """The parsed file; invalid YAML is a one-line ``ConfigError`` with the line and column."""
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}; fix the file") from None


def available_presets() -> list[str]:
    return sorted({p.stem for d in _preset_dirs() for p in d.glob("*.yaml")})


def load_preset(name: str) -> dict[str, Any]:
    """The nested dict of one named preset (or a path to a YAML file)."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") or not path.exists():
        found = [d / f"{name}.yaml" for d in _preset_dirs() if (d / f"{name}.yaml").exists()]
        if not found:
            names = available_presets()
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown preset '{name}': {hint}available: {', '.join(names)}")
        path = found[0]
    data = _read_yaml(path, f"preset '{name}' ({path})")
    if not isinstance(data, dict):
        raise ConfigError(f"preset '{name}' ({path}) must be a mapping of sections")
    return data


def format_override(key: str, value: Any) -> str:
    """``key=value`` as ``parse_overrides`` reads it back (YAML): ``true``/``false``, ``null``,
    lists and mappings as compact JSON (valid YAML flow), anything else as ``str``."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, list | tuple | dict):
        text = json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))
    else:
        text = str(value)
    return f"{key}={text}"


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["a.b=1", "env=dmc:walker-walk"]`` -> ``{"a.b": 1, "env": "dmc:walker-walk"}``.

    Values are parsed as YAML (``true``, ``1e-4``, ``[a, b]``, ``null``); a value that
    YAML cannot parse is kept as a string.
    """
    overrides: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"bad argument {arg!r}: expected key=value, e.g. run.steps=5000")
        key, raw = arg.split("=", 1)
        key = key.strip().lstrip("+")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        removed = _removed_key(key, value)
        if removed is not None:  # before resume= looks at the keys or anything is built
            raise removed
        # YAML reads 'dmc:walker-walk' fine but would turn e.g. '1:30' into an int (sexagesimal
        # in YAML 1.1); keep the literal text when the parsed value is not a plain scalar match.
        if isinstance(value, int | float) and not isinstance(value, bool) and ":" in raw:
            value = raw
        overrides[key] = value
    return overrides


def run_script(main: Any, argv: list[str]) -> int:
    """Run a script's ``main(argv)``: a ``ConfigError`` that escapes it (a setting found bad only
    when something is built from it, e.g. an env that rejects ``env.camera``) is printed as one
    line, exit status 2. Every other exception is a bug and keeps its traceback."""
    import sys

    try:
        code = main(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Some mains return their result (a dict) rather than an exit status: that is success.
    return code if isinstance(code, int) else 0


def parse_script_args(
    argv: list[str],
    defaults: dict[str, Any],
    aliases: dict[str, str] | None = None,
    doc: str | None = None,
) -> dict[str, Any]:
    """``key=value`` arguments of a benchmark/research script, typed like ``defaults``.

    ``-h``/``--help`` prints ``doc`` (the script's docstring) and the keys with their defaults,
    then exits with status 0.

    The same grammar as ``train.py`` (``parse_overrides``); each value is coerced to the type
    of its default (a list default takes ``a,b`` or ``[a, b]`` or one scalar; a ``None``
    default keeps the parsed value). Unknown keys raise ``ConfigError`` with a close match.
    """
    if any(arg in ("-h", "--help") for arg in argv):
        print((doc or "").rstrip())
        print("\nkeys (default):")
        for key, default in defaults.items():
            print(f"  {key}={_default_text(default)}")
        raise SystemExit(0)
    args = dict(defaults)
    for key, value in parse_overrides(argv).items():
        key = (aliases or {}).get(key, key)
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown argument '{key}': {hint}valid: {', '.join(defaults)}")
        default = defaults[key]
        if isinstance(default, list):
            if not isinstance(value, list | str):
                value = [value]
            args[key] = _coerce(key, value, list[type(default[0])])
        elif default is None or (value is None and isinstance(default, str)):
            args[key] = value  # `key=null` unsets a text option
        else:
            args[key] = _coerce(key, value, type(default))
    return args


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                # `env=x env.obs=y`: keep the shorthand as the section's own field.
                child = node[part] = {SHORTHANDS.get(part, part): child}
            node = child
        leaf = parts[-1]
        if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
            node[leaf][SHORTHANDS.get(leaf, leaf)] = value
        else:
            node[leaf] = value
    return nested


def build_config(
    overrides: list[str] | dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults <- ``base`` (e.g. a resumed run's config) <- presets <- overrides.

    ``overrides`` is a list of ``key=value`` strings or an already parsed flat dict. Without
    ``preset=`` (and without ``base``) the presets of the agent named on the command line
    apply, or the default agent's; then that agent's env settings (``AgentEntry.env_settings``)
    and the command line.
    """
    flat = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for key in CLI_KEYS:
        flat.pop(key, None)
    config = config_class()()
    if base:
        # A resumed run's config already holds its presets' values.
        _apply(config, upgrade_saved_config(base))
    presets = flat.pop("preset", None)
    named = _agent_override(flat)
    entry = _agent_entry(named) if named is not None else None
    if presets is None and not base:
        presets = list(entry.presets) if entry is not None and entry.presets else default_presets()
    if presets is not None:
        names = _coerce("preset", presets, list[str])
        for name in names:
            _apply(config, load_preset(name), prefix="")
        config.preset = names if not base else list(dict.fromkeys([*config.preset, *names]))
    if not base:
        entry = entry or _agent_entry(config.agent.name)
        if entry.env_settings is not None:
            # The settings may depend on the command line's choices (e.g. which world model),
            # so they see it applied, and the command line is applied again after them.
            _apply(config, _nest(flat))
            entry.env_settings(config)
    _apply(config, _nest(flat))
    return validate(config)


def _agent_override(flat: dict[str, Any]) -> str | None:
    """The agent name the command line asks for (``agent=x`` or ``agent.name=x``), if any."""
    name = flat.get("agent.name", flat.get("agent"))
    return name if isinstance(name, str) else None


def _agent_entry(name: str) -> registry.AgentEntry:
    try:
        return registry.agent_entry(name)
    except ValueError as error:
        raise ConfigError(f"agent={name}: {error}") from error


def save_yaml(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_yaml(path: str | Path) -> Config:
    """A config written by ``save_yaml`` (a run's ``config.yaml``, removed keys of an older
    version translated: ``upgrade_saved_config``), validated."""
    data = _read_yaml(Path(path), str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections")
    config = config_class()()
    _apply(config, upgrade_saved_config(data))
    return validate(config)


# --------------------------------------------------------------------------------------
# Help: the keys, their types, defaults and docs, read from the config classes themselves
# --------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """``{field: one-line doc}`` of a dataclass and its bases: ``metadata["doc"]`` where set,
    else the ``#`` comment lines right above the field (or after it on its line), as tyro
    reads them. Fields without either get the empty string."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue  # made at run time (config_class): its fields come from the bases
        lines = source.splitlines()
        tree = ast.parse(source)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node in body:
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            comment: list[str] = []
            row = node.lineno - 2  # 0-based index of the line above
            while row >= 0 and lines[row].strip().startswith("#"):
                comment.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            inline = lines[node.end_lineno - 1].split("#", 1)
            if not comment and len(inline) == 2 and '"' not in inline[1]:
                comment = [inline[1].strip()]
            docs[node.target.id] = " ".join(comment)
    for f in dataclasses.fields(cls):
        doc = f.metadata.get("doc")
        if doc:
            docs[f.name] = doc
        docs.setdefault(f.name, "")
    return docs


def _one_line(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    cut = text[:width].rsplit(" ", 1)[0]
    return cut + " ..."


def _default_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def describe(section: str | None = None) -> str:
    """The text of ``train.py --help`` (the sections) or ``--help <section>`` (its keys with
    type, default and doc; nested sections too). An unknown section raises ``ConfigError``."""
    config = config_class()()
    top = {f.name: f for f in dataclasses.fields(config)}
    sections = [n for n, f in top.items() if dataclasses.is_dataclass(getattr(config, n))]
    if section is None:
        rows = ["sections (`--help <section>` lists its keys):"]
        for name in sections:
            doc = (type(getattr(config, name)).__doc__ or "").strip().split("\n\n")[0]
            rows.append(f"  {name:<13} {_one_line(doc, 90)}")
        plain = [n for n in top if n not in sections]
        rows.append(f"top-level keys: {', '.join(plain)}")
        return "\n".join(rows)
    if section not in sections:
        close = difflib.get_close_matches(section, sections, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"--help {section}: no such section; {hint}sections: {', '.join(sections)}"
        )
    rows: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        docs = field_docs(type(node))
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            typed = _type_name(hints[f.name])
            minimum = f.metadata.get("min")
            if minimum is not None:
                typed += f" >= {minimum}"
            rows.append(f"  {prefix}{f.name} ({typed}) = {_default_text(value)}")
            if docs.get(f.name):
                rows.append(f"      {_one_line(docs[f.name])}")

    value = getattr(config, section)
    doc = (type(value).__doc__ or "").strip()
    summary = doc.split("\n\n")[0]  # the docstring's first paragraph
    rows.insert(0, f"{section}: {_one_line(summary, 200)}")
    walk(value, f"{section}.")
    return "\n".join(rows)
