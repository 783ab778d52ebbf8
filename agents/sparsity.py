"""What the agents share to put dynamic-sparse masks on their world models (``sparse``)."""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from imagine_rl import sparse


def sparsify_model(
    model: nn.Module,
    forward: Callable[[Any], Any],
    library_config: sparse.SparseConfig,
    example: Any,
    batch_size: int,
    device: torch.device,
) -> sparse.Sparsifier:
    """Masks on ``model``'s layers (``sparse.sparsify``), FLOPs counted on one dry
    ``forward(example)`` per ``batch_size`` replayed steps. The dry pass draws nothing from the
    global RNGs, so a sparse run's random stream matches the dense one's."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    model.forward = forward  # for the dry forward only
    try:
        with torch.random.fork_rng(devices=cuda):
            return sparse.sparsify(
                model, library_config, example_inputs=(example,), batch_size=batch_size
            )
    finally:
        del model.forward


def cached_masks(sparsifier: sparse.Sparsifier | None) -> contextlib.AbstractContextManager:
    """Compute each masked weight once per block (``weight = original * mask``) rather than at
    every access; only valid while no optimizer step happens inside."""
    return parametrize.cached() if sparsifier is not None else contextlib.nullcontext()


def _matches(patterns: Sequence[str], names: list[str]) -> bool:
    """fnmatch or full-match regex, as ``sparse`` matches ``skip``/``include``."""
    for pattern in patterns:
        for name in names:
            if fnmatch.fnmatchcase(name, pattern):
                return True
            with contextlib.suppress(re.error):
                if re.fullmatch(pattern, name):
                    return True
    return False


def sparse_skip(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """``patterns`` plus the module path of every layer whose ``LayerFactory`` name matches
    one (a pixel decoder's last transposed conv also answers to ``wm.decoder.cnn.out``), so
    ``sparse.skip`` accepts factory names and module paths."""
    names = {
        path: [module.layer_name]
        for path, module in model.named_modules()
        if isinstance(getattr(module, "layer_name", None), str)
    }
    convs = [p for p, n in names.items() if re.fullmatch(r"wm\.decoder\.cnn\.\d+", n[0])]
    if convs:
        names[convs[-1]].append("wm.decoder.cnn.out")
    extra = [path for path, n in names.items() if _matches(patterns, n)]
    return list(dict.fromkeys([*patterns, *extra]))


# The actor's and the critic's output layers stay dense (as the world model's heads' do).
BEHAVIOUR_SKIP = ("actor.net.out", "critic.net.out")


def sparsify_actor_critic(
    config: Any,
    actor_critic: nn.Module,
    feat_size: int,
    planned_updates: int,
    device: torch.device,
) -> sparse.Sparsifier:
    """Masks on the actor's and the critic's layers (``sparse.behaviour``) with the settings
    of ``config.sparse``, their schedule over ``planned_updates`` behaviour steps; FLOPs
    counted per imagined state (features ``[1, feat_size]``). Weight keys and optimizers stay the actor's and the critic's
    own (the masks are parametrizations of their layers, saved under their prefixes). The
    slow critic keeps dense layers: its EMA of the masked critic is zero where the critic
    has no weight, but it computes densely."""
    parts = nn.ModuleDict({"actor": actor_critic.actor, "critic": actor_critic.critic})
    horizon = getattr(config.agent, "horizon", 1)
    library_config = config.sparse.library_config(
        total_steps=planned_updates,
        seed=config.seed,
        # The actor and the critic see every imagined state of the batch at once.
        fast_path_batch=config.replay.steps_per_batch * (horizon + 1),
        skip=list(BEHAVIOUR_SKIP),
    )
    example = torch.zeros(1, feat_size, device=device)

    def forward(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return parts["actor"].net(feat), parts["critic"].net(feat)

    return sparsify_model(parts, forward, library_config, example, 1, device)


def sparsify_world_model(
    config: Any,
    model: nn.Module,
    forward: Callable[[Any], Any],
    example: Any,
    skip_default: Sequence[str],
    planned_updates: int,
    device: torch.device,
) -> sparse.Sparsifier:
    """Masks on a world model's layers as ``config.sparse`` asks (``sparse.skip=null``: the
    agent's ``skip_default``), the schedule spanning ``planned_updates``; FLOPs counted per
    replayed step on one dry ``forward(example)`` of a ``[1, replay.batch_length]`` batch."""
    patterns = skip_default if config.sparse.skip is None else config.sparse.skip
    library_config = config.sparse.library_config(
        total_steps=planned_updates,
        seed=config.seed,
        fast_path_batch=config.replay.steps_per_batch,
        skip=sparse_skip(model, list(patterns)),
    )
    T = config.replay.batch_length
    return sparsify_model(model, forward, library_config, example, T, device)
