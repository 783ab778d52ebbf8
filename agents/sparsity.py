"""What the agents share to put dynamic-sparse masks on their world models (``sparse``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
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
