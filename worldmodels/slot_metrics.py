"""Distances between sets of slots, and C-SWM's ranking measures of predicted slots.

A set of slots ``[..., K, S]`` has no order: slot k of one set need not be slot k of another
(each frame's slots are inferred in their own order). The distances here pair the slots of two
sets by the minimum-cost one-to-one matching (``worldmodels.slots.hungarian_order``, on the
tensors' device for up to ``EXACT_MATCHING_MAX_SLOTS`` slots, so a planner's cost makes no host
sync) and sum the matched pairs' distances. Used by the slot planner's goal cost
(``worldmodels.planning.GoalCost``), the OP3 agent and ``scripts/dev/op3_checks.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from imagine_rl.worldmodels.slots import hungarian_order


def slot_distances(
    pred: torch.Tensor,
    goal: torch.Tensor,
    slot_dim: int | None = None,
    position_weight: float = 0.0,
) -> torch.Tensor:
    """Pairwise distances between slots ``pred`` and ``goal`` (broadcast over the leading
    dims). Plain Euclidean without ``slot_dim``; with it, ``|features| / sqrt(slot_dim) +
    position_weight * |position|`` where a slot is ``slot_dim`` features followed by its ``(y,
    x, ...)`` frame.

    Shapes: ``pred [..., K, S]``, ``goal [..., K, S]`` -> ``[..., K, K]`` (row: a ``pred``
    slot, column: a ``goal`` slot).
    """
    pred, goal = torch.broadcast_tensors(pred, goal)
    if slot_dim is None:
        return torch.cdist(pred.float(), goal.float())
    features = torch.cdist(pred[..., :slot_dim].float(), goal[..., :slot_dim].float())
    position = torch.cdist(
        pred[..., slot_dim : slot_dim + 2].float(), goal[..., slot_dim : slot_dim + 2].float()
    )
    return features / slot_dim**0.5 + position_weight * position


def hungarian_cost(costs: torch.Tensor) -> torch.Tensor:
    """Minimum total cost of a one-to-one matching for each ``[K, K]`` matrix of ``costs``
    (``worldmodels.slots.hungarian_order``). No gradient.

    Shapes: ``costs [..., K, K]`` -> ``[...]``.
    """
    order = hungarian_order(costs)
    return costs.detach().float().gather(-1, order[..., None])[..., 0].sum(-1)


def matched_slot_distance(
    pred: torch.Tensor,
    goal: torch.Tensor,
    slot_dim: int | None = None,
    position_weight: float = 0.0,
) -> torch.Tensor:
    """Distance between two sets of slots: the sum of ``slot_distances`` over the Hungarian
    matching of the slots. Invariant to the order of the slots in either set.

    Shapes: ``pred [..., K, S]``, ``goal [..., K, S]`` (broadcast) -> ``[...]``.
    """
    return hungarian_cost(slot_distances(pred, goal, slot_dim, position_weight))


def squared_slot_distances(pred: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances between whole slot states: summed over a matching,
    C-SWM's latent distance.

    Shapes: ``pred [..., K, S]``, ``goal [..., K, S]`` -> ``[..., K, K]``.
    """
    pred, goal = torch.broadcast_tensors(pred, goal)
    return torch.cdist(pred.float(), goal.float()).square()


def ranking_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    distances: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = squared_slot_distances,
    chunk: int = 256,
) -> dict[str, Any]:
    """C-SWM's ranking measures (Kipf et al. 2020) of predictions against the encoded true
    states: prediction ``i`` is ranked against every ``target[j]`` by the Hungarian-matched sum
    of ``distances`` (``[..., K, K]`` per slot pair; by default squared Euclidean over the whole
    slot state), and its rank is 1 + the number of other targets strictly closer than
    ``target[i]`` (ties count for the prediction). An evaluation measure: it reads its results
    back to the host.

    Shapes: ``pred [N, K, S]``, ``target [N, K, S]``. Returns ``hits_at_1`` (share of rank 1),
    ``mrr`` (mean reciprocal rank), both floats, and ``ranks`` ``[N]``.
    """
    assert pred.dim() == 3 and pred.shape == target.shape, (
        f"ranking_metrics: pred {tuple(pred.shape)} and target {tuple(target.shape)} must be "
        "[N, K, S]"
    )
    N = len(pred)
    rows = []
    for i in range(0, N, chunk):  # [n, N] matched distances, n Hungarian problems per target
        block = distances(pred[i : i + chunk, None], target[None])
        rows.append(hungarian_cost(block))
    dist = torch.cat(rows, 0)  # [N, N]
    own = dist.diagonal()
    ranks = 1 + (dist < own[:, None]).sum(1)
    return {
        "hits_at_1": float((ranks == 1).float().mean()),
        "mrr": float((1.0 / ranks.float()).mean()),
        "ranks": ranks,
    }


__all__ = [
    "hungarian_cost",
    "matched_slot_distance",
    "ranking_metrics",
    "slot_distances",
    "squared_slot_distances",
]
