"""The object-centric agent's configuration and its registry entry (``agent=op3``).

Its keys: the ``op3`` section (``OP3Config``: the slot world model's architecture, which is
``worldmodels.slots.SlotSpec``, plus losses, optimizer and planner). ``agents.op3`` registers it
with the agent, its presets, the env settings it needs and its checks, in one registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imagine_rl.agents.dreamer_config import COMPOSITIONS, composition
from imagine_rl.runtime.config import ConfigError, at_least
from imagine_rl.worldmodels.slots import SlotSpec

NAME = "op3"
PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class OP3Config(SlotSpec):
    """The object-centric agent (``agent=op3``; ``agents/op3.py``, ``worldmodels/slots.py``):
    a slot world model trained on replayed sequences and model-predictive control by the
    cross-entropy method (CEM) toward the goal image's slots. The architecture keys are
    ``SlotSpec``'s (``op3.slots``, ``op3.resolution``, ...)."""

    # Loss weights: posterior reconstruction, decoded dynamics prediction, slot prediction.
    reconstruction_scale: float = field(default=1.0, metadata=at_least(0))
    prediction_scale: float = field(default=1.0, metadata=at_least(0))
    dynamics_scale: float = field(default=1.0, metadata=at_least(0))
    # Weight of loss/cpc (op3.representation=reconstruction+cpc or cpc; see SlotSpec).
    cpc_scale: float = field(default=1.0, metadata=at_least(0))
    # Weight of loss/reward (op3.heads=true; see SlotSpec).
    reward_scale: float = field(default=1.0, metadata=at_least(0))
    # Weight of loss/continue (op3.heads=true; see SlotSpec).
    continue_scale: float = field(default=1.0, metadata=at_least(0))
    # Train only the dynamics: the perception (encoder, slot attention, decoder, background)
    # is frozen, e.g. after `train.py init=<run>` from a perception pretrained by
    # `scripts/dev/op3_checks.py check=ari save=<run>` (the two-stage recipe in the README).
    freeze_perception: bool = False
    lr: float = field(default=1e-3, metadata=at_least(0))
    # Linear learning-rate warm-up over this many updates (slot attention needs it).
    warmup: int = field(default=100, metadata=at_least(0))
    grad_clip: float = field(default=1.0, metadata=at_least(0))
    # CEM planning: horizon (actions per candidate), candidates per iteration, iterations,
    # elites kept, initial std of the sampling Gaussian (mean 0, clipped to [-1, 1]).
    horizon: int = field(default=1, metadata=at_least(1))
    cem_population: int = field(default=64, metadata=at_least(2))
    cem_iterations: int = field(default=3, metadata=at_least(1))
    cem_elites: int = field(default=8, metadata=at_least(1))
    cem_std: float = field(default=1.0, metadata=at_least(0))
    # Warm start (TD-MPC2): each step's CEM starts from the last step's plan shifted by one
    # action (horizon > 1; a one-step plan has nothing left to shift and starts from 0).
    cem_warm_start: bool = True
    # Planning cost between two slots: |features| / sqrt(slot_dim) + position_weight x
    # |position| (positions in image units), summed over the Hungarian-matched pairs.
    position_weight: float = field(default=5.0, metadata=at_least(0))
    # Keep achieved goals: a slot whose centre is already within keep_radius (image units;
    # 0.07 is about the blocks' 0.05 m success tolerance) of its matched goal slot adds
    # keep_scale x the distance its centre is predicted to move. 0 turns it off.
    keep_scale: float = field(default=0.0, metadata=at_least(0))
    keep_radius: float = field(default=0.07, metadata=at_least(0))
    # Exploration (explore=True, after the first update; before it every action is random):
    # a uniformly random action with probability epsilon, else the plan plus Gaussian noise;
    # epsilon = 1 acts at random throughout and never plans (preset op3_perception).
    epsilon: float = field(default=0.2, metadata=at_least(0))
    explore_noise: float = field(default=0.1, metadata=at_least(0))


# The layers kept dense when ``sparse.skip`` is null (LayerFactory names; module paths work
# too, see ``agents.sparsity.sparse_skip``), by the Dreamer's rules: the first layer on each
# input (the encoder's pixel conv, the 4-d position embeddings of encoder and decoder, the
# dynamics' action input) and the output layers (the decoder's RGB and mask logit per pixel;
# with op3.heads the reward and continue heads' outputs, as the Dreamer's; the goal pairs'
# pooling scores, one per pooled token).
# Narrow inputs masked at density 0.1 would reach the model through a handful of weights.
SPARSE_SKIP_DEFAULT = (
    "op3.encoder.conv0",
    "op3.encoder.pos",
    "op3.decoder.pos",
    "op3.dynamics.action_embed.0",
    "op3.decoder.out",
    "op3.reward.out",
    "op3.continue.out",
    "op3.goal_attention",
)


def validate(config) -> None:
    """The ``op3`` section's rules (every config holds it), and what ``agent=op3`` needs."""
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
    if config.agent.name not in COMPOSITIONS or composition(config)[0] != "slots":
        return
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


def env_settings(config) -> None:
    """What the slot world model needs (``world_model.kind=slots``: ``agent=op3``'s): pixel
    observations, the goal image, and no action repeat (a pick-and-place action repeated would
    only redo the same move); the command line still wins."""
    if composition(config)[0] != "slots":
        return
    if config.env.obs == "state":
        config.env.obs = "pixels"
    config.env.goal_obs = True
    config.env.action_repeat = 1


def check_new_run(config, has_init_weights: bool) -> None:
    if config.op3.freeze_perception and not has_init_weights:
        raise ConfigError(
            "op3.freeze_perception=true trains only the dynamics, on slots from a frozen "
            "perception: start from a trained one with init=<run dir> (e.g. from "
            "`scripts/dev/op3_checks.py check=ari save=<run dir>`; see README)"
        )
