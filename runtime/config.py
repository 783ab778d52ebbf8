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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


# Applied when the command line names no preset (see ``Config``).
DEFAULT_PRESETS = ("dreamer_tiny", "quickstart")


class ConfigError(ValueError):
    """A configuration key, type or value is invalid. The message says which and why."""


def _positive(min_value: float = 1) -> dict[str, Any]:
    return {"min": min_value}


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class EnvConfig:
    """Which task the agent faces and how it is observed (see ``envs.make_env``)."""

    id: str = "dmc:cartpole-balance"
    obs: Literal["state", "pixels", "both"] = "state"
    size: int = field(default=64, metadata=_positive(8))
    # Env steps (frames) per agent step; rewards are summed over the repeat.
    action_repeat: int = field(default=2, metadata=_positive(1))
    # Episode length limit in env steps (frames); None keeps the task's own limit.
    time_limit: int | None = field(default=None, metadata=_positive(1))
    num_envs: int = field(default=1, metadata=_positive(1))
    eval_num_envs: int = field(default=1, metadata=_positive(1))
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
    # Change one mechanism of a MuJoCo task at a chosen env step of each training env, e.g.
    # "body_mass:pole_1*2@step=20000" or "gravity:z=-5@step=0;actuator_gear:slide*0.5@step=10"
    # (grammar in envs/interventions.py; eval envs keep the original task).
    intervention: str | None = None


@dataclass
class AgentConfig:
    """Which agent acts and learns. Agent-specific knobs live here too."""

    name: str = "dreamer"
    # --- dreamer (agent=dreamer): actor-critic learned in imagination (DreamerV3 defaults).
    # Imagined rollout length from every replayed posterior state.
    horizon: int = field(default=15, metadata=_positive(1))
    # Imagined rollouts start from this many posterior states of the batch, drawn at random
    # (0 = all of them, as DreamerV3); fewer starts pay for a longer horizon at equal cost.
    imagine_starts: int = field(default=0, metadata=_positive(0))
    # DreamerV3's replay value loss: the critic also regresses lambda-returns of the replayed
    # sequence itself (real rewards, bootstrapped with the imagined returns), weight 0.3.
    replay_critic_scale: float = field(default=0.3, metadata=_positive(0))
    discount: float = 0.997
    return_lambda: float = 0.95
    # Actor and critic MLPs (see presets xs/s/m for the DreamerV3 size table).
    units: int = field(default=512, metadata=_positive(1))
    layers: int = field(default=2, metadata=_positive(1))
    actor_lr: float = field(default=3e-5, metadata=_positive(0))
    critic_lr: float = field(default=3e-5, metadata=_positive(0))
    actor_eps: float = field(default=1e-5, metadata=_positive(0))
    critic_eps: float = field(default=1e-5, metadata=_positive(0))
    # Global gradient-norm clipping per optimizer.
    actor_grad_clip: float = field(default=100.0, metadata=_positive(0))
    critic_grad_clip: float = field(default=100.0, metadata=_positive(0))
    actor_entropy: float = field(default=3e-4, metadata=_positive(0))
    # auto: REINFORCE for discrete actions, backprop through the dynamics for continuous ones.
    actor_grad: Literal["auto", "reinforce", "dynamics"] = "auto"
    actor_unimix: float = field(default=0.01, metadata=_positive(0))
    actor_min_std: float = field(default=0.1, metadata=_positive(0))
    actor_max_std: float = field(default=1.0, metadata=_positive(0))
    critic_bins: int = field(default=255, metadata=_positive(2))
    # Slow (EMA) critic: mixed in with this fraction every `slow_critic_every` updates; the
    # critic is regularised toward its predictions with weight `slow_critic_reg`.
    slow_critic_fraction: float = field(default=0.02, metadata=_positive(0))
    slow_critic_every: int = field(default=1, metadata=_positive(1))
    slow_critic_reg: float = field(default=1.0, metadata=_positive(0))
    # Returns are divided by max(limit, EMA(P_high) - EMA(P_low)) for the actor.
    return_norm_decay: float = field(default=0.99, metadata=_positive(0))
    return_norm_limit: float = field(default=1.0, metadata=_positive(0))
    return_norm_low: float = field(default=5.0, metadata=_positive(0))
    return_norm_high: float = field(default=95.0, metadata=_positive(0))
    actor_scale: float = field(default=1.0, metadata=_positive(0))
    critic_scale: float = field(default=1.0, metadata=_positive(0))
    # torch.compile the whole update (world-model step and behaviour step, each one graph
    # with its backward; CUDA graphs on cuda): true, false, or auto (see
    # runtime.accelerator.resolve_compile).
    compile: bool | Literal["auto"] = "auto"
    # bf16 autocast for the forward passes (losses and optimizer states stay fp32).
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class GreedyInfoMaxConfig:
    """Greedy InfoMax encoder (``world_model.greedy_infomax.*``; see ``worldmodels/cpc.py``)."""

    # Encoder modules, each trained by its own CPC loss and optimizer with no gradient across
    # module boundaries; 0 = off (the encoder learns end-to-end from the world-model losses).
    modules: int = field(default=0, metadata=_positive(0))
    # Learning rate of the module optimizers; null = world_model.lr.
    lr: float | None = field(default=None, metadata=_positive(0))


@dataclass
class FactoredConfig:
    """Factored (sparse factor-graph) RSSM dynamics (``world_model.factored.*``; see
    ``worldmodels/factored.py``). ``groups=0`` keeps the plain RSSM."""

    # G groups of the latent state (deter, hidden and stoch must divide by G); 0 = off.
    groups: int = field(default=0, metadata=_positive(0))
    # fixed: random graph of in_degree parents a group (itself included); dynamic: rewired
    # RigL-style on the G x G block grid; l1: all edges, gated, with an L1 penalty on the gates.
    graph: Literal["fixed", "dynamic", "l1"] = "fixed"
    in_degree: int = field(default=2, metadata=_positive(1))
    # l1 graph: loss/graph = l1_scale * sum of |gate| over the G (G - 1) non-self edges.
    l1_scale: float = field(default=0.01, metadata=_positive(0))
    # dynamic graph: world-model updates between rewirings, fraction of each group's non-self
    # edges replaced (cosine-decayed), no rewiring after stop_fraction of the run's updates.
    update_every: int = field(default=100, metadata=_positive(1))
    drop_fraction: float = field(default=0.3, metadata=_positive(0))
    stop_fraction: float = field(default=0.75, metadata=_positive(0))


@dataclass
class WorldModelConfig:
    """World-model architecture knobs (used by model-based agents)."""

    # How the latent state learns about observations: reconstruction (decoder), reconstruction
    # plus the CPC loss as a regulariser, or cpc alone (no decoder is built).
    representation: Literal["reconstruction", "reconstruction+cpc", "cpc"] = "reconstruction"
    # CPC (InfoNCE): the posterior state at t, with the actions in between, picks the encoder
    # embedding at t+k (k = 1..cpc_horizons) among the batch's other positions; projections of
    # cpc_dim units compared by cosine similarity / cpc_temperature; weighted by cpc_scale.
    cpc_scale: float = field(default=1.0, metadata=_positive(0))
    cpc_horizons: int = field(default=3, metadata=_positive(1))
    cpc_dim: int = field(default=64, metadata=_positive(1))
    cpc_temperature: float = field(default=0.1, metadata=_positive(1e-6))
    cpc_actions: bool = True
    greedy_infomax: GreedyInfoMaxConfig = field(default_factory=GreedyInfoMaxConfig)
    factored: FactoredConfig = field(default_factory=FactoredConfig)
    # RSSM: GRU state size, hidden width, latent (stoch groups x classes, or stoch dims for
    # the Gaussian latent), block-diagonal GRU blocks, initial state.
    deter: int = field(default=512, metadata=_positive(1))
    hidden: int = field(default=512, metadata=_positive(1))
    stoch: int = field(default=32, metadata=_positive(1))
    classes: int = field(default=32, metadata=_positive(1))
    latent: Literal["categorical", "gaussian"] = "categorical"
    unimix: float = field(default=0.01, metadata=_positive(0))
    blocks: int = field(default=8, metadata=_positive(1))
    prior_layers: int = field(default=2, metadata=_positive(1))
    post_layers: int = field(default=1, metadata=_positive(1))
    initial: Literal["learned", "zero"] = "learned"
    # Encoder/decoder MLPs (vector obs), reward/continue heads, CNN depth multiplier.
    units: int = field(default=512, metadata=_positive(1))
    mlp_layers: int = field(default=2, metadata=_positive(1))
    head_layers: int = field(default=1, metadata=_positive(0))
    cnn_depth: int = field(default=32, metadata=_positive(1))
    # LayerNorm (DreamerV3 paper) has a fused CPU kernel; rms (current DreamerV3 code) is
    # composite in torch and ~25% slower at small sizes on CPU.
    norm: Literal["layer", "rms"] = "layer"
    act: Literal["silu", "elu", "relu", "gelu"] = "silu"
    reward_bins: int = field(default=255, metadata=_positive(2))
    # KL balancing: free bits (nats) and the loss scales the agent sums the terms with.
    free_nats: float = field(default=1.0, metadata=_positive(0))
    dyn_scale: float = field(default=0.5, metadata=_positive(0))
    rep_scale: float = field(default=0.1, metadata=_positive(0))
    rec_scale: float = field(default=1.0, metadata=_positive(0))
    reward_scale: float = field(default=1.0, metadata=_positive(0))
    continue_scale: float = field(default=1.0, metadata=_positive(0))
    lr: float = field(default=1e-4, metadata=_positive(0))
    eps: float = field(default=1e-8, metadata=_positive(0))
    grad_clip: float = field(default=1000.0, metadata=_positive(0))


@dataclass
class OP3Config:
    """The object-centric agent (``agent=op3``; ``agents/op3.py``, ``worldmodels/slots.py``):
    a slot world model trained on replayed sequences and model-predictive control by the
    cross-entropy method (CEM) toward the goal image's slots."""

    # Slot world model: K slots of slot_dim features (plus a 4-d position/scale frame each),
    # slot-attention iterations per frame, how first frames start (farthest: at the K most
    # distinct colours; learned: K learned vectors; gaussian: random draws), CNN/decoder
    # widths, MLP width.
    slots: int = field(default=5, metadata=_positive(1))
    slot_dim: int = field(default=64, metadata=_positive(1))
    iterations: int = field(default=3, metadata=_positive(1))
    slot_init: Literal["farthest", "learned", "gaussian"] = "farthest"
    cnn_depth: int = field(default=32, metadata=_positive(1))
    decoder_depth: int = field(default=32, metadata=_positive(8))
    hidden: int = field(default=128, metadata=_positive(1))
    # Side of the frames the model sees and reconstructs (area-downsampled; segment() upsamples
    # the masks back); 0 = env.size. It must divide env.size and be 8 x a power of 2.
    resolution: int = field(default=32, metadata=_positive(0))
    # A learned static background layer behind the slots (fixed cameras); off: the slots also
    # draw the table and walls.
    background: bool = False
    # Sparse interaction graph: each slot hears only its interaction_topk strongest partners
    # (0 = all K - 1 others).
    interaction_topk: int = field(default=0, metadata=_positive(0))
    # Loss weights: posterior reconstruction, decoded dynamics prediction, slot prediction.
    reconstruction_scale: float = field(default=1.0, metadata=_positive(0))
    prediction_scale: float = field(default=1.0, metadata=_positive(0))
    dynamics_scale: float = field(default=1.0, metadata=_positive(0))
    # Weight of the predicted slot centres in loss/dynamics (features are unit-RMS; centres
    # are in image units and would otherwise barely count; the planner's cost rests on them).
    position_loss_scale: float = field(default=25.0, metadata=_positive(0))
    # Per-frame slot inference. fresh: every frame from its own colour-seeded start, the
    # dynamics trained toward the next frame's slots after a Hungarian matching. filter: OP3's
    # filtering, each frame refined from the dynamics' prediction (measured on blocks: the
    # slots settle into fixed regions that the refinement never moves, and the dynamics learns
    # to ignore the action; see README).
    inference: Literal["fresh", "filter"] = "fresh"
    # Whether loss/dynamics also trains the perception (through the previous slots it predicts
    # from). Off: only the reconstruction shapes the slots (joint training degraded a
    # pretrained segmentation; see README).
    dynamics_trains_perception: bool = False
    # Train only the dynamics: the perception (encoder, slot attention, decoder, background)
    # is frozen, e.g. after `train.py init=<run>` from a perception pretrained by
    # `op3_checks.py check=ari save=<run>` (the two-stage recipe in the README).
    freeze_perception: bool = False
    lr: float = field(default=1e-3, metadata=_positive(0))
    # Linear learning-rate warm-up over this many updates (slot attention needs it).
    warmup: int = field(default=100, metadata=_positive(0))
    grad_clip: float = field(default=1.0, metadata=_positive(0))
    # CEM planning: horizon (actions per candidate), candidates per iteration, iterations,
    # elites kept, initial std of the sampling Gaussian (mean 0, clipped to [-1, 1]).
    horizon: int = field(default=1, metadata=_positive(1))
    cem_population: int = field(default=64, metadata=_positive(2))
    cem_iterations: int = field(default=3, metadata=_positive(1))
    cem_elites: int = field(default=8, metadata=_positive(1))
    cem_std: float = field(default=1.0, metadata=_positive(0))
    # Planning cost between two slots: |features| / sqrt(slot_dim) + position_weight x
    # |position| (positions in image units), summed over the Hungarian-matched pairs.
    position_weight: float = field(default=5.0, metadata=_positive(0))
    # Exploration (explore=True, after the first update; before it every action is random):
    # a uniformly random action with probability epsilon, else the plan plus Gaussian noise.
    epsilon: float = field(default=0.2, metadata=_positive(0))
    explore_noise: float = field(default=0.1, metadata=_positive(0))


@dataclass
class ReplayConfig:
    """Sequence replay: capacity in steps, sampled windows of ``batch_size x batch_length``."""

    capacity: int = field(default=1_000_000, metadata=_positive(1))
    batch_size: int = field(default=16, metadata=_positive(1))
    batch_length: int = field(default=64, metadata=_positive(1))
    # Steps per stored chunk (per env stream); full chunks are written to disk once.
    chunk_size: int = field(default=1024, metadata=_positive(1))
    # Keep the replay on disk with the checkpoints so a resume restores it exactly.
    save: bool = True

    @property
    def steps_per_batch(self) -> int:
        return self.batch_size * self.batch_length


@dataclass
class SparseConfig:
    """Dynamic-sparse layers (see ``sparse`` and README "Dynamic-sparse layers"). Off by default.

    Fields mirror ``sparse.SparseConfig`` (same names, same defaults except ``skip``). Not set
    here: ``total_steps`` (the agent derives it from the run: the world-model updates the run
    will do), ``seed`` (the top-level ``seed``) and ``fast_path_batch`` (the agent uses
    ``replay.batch_size * replay.batch_length``). ``enabled=true`` sparsifies the world model
    of ``agent=dreamer``; actor and critic stay dense.
    """

    enabled: bool = False
    # Fraction of weights kept over all sparsified layers together, in (0, 1].
    density: float = 0.1
    # static: fixed random mask; set: drop smallest |w|, regrow at random; rigl: drop smallest
    # |w|, regrow where the dense gradient is largest.
    method: Literal["static", "set", "rigl"] = "rigl"
    # How the budget is split over layers: every layer at `density`, or Erdos-Renyi-Kernel.
    distribution: Literal["uniform", "erk"] = "erk"
    # Masks of whole block x block tiles: 1, 4, 8 or 16 (checked by the sparse library; every
    # sparsified layer's in/out dims must divide, else the error names the layer).
    block: int = 1
    # Same number of blocks in every block-row (needed for the compressed fast path).
    balanced: bool = False
    drop_fraction: float = field(default=0.3, metadata=_positive(0))
    drop_schedule: Literal["cosine", "constant"] = "cosine"
    # World-model optimizer steps between topology updates.
    update_every: int = field(default=100, metadata=_positive(1))
    # No topology updates after this fraction of the run's world-model updates.
    stop_fraction: float = field(default=0.75, metadata=_positive(0))
    # Layers kept dense. Patterns (fnmatch, or a full-match regex) are tried against the
    # LayerFactory name (`wm.encoder.mlp.0`) and the module path in the world model
    # (`encoder.mlp.0.0`, `encoder.mlp.0.0.weight`); `wm.decoder.cnn.out` names the pixel
    # decoder's last transposed conv. Default: the first layer of each encoder, the action
    # input of the RSSM, and the output layers of the decoder and the reward/continue heads.
    # `sparse.skip=[]` sparsifies every linear/conv layer.
    skip: list[str] = field(
        default_factory=lambda: [
            "wm.encoder.mlp.0",
            "wm.encoder.cnn.0",
            "wm.rssm.in.action",
            "wm.decoder.mlp.out",
            "wm.decoder.cnn.out",
            "wm.reward.out",
            "wm.continue.out",
        ]
    )
    # Extra >=2-D parameters to sparsify by module-path pattern (e.g. the RSSM's block-diagonal
    # GRU weights `rssm.gru_*.weight`, which are not nn.Linear and stay dense otherwise).
    include: list[str] = field(default_factory=list)
    # auto: a balanced nn.Linear uses the compressed kernel when a micro-benchmark (at
    # replay.batch_size * replay.batch_length rows) says it is faster; on: always where
    # possible; off: never. YAML reads a bare on/off as true/false: those mean on/off too.
    fast_path: Literal["auto", "on", "off", True, False] = "auto"

    def library_config(
        self, *, total_steps: int, seed: int, fast_path_batch: int, skip: list[str] | None = None
    ) -> Any:
        """The ``sparse.SparseConfig`` for these settings, validated by the sparse library
        (a bad value raises ``ConfigError`` naming the ``sparse.<key>``)."""
        import sparse

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.fast_path is True or self.fast_path is False:
            values["fast_path"] = "on" if self.fast_path else "off"
        if skip is not None:
            values["skip"] = list(skip)
        try:
            return sparse.SparseConfig.from_dict(
                values, total_steps=total_steps, seed=seed, fast_path_batch=fast_path_batch
            )
        except ValueError as error:
            raise ConfigError(str(error)) from error


@dataclass
class AcceleratorConfig:
    """Where training runs (``runtime.accelerator``): ``auto`` picks cuda when present, else cpu;
    ``ipu-sim`` runs on the host and enforces/estimates a Graphcore IPU (settings: ``ipu.*``)."""

    name: Literal["auto", "cpu", "cuda", "ipu-sim"] = "auto"
    # Torch intra-op threads; 0 = leave torch's default. 1 is best beside env workers.
    threads: int = field(default=1, metadata=_positive(0))
    deterministic: bool = False
    # fp32, bf16 autocast, or fp16 autocast with a gradient scaler. auto: agent.precision
    # (fp32 unless set); with ipu-sim the precision is ipu.precision.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # cuda only: TF32 tensor-core matmuls for fp32 work (off when deterministic=true).
    tf32: bool = True


@dataclass
class IPUConfig:
    """The simulated IPU (``accelerator=ipu-sim``; see ``runtime/ipu_sim``). Results are computed
    on the host; IPU limits are enforced and IPU speed is estimated, never measured."""

    # Device constants (each tagged sourced/derived/assumed in runtime/ipu_sim/presets.py):
    # ipu2 (GC200), bow (Bow IPU), ipu1 (GC2), small (4 tiles, for tests).
    preset: Literal["ipu2", "bow", "ipu1", "small"] = "ipu2"
    num_ipus: int = field(default=1, metadata=_positive(1))
    # fp16: emulated fp16 storage (weights rounded to fp16 after every step) and fp16 autocast
    # with loss scaling. The IPU has no bf16.
    precision: Literal["fp32", "fp16"] = "fp32"
    # fp16 only: weights are rounded fp32 -> fp16 stochastically (seeded by `seed`), as the
    # IPU's hardware stochastic rounding does; false rounds to nearest.
    stochastic_rounding: bool = True
    # Micro-batches per step for the pipeline estimate; must be >= the pipeline stages.
    # 0 = the number of stages.
    gradient_accumulation: int = field(default=0, metadata=_positive(0))
    # Pipeline placement, `<module prefix>:<ipu>` in execution order with non-decreasing ipu
    # ids, e.g. [world_model.encoder:0, world_model.rssm:1, actor:1, critic:1]. Empty: one
    # IPU holds everything, or with num_ipus > 1 contiguous groups of modules balanced by size.
    placement: list[str] = field(default_factory=list)


@dataclass
class DistributedConfig:
    """Data-parallel training under ``torchrun`` (``runtime.distributed``). A plain
    ``python scripts/train.py`` run (no ``WORLD_SIZE`` > 1 in the environment) ignores it."""

    # auto: nccl when the accelerator is cuda, else gloo. gloo also moves cuda tensors (through
    # the host), which lets several ranks share one GPU.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Seconds a collective waits for the other ranks before failing (a hung or lost rank).
    # The other ranks wait while rank 0 evaluates, so keep it above one evaluation's duration.
    timeout: float = field(default=1800.0, metadata=_positive(1))


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
    video_fps: int = field(default=20, metadata=_positive(1))


@dataclass
class RunConfig:
    """The training schedule. Step counts are env steps (frames, action repeat included)."""

    dir: str = "runs/default"
    steps: int = field(default=20_000, metadata=_positive(1))
    # Replayed steps (batch_size x batch_length per update) per agent (policy) step.
    replay_ratio: float = field(default=512.0, metadata=_positive(0))
    # Env steps collected before the first update.
    learning_starts: int = field(default=1000, metadata=_positive(0))
    eval_every: int = field(default=5000, metadata=_positive(1))
    eval_episodes: int = field(default=5, metadata=_positive(0))
    eval_initial: bool = False
    video: bool = True
    checkpoint_every: int = field(default=5000, metadata=_positive(1))
    keep_checkpoints: int = field(default=3, metadata=_positive(1))
    log_every: int = field(default=1000, metadata=_positive(1))


@dataclass
class Config:
    """The whole run. ``seed`` seeds envs, torch and numpy; ``preset`` records the presets used.

    Without ``preset=`` on the command line the default presets apply (``DEFAULT_PRESETS``: a
    small Dreamer and a short Pendulum run, the main job that fits a CPU in minutes); naming
    any preset replaces them, leaving the dataclass defaults (DreamerV3's settings) below.
    """

    seed: int = 0
    preset: list[str] = field(default_factory=lambda: list(DEFAULT_PRESETS))
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)
    op3: OP3Config = field(default_factory=OP3Config)
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


# `section=value` sets this field of the section.
SHORTHANDS: dict[str, str] = {"env": "id", "agent": "name", "accelerator": "name"}
# Top-level keys handled by the CLI rather than stored in Config.
CLI_KEYS = ("resume",)


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
        return " or ".join(_type_name(a) for a in args) + " or null"
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
            raise _unknown_key(prefix, name, list(fields))
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
    """Precision settings that contradict each other, and what the simulated IPU cannot do."""
    acc, agent = config.accelerator, config.agent
    if acc.name == "ipu-sim":
        ipu = config.ipu.precision
        if agent.precision != "fp32":
            raise ConfigError(
                f"agent.precision={agent.precision}: the IPU has no bf16; with "
                f"accelerator=ipu-sim set ipu.precision=fp16 (or fp32) instead"
            )
        if acc.precision not in ("auto", ipu):
            raise ConfigError(
                f"accelerator.precision={acc.precision} conflicts with ipu.precision={ipu}: the "
                f"simulated IPU takes its precision from ipu.precision (fp32 or fp16)"
            )
        if agent.compile is True:
            raise ConfigError(
                "agent.compile=true with accelerator=ipu-sim: the simulated IPU runs eager on the "
                "host (its op trace is the cost model); set agent.compile=false"
            )
    elif acc.precision not in ("auto", agent.precision) and agent.precision != "fp32":
        raise ConfigError(
            f"accelerator.precision={acc.precision} conflicts with agent.precision="
            f"{agent.precision}; set one of them (accelerator.precision wins over the default)"
        )


def _check_factored(w: WorldModelConfig) -> None:
    groups = w.factored.groups
    if not groups:
        return
    for key in ("deter", "hidden", "stoch"):
        if getattr(w, key) % groups:
            raise ConfigError(
                f"world_model.{key} ({getattr(w, key)}) must be divisible by "
                f"world_model.factored.groups ({groups}); pick groups that divide it"
            )
    if w.factored.in_degree > groups:
        raise ConfigError(
            f"world_model.factored.in_degree ({w.factored.in_degree}) exceeds "
            f"world_model.factored.groups ({groups}): a group has at most {groups} parents"
        )
    if w.factored.drop_fraction > 1 or w.factored.stop_fraction > 1:
        raise ConfigError("world_model.factored.drop_fraction and stop_fraction must be <= 1")


def _check_op3(config: Config) -> None:
    o = config.op3
    if o.cem_elites > o.cem_population:
        raise ConfigError(
            f"op3.cem_elites ({o.cem_elites}) exceeds op3.cem_population ({o.cem_population}); "
            "keep fewer elites than candidates"
        )
    if o.interaction_topk > o.slots - 1:
        raise ConfigError(
            f"op3.interaction_topk ({o.interaction_topk}) must be at most op3.slots - 1 "
            f"({o.slots - 1}), or 0 for all partners"
        )
    if o.epsilon > 1:
        raise ConfigError(f"op3.epsilon is a probability, got {o.epsilon}")
    if config.agent.name != "op3":
        return
    if config.sparse.enabled:
        raise ConfigError(
            "sparse.enabled=true sparsifies the Dreamer world model only; agent=op3 has no "
            "sparse layers yet (its sparse interaction graph is op3.interaction_topk)"
        )
    if config.env.obs == "state":
        raise ConfigError(
            "agent=op3 plans from pixels: set env.obs=pixels (or both); "
            "`agent=op3` without presets picks preset op3, which does"
        )
    if not config.env.goal_obs:
        raise ConfigError(
            "agent=op3 plans toward the goal image: set env.goal_obs=true (a blocks: task); "
            "`agent=op3` without presets picks preset op3, which does"
        )
    side = o.resolution or config.env.size
    if config.env.size % side or side < 8 or (side // 8) & (side // 8 - 1) or side % 8:
        raise ConfigError(
            f"op3.resolution ({o.resolution}) must divide env.size ({config.env.size}) and be "
            "8 times a power of 2 (8, 16, 32, 64, ...); 0 uses env.size"
        )


def validate(config: Config) -> Config:
    """Range checks and cross-field rules. Returns the config for chaining."""
    _check_ranges(config)
    _check_accelerator(config)
    if config.replay.batch_length > config.replay.capacity:
        raise ConfigError(
            f"replay.batch_length ({config.replay.batch_length}) exceeds replay.capacity "
            f"({config.replay.capacity}); raise the capacity or shorten the windows"
        )
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
    _check_op3(config)
    w = config.world_model
    _check_factored(w)
    if config.env.intervention is not None:
        from envs.interventions import parse_interventions

        try:
            parse_interventions(config.env.intervention)
        except ValueError as error:
            raise ConfigError(f"env.intervention: {error}") from error
    uses_cpc = "cpc" in w.representation or w.greedy_infomax.modules > 0
    if uses_cpc and w.cpc_horizons >= config.replay.batch_length:
        raise ConfigError(
            f"world_model.cpc_horizons ({w.cpc_horizons}) must be below replay.batch_length "
            f"({config.replay.batch_length}): CPC predicts that many steps ahead in a window"
        )
    return config


# --------------------------------------------------------------------------------------
# Presets and overrides
# --------------------------------------------------------------------------------------


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The nested dict of one named preset (or a path to a YAML file)."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") or not path.exists():
        path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        names = available_presets()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown preset '{name}': {hint}available: {', '.join(names)}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset '{name}' ({path}) must be a mapping of sections")
    return data


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
        # YAML reads 'dmc:walker-walk' fine but would turn e.g. '1:30' into an int (sexagesimal
        # in YAML 1.1); keep the literal text when the parsed value is not a plain scalar match.
        if isinstance(value, int | float) and not isinstance(value, bool) and ":" in raw:
            value = raw
        overrides[key] = value
    return overrides


def parse_script_args(
    argv: list[str], defaults: dict[str, Any], aliases: dict[str, str] | None = None
) -> dict[str, Any]:
    """``key=value`` arguments of a benchmark/research script, typed like ``defaults``.

    The same grammar as ``train.py`` (``parse_overrides``); each value is coerced to the type
    of its default (a list default takes ``a,b`` or ``[a, b]`` or one scalar; a ``None``
    default keeps the parsed value). Unknown keys raise ``ConfigError`` with a close match.
    """
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

    ``overrides`` is a list of ``key=value`` strings or an already parsed flat dict.
    """
    flat = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for key in CLI_KEYS:
        flat.pop(key, None)
    config = Config()
    if base:
        _apply(config, base)  # a resumed run's config already holds its presets' values
    presets = flat.pop("preset", None)
    agent = _agent_override(flat)
    if presets is None and not base:
        presets = list(AGENT_DEFAULT_PRESETS.get(agent or "", DEFAULT_PRESETS))
    if presets is not None:
        names = _coerce("preset", presets, list[str])
        for name in names:
            _apply(config, load_preset(name), prefix="")
        config.preset = names if not base else list(dict.fromkeys([*config.preset, *names]))
    if not base:
        _agent_env_settings(config, agent or config.agent.name)
    _apply(config, _nest(flat))
    return validate(config)


# Presets applied instead of DEFAULT_PRESETS when the command line names an agent but no preset.
AGENT_DEFAULT_PRESETS: dict[str, tuple[str, ...]] = {"op3": ("op3",)}


def _agent_override(flat: dict[str, Any]) -> str | None:
    """The agent name the command line asks for (``agent=x`` or ``agent.name=x``), if any."""
    name = flat.get("agent.name", flat.get("agent"))
    return name if isinstance(name, str) else None


def _agent_env_settings(config: Config, agent: str) -> None:
    """Env settings an agent cannot work without, applied after the presets and before the
    command line (which still wins; ``validate`` then names what is missing). ``agent=op3``:
    pixel observations, the goal image, and no action repeat (a pick-and-place action
    repeated would only redo the same move)."""
    if agent == "op3":
        if config.env.obs == "state":
            config.env.obs = "pixels"
        config.env.goal_obs = True
        config.env.action_repeat = 1


def save_yaml(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_yaml(path: str | Path) -> Config:
    """A config written by ``save_yaml`` (a run's ``config.yaml``), validated."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections")
    config = Config()
    _apply(config, data)
    return validate(config)
