"""How a global non-zero budget is split over layers: uniform or Erdos-Renyi-Kernel (ERK).

ERK gives layer ``l`` (weight shape ``(d_1, ..., d_k)``, ``n_l`` elements) the density
``min(1, eps * sum(d_i) / prod(d_i))``. ``eps`` is solved so that the non-zeros add up to the
global budget ``density * sum(n_l)``; a layer whose density would exceed 1 is made dense and
``eps`` is re-solved over the others (making a layer dense only raises ``eps``, so every layer
over the cap in one round can be capped at once).

Counts are then made integer in allocation *units* (one ``b x b`` block, or one block per
block-row for balanced masks) with largest-remainder rounding, so the total is the budget to the
nearest unit (exact to the element for ``block=1`` unbalanced masks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerBudget:
    """One layer as the allocator sees it."""

    name: str
    shape: tuple[int, ...]
    unit: int  # elements per allocation unit
    max_units: int  # units of a fully dense layer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def erk_score(shape: Sequence[int]) -> float:
    """``sum(shape) / prod(shape)``: the ERK density of the layer up to the global ``eps``."""
    return float(sum(shape)) / float(math.prod(shape))


def closed_form_densities(
    shapes: Sequence[Sequence[int]], density: float, distribution: str
) -> list[float]:
    """Per-layer real-valued densities whose weighted mean is ``density`` (before rounding)."""
    if distribution == "uniform":
        return [float(density)] * len(shapes)
    if distribution != "erk":
        raise ValueError(f"unknown distribution {distribution!r}")
    numels = [float(math.prod(s)) for s in shapes]
    scores = [erk_score(s) for s in shapes]
    budget = density * sum(numels)
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        if not free:
            return [1.0] * len(shapes)
        remaining = budget - sum(numels[i] for i in dense)
        eps = remaining / sum(scores[i] * numels[i] for i in free)
        over = [i for i in free if eps * scores[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * scores[i] for i in range(len(shapes))]
        dense.update(over)


def allocate_units(layers: Sequence[LayerBudget], density: float, distribution: str) -> list[int]:
    """Integer units per layer (each >= 1, <= max) adding up to the budget to the nearest unit."""
    if not layers:
        return []
    densities = closed_form_densities([la.shape for la in layers], density, distribution)
    target = round(density * sum(la.numel for la in layers))
    ideal = [d * la.numel / la.unit for d, la in zip(densities, layers)]
    units = [min(la.max_units, max(1, math.floor(x + 1e-9))) for x, la in zip(ideal, layers)]

    def remaining() -> int:
        return target - sum(u * la.unit for u, la in zip(units, layers))

    # Add units where rounding lost most, while that brings the total closer to the target.
    order = sorted(range(len(layers)), key=lambda i: ideal[i] - units[i], reverse=True)
    changed = True
    while changed and remaining() > 0:
        changed = False
        for i in order:
            rem = remaining()
            if units[i] < layers[i].max_units and layers[i].unit < 2 * rem:
                units[i] += 1
                changed = True
    # The ">= 1 unit" floor can overshoot: take units back where rounding gained most.
    order = sorted(range(len(layers)), key=lambda i: ideal[i] - units[i])
    changed = True
    while changed and remaining() < 0:
        changed = False
        for i in order:
            rem = -remaining()
            if units[i] > 1 and layers[i].unit < 2 * rem:
                units[i] -= 1
                changed = True
    return units
