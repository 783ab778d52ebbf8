"""The Dreamer agent's configuration and its registry entry (``agent=dreamer``).

Its keys: ``agent.*`` (actor, critic, returns, optimizers; ``DreamerAgentConfig``) and the
``world_model`` section (``WorldModelConfig``). ``agents.dreamer`` registers them with the
agent, its presets (``agents/presets``) and its checks, in one registry entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imagine_rl.runtime.config import ConfigError, at_least
from imagine_rl.worldmodels.actor_critic import ActorCriticSpec
from imagine_rl.worldmodels.cpc import CPCSpec
from imagine_rl.worldmodels.dreamer_wm import WorldModelSpec
from imagine_rl.worldmodels.factored import FactoredSettings, FactoredSpec
from imagine_rl.worldmodels.rssm import RSSMConfig, RSSMSettings

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class DreamerAgentConfig:
    """``agent.*`` keys of ``agent=dreamer``: the actor-critic learned in imagination
    (DreamerV3 defaults). Merged with the shared ``runtime.config.AgentConfig``."""

    # How the agent acts: actor_critic (learned in imagination) or planner (CEM on the world
    # model's predictions: predicted return for the RSSM, the goal's slots for slots); auto:
    # the agent's own (agent=dreamer: actor_critic, agent=op3: planner).
    behaviour: Literal["auto", "actor_critic", "planner"] = "auto"
    # Imagined rollout length from every replayed posterior state.
    horizon: int = field(default=15, metadata=at_least(1))
    # Imagined rollouts start from this many posterior states of the batch, drawn at random
    # (0 = all of them, as DreamerV3); fewer starts pay for a longer horizon at equal cost.
    imagine_starts: int = field(default=0, metadata=at_least(0))
    # DreamerV3's replay value loss: the critic also regresses lambda-returns of the replayed
    # sequence itself (real rewards, bootstrapped with the imagined returns), weight 0.3.
    replay_critic_scale: float = field(default=0.3, metadata=at_least(0))
    discount: float = 0.997
    return_lambda: float = 0.95
    # Actor and critic MLPs (see presets xs/s/m for the DreamerV3 size table).
    units: int = field(default=512, metadata=at_least(1))
    layers: int = field(default=2, metadata=at_least(1))
    actor_lr: float = field(default=3e-5, metadata=at_least(0))
    critic_lr: float = field(default=3e-5, metadata=at_least(0))
    actor_eps: float = field(default=1e-5, metadata=at_least(0))
    critic_eps: float = field(default=1e-5, metadata=at_least(0))
    # Global gradient-norm clipping per optimizer.
    actor_grad_clip: float = field(default=100.0, metadata=at_least(0))
    critic_grad_clip: float = field(default=100.0, metadata=at_least(0))
    actor_entropy: float = field(default=3e-4, metadata=at_least(0))
    # auto: REINFORCE for discrete actions, backprop through the dynamics for continuous ones.
    actor_grad: Literal["auto", "reinforce", "dynamics"] = "auto"
    actor_unimix: float = field(default=0.01, metadata=at_least(0))
    actor_min_std: float = field(default=0.1, metadata=at_least(0))
    actor_max_std: float = field(default=1.0, metadata=at_least(0))
    critic_bins: int = field(default=255, metadata=at_least(2))
    # Slow (EMA) critic: mixed in with this fraction every `slow_critic_every` updates; the
    # critic is regularised toward its predictions with weight `slow_critic_reg`.
    slow_critic_fraction: float = field(default=0.02, metadata=at_least(0))
    slow_critic_every: int = field(default=1, metadata=at_least(1))
    slow_critic_reg: float = field(default=1.0, metadata=at_least(0))
    # Returns are divided by max(limit, EMA(P_high) - EMA(P_low)) for the actor.
    return_norm_decay: float = field(default=0.99, metadata=at_least(0))
    return_norm_limit: float = field(default=1.0, metadata=at_least(0))
    return_norm_low: float = field(default=5.0, metadata=at_least(0))
    return_norm_high: float = field(default=95.0, metadata=at_least(0))
    actor_scale: float = field(default=1.0, metadata=at_least(0))
    critic_scale: float = field(default=1.0, metadata=at_least(0))
    # Weight of imagined step 0 in the actor and critic losses: the continue head's prediction
    # at the start state (current DreamerV3) instead of the replayed step's own flag (1 - its
    # is_terminal). The later steps' weights multiply on from it either way.
    imagine_start_continue: bool = False
    # Let the replay value loss (replay_critic_scale) backpropagate into the world model's
    # posterior states, as current DreamerV3's repval_grad does; its targets stay constants.
    # The world-model loss and the behaviour losses then make one gradient on the world model
    # before any step (the world model's step comes after the behaviour losses).
    replay_critic_grad_wm: bool = False
    # adam (one Adam per part, the DreamerV3 paper) or laprop (current DreamerV3: one optimizer
    # over world model, actor and critic). adam: each part has its own lr, eps and global-norm
    # clip, and the world model steps before the behaviour losses. laprop: one step on the sum
    # of all losses (runtime.optimizers.LaProp: per-tensor adaptive gradient clipping agc, RMS
    # scaling, momentum, warm-up); world_model.lr/eps/grad_clip and agent.actor_*/critic_*
    # lr, eps and grad_clip do not apply.
    optimizer: Literal["adam", "laprop"] = "adam"
    # laprop: the learning rate of every module (reached after `warmup` steps).
    lr: float = field(default=4e-5, metadata=at_least(0))
    # laprop: each gradient tensor is scaled down to at most agc x max(1e-3, |parameter|)
    # (Frobenius norms); 0 turns the clipping off.
    agc: float = field(default=0.3, metadata=at_least(0))
    # laprop: linear learning-rate warm-up from 0 over this many optimizer steps (0 = none).
    warmup: int = field(default=1000, metadata=at_least(0))
    # laprop: added to the RMS denominator, outside the square root.
    opt_eps: float = field(default=1e-20, metadata=at_least(0))
    # laprop: decay of the momentum of the RMS-scaled updates (below 1).
    beta1: float = field(default=0.9, metadata=at_least(0))
    # laprop: decay of the gradients' second moment, the RMS scale (below 1).
    beta2: float = field(default=0.999, metadata=at_least(0))


@dataclass
class PlannerConfig:
    """``planner.*``: CEM in the RSSM on predicted return (``world_model.kind=rssm
    agent.behaviour=planner``, PlaNet-like; the slot model plans with ``op3.*``)."""

    # Actions per candidate sequence, candidates per iteration, iterations, elites kept.
    horizon: int = field(default=12, metadata=at_least(1))
    population: int = field(default=128, metadata=at_least(2))
    iterations: int = field(default=4, metadata=at_least(1))
    elites: int = field(default=12, metadata=at_least(1))
    # Initial and minimum std of the sampling Gaussian (actions clipped to [-1, 1]).
    std: float = field(default=1.0, metadata=at_least(0))
    min_std: float = field(default=0.05, metadata=at_least(0))
    # Each step's CEM starts from the last step's plan shifted by one action (TD-MPC2).
    warm_start: bool = True
    # Exploration (explore=True): Gaussian noise of this std added to the planned action.
    explore_noise: float = field(default=0.3, metadata=at_least(0))


# The composition each agent name stands for (world_model.kind, agent.behaviour).
COMPOSITIONS = {"dreamer": ("rssm", "actor_critic"), "op3": ("slots", "planner")}


def composition(config) -> tuple[str, str]:
    """``(world_model.kind, agent.behaviour)`` with ``auto`` resolved by ``agent.name``."""
    kind, behaviour = COMPOSITIONS.get(config.agent.name, ("rssm", "actor_critic"))
    if config.world_model.kind != "auto":
        kind = config.world_model.kind
    if config.agent.behaviour != "auto":
        behaviour = config.agent.behaviour
    return kind, behaviour


@dataclass
class GreedyInfoMaxConfig:
    """Greedy InfoMax encoder (``world_model.greedy_infomax.*``; see ``worldmodels/cpc.py``)."""

    # Encoder modules, each trained by its own CPC loss and optimizer with no gradient across
    # module boundaries; 0 = off (the encoder learns end-to-end from the world-model losses).
    modules: int = field(default=0, metadata=at_least(0))
    # Learning rate of the module optimizers; null = world_model.lr.
    lr: float | None = field(default=None, metadata=at_least(0))


@dataclass
class WorldModelConfig(RSSMSettings):
    """The ``world_model`` section: the world model's architecture and losses. The RSSM keys
    (``deter``, ``hidden``, ``stoch``, ``classes``, ``latent``, ``unimix``, ``blocks``,
    ``prior_layers``, ``post_layers``, ``initial``) are ``worldmodels.rssm.RSSMSettings``'s."""

    # Which world model: rssm (DreamerV3's, factored with world_model.factored.*) or slots (the
    # object-centric model, op3.* keys); auto: the agent's own (dreamer: rssm, op3: slots).
    kind: Literal["auto", "rssm", "slots"] = "auto"
    # How the latent state learns about observations: reconstruction (decoder), reconstruction
    # plus the CPC loss as a regulariser, or cpc alone (no decoder is built).
    representation: Literal["reconstruction", "reconstruction+cpc", "cpc"] = "reconstruction"
    # CPC (InfoNCE): the posterior state at t, with the actions in between, picks the encoder
    # embedding at t+k (k = 1..cpc_horizons) among the batch's other positions; projections of
    # cpc_dim units compared by cosine similarity / cpc_temperature; weighted by cpc_scale.
    cpc_scale: float = field(default=1.0, metadata=at_least(0))
    cpc_horizons: int = field(default=3, metadata=at_least(1))
    cpc_dim: int = field(default=64, metadata=at_least(1))
    cpc_temperature: float = field(default=0.1, metadata=at_least(1e-6))
    cpc_actions: bool = True
    greedy_infomax: GreedyInfoMaxConfig = field(default_factory=GreedyInfoMaxConfig)
    factored: FactoredSettings = field(default_factory=FactoredSettings)
    # Encoder/decoder MLPs (vector obs), reward/continue heads, CNN depth multiplier.
    units: int = field(default=512, metadata=at_least(1))
    mlp_layers: int = field(default=2, metadata=at_least(1))
    head_layers: int = field(default=1, metadata=at_least(0))
    cnn_depth: int = field(default=32, metadata=at_least(1))
    # LayerNorm (DreamerV3 paper) has a fused CPU kernel; rms (current DreamerV3 code) is
    # composite in torch and ~25% slower at small sizes on CPU.
    norm: Literal["layer", "rms"] = "layer"
    act: Literal["silu", "elu", "relu", "gelu"] = "silu"
    reward_bins: int = field(default=255, metadata=at_least(2))
    # KL balancing: free bits (nats) and the loss scales the agent sums the terms with.
    free_nats: float = field(default=1.0, metadata=at_least(0))
    dyn_scale: float = field(default=0.5, metadata=at_least(0))
    rep_scale: float = field(default=0.1, metadata=at_least(0))
    rec_scale: float = field(default=1.0, metadata=at_least(0))
    reward_scale: float = field(default=1.0, metadata=at_least(0))
    continue_scale: float = field(default=1.0, metadata=at_least(0))
    lr: float = field(default=1e-4, metadata=at_least(0))
    eps: float = field(default=1e-8, metadata=at_least(0))
    grad_clip: float = field(default=1000.0, metadata=at_least(0))


# The layers kept dense when ``sparse.skip`` is null: the first layer of each encoder, the
# action input of the RSSM, and the output layers of the decoder and the reward/continue heads
# (LayerFactory names; module paths work too, see ``agents.sparsity.sparse_skip``).
SPARSE_SKIP_DEFAULT = (
    "wm.encoder.mlp.0",
    "wm.encoder.cnn.0",
    "wm.rssm.in.action",
    "wm.decoder.mlp.out",
    "wm.decoder.cnn.out",
    "wm.reward.out",
    "wm.continue.out",
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


def _check_optimizer(config) -> None:
    a = config.agent
    if config.agent.name != "dreamer":
        return
    for key in ("beta1", "beta2"):
        if getattr(a, key) >= 1:
            raise ConfigError(f"agent.{key} must be below 1, got {getattr(a, key)}")
    if a.optimizer == "laprop" and config.world_model.greedy_infomax.modules:
        raise ConfigError(
            "agent.optimizer=laprop cannot train world_model.greedy_infomax.modules>0: the "
            "encoder modules step their own optimizers inside the forward pass, outside the "
            "one optimizer over all modules; use agent.optimizer=adam"
        )


def validate(config) -> None:
    """The ``world_model`` section's rules (every config holds it), and what ``agent=dreamer``
    needs from the env: the checks a model build would otherwise fail on with a traceback."""
    w = config.world_model
    _check_factored(w)
    if not w.factored.groups and w.deter % w.blocks:
        raise ConfigError(
            f"world_model.deter ({w.deter}) must be divisible by world_model.blocks "
            f"({w.blocks}): the GRU is block-diagonal; pick blocks that divide deter"
        )
    if w.latent == "categorical" and w.classes < 2:
        raise ConfigError(
            f"world_model.classes: a categorical latent needs >= 2 classes, got {w.classes}"
        )
    kind, behaviour = composition(config)
    if kind == "rssm" and config.agent.name in COMPOSITIONS and config.env.obs != "state":
        from imagine_rl.worldmodels.networks import image_sizes

        sizes = image_sizes()
        if config.env.size not in sizes:
            raise ConfigError(
                f"env.size: the Dreamer's CNN takes square images of side 4 x a power of 2 "
                f"({', '.join(map(str, sizes))}), got {config.env.size}"
            )
    _check_optimizer(config)
    if config.planner.elites > config.planner.population:
        raise ConfigError(
            f"planner.elites ({config.planner.elites}) exceeds planner.population "
            f"({config.planner.population}); keep fewer elites than candidates"
        )
    slots_actor_critic = (kind, behaviour) == ("slots", "actor_critic")
    if (
        config.agent.name in COMPOSITIONS
        and slots_actor_critic
        and config.agent.optimizer != "adam"
    ):
        raise ConfigError(
            "world_model.kind=slots agent.behaviour=actor_critic trains with "
            "agent.optimizer=adam (the slot model has its own lr and warm-up)"
        )
    uses_cpc = "cpc" in w.representation or w.greedy_infomax.modules > 0
    if uses_cpc and w.cpc_horizons >= config.replay.batch_length:
        raise ConfigError(
            f"world_model.cpc_horizons ({w.cpc_horizons}) must be below replay.batch_length "
            f"({config.replay.batch_length}): CPC predicts that many steps ahead in a window"
        )


def world_model_spec(config, planned_updates: int = 1) -> WorldModelSpec:
    """The RSSM world model described by ``config.world_model`` (a factored graph's schedule
    spans the run's ``planned_updates``)."""
    w = config.world_model
    rssm = RSSMConfig(
        # The section's RSSM keys are RSSMSettings' fields; the spec adds the factored schedule.
        **{f.name: getattr(w, f.name) for f in dataclasses.fields(RSSMSettings)},
        factored=FactoredSpec(
            **dataclasses.asdict(w.factored),
            total_steps=planned_updates if w.factored.groups else 1,
            seed=config.seed,
        ),
    )
    return WorldModelSpec(
        rssm=rssm,
        units=w.units,
        mlp_layers=w.mlp_layers,
        head_layers=w.head_layers,
        cnn_depth=w.cnn_depth,
        reward_bins=w.reward_bins,
        free_nats=w.free_nats,
        norm=w.norm,
        act=w.act,
        representation=w.representation,
        cpc=CPCSpec(
            horizons=w.cpc_horizons,
            dim=w.cpc_dim,
            temperature=w.cpc_temperature,
            actions=w.cpc_actions,
        ),
        greedy_modules=w.greedy_infomax.modules,
    )


def actor_critic_spec(config, discrete: bool) -> ActorCriticSpec:
    """The actor-critic described by ``config.agent`` (its keys of ``ActorCriticSpec``'s
    names); ``actor_grad=auto``: REINFORCE for discrete actions, dynamics backprop else."""
    a = config.agent
    fields = {
        f.name: getattr(a, f.name)
        for f in dataclasses.fields(ActorCriticSpec)
        if hasattr(a, f.name)
    }
    if a.actor_grad == "auto":
        fields["actor_grad"] = "reinforce" if discrete else "dynamics"
    fields["replay_critic_grad"] = a.replay_critic_grad_wm
    return ActorCriticSpec(**fields)


def loss_scales(config) -> dict[str, float]:
    """The weight of each world-model loss term in the world model's total."""
    w = config.world_model
    return {
        "loss/reconstruction": w.rec_scale,
        "loss/reward": w.reward_scale,
        "loss/continue": w.continue_scale,
        "loss/dynamics": w.dyn_scale,
        "loss/representation": w.rep_scale,
        "loss/cpc": w.cpc_scale,
        "loss/graph": 1.0,  # factored l1 graph: already scaled by factored.l1_scale
    }
