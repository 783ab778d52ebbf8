"""Block-structured masks: the block grid, random masks, and drop/regrow.

A weight of shape ``(out, in, *kernel)`` with block side ``b`` is seen as a grid of
``R = out // b`` block-rows by ``Q = (in // b) * prod(kernel)`` block-columns: block ``(r, q)``
with ``q = c * prod(kernel) + k`` covers outputs ``r*b:(r+1)*b`` and inputs ``c*b:(c+1)*b`` at
kernel position ``k``. Every mask here is a whole number of such blocks. A *balanced* mask has
the same number of active blocks in every block-row.
"""

from __future__ import annotations

import math

import torch


def grid_shape(shape: tuple[int, ...], block: int) -> tuple[int, int]:
    """``(R, Q)``: block-rows and block-columns of a weight (no divisibility check)."""
    return shape[0] // block, (shape[1] // block) * math.prod(shape[2:])


def check_divisible(name: str, shape: tuple[int, ...], block: int) -> None:
    if len(shape) < 2:
        raise ValueError(
            f"sparse: '{name}' has shape {tuple(shape)}; only >=2-D weights can be sparse"
        )
    if shape[0] % block or shape[1] % block:
        raise ValueError(
            f"sparse: layer '{name}' with weight shape {tuple(shape)} cannot be tiled by "
            f"{block}x{block} blocks: dims 0 (out={shape[0]}) and 1 (in={shape[1]}) must both be "
            f"divisible by {block}; use sparse.block=1, or keep the layer dense with sparse.skip"
        )


def _five_d(t: torch.Tensor, block: int) -> torch.Tensor:
    out, inp = t.shape[0], t.shape[1]
    return t.reshape(out // block, block, inp // block, block, math.prod(t.shape[2:]))


def block_sum_abs(t: torch.Tensor, block: int) -> torch.Tensor:
    """``[R, Q]`` sums of ``|t|`` over every block (the block's magnitude / gradient score)."""
    r, q = grid_shape(tuple(t.shape), block)
    if block == 1:
        return t.detach().abs().reshape(r, q)
    return _five_d(t.detach().abs(), block).sum(dim=(1, 3)).reshape(r, q)


def block_view(mask: torch.Tensor, block: int) -> torch.Tensor:
    """``[R, Q]`` bool: which blocks of an element mask are active (reads one element each)."""
    r, q = grid_shape(tuple(mask.shape), block)
    return (_five_d(mask, block)[:, 0, :, 0, :] != 0).reshape(r, q)


def expand_blocks(active: torch.Tensor, shape: tuple[int, ...], block: int) -> torch.Tensor:
    """Element mask of ``shape`` from the ``[R, Q]`` block mask (same dtype as ``active``)."""
    r, _ = active.shape
    c, k = shape[1] // block, math.prod(shape[2:])
    grid = active.reshape(r, 1, c, 1, k).expand(r, block, c, block, k)
    return grid.reshape(shape)


def random_blocks(
    rows: int, cols: int, units: int, balanced: bool, generator: torch.Generator
) -> torch.Tensor:
    """A uniformly random ``[rows, cols]`` bool block mask with ``units`` active blocks (per row
    when ``balanced``, else in total)."""
    scores = torch.rand(rows, cols, generator=generator)
    active = torch.zeros(rows, cols, dtype=torch.bool)
    if balanced:
        active.scatter_(1, scores.topk(units, dim=1).indices, True)
    else:
        active.view(-1)[scores.view(-1).topk(units).indices] = True
    return active


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def drop_and_grow(
    active: torch.Tensor,
    drop_scores: torch.Tensor,
    grow_scores: torch.Tensor,
    fraction: float,
    balanced: bool,
) -> tuple[torch.Tensor, int]:
    """Replace a fraction of the active blocks.

    Drops the ``k = round(fraction * active)`` active blocks with the smallest ``drop_scores``
    and activates the ``k`` blocks, among those inactive *before* the update, with the largest
    ``grow_scores`` (``k`` per block-row when ``balanced``). Returns the new mask and ``k`` in
    total. The number of active blocks (per row when balanced) is unchanged.
    """
    rows, cols = active.shape
    if balanced:
        per_row = int(active[0].sum())
        k = min(round_half_up(fraction * per_row), cols - per_row)
        if k <= 0:
            return active.clone(), 0
        inf = torch.tensor(float("inf"), dtype=drop_scores.dtype, device=drop_scores.device)
        drop = drop_scores.masked_fill(~active, inf).topk(k, dim=1, largest=False).indices
        grow = grow_scores.masked_fill(active, -inf).topk(k, dim=1).indices
        new = active.clone()
        new.scatter_(1, drop, False)
        new.scatter_(1, grow, True)
        return new, k * rows
    n = int(active.sum())
    k = min(round_half_up(fraction * n), active.numel() - n)
    if k <= 0:
        return active.clone(), 0
    flat = active.reshape(-1)
    inf = torch.tensor(float("inf"), dtype=drop_scores.dtype, device=drop_scores.device)
    drop = drop_scores.reshape(-1).masked_fill(~flat, inf).topk(k, largest=False).indices
    grow = grow_scores.reshape(-1).masked_fill(flat, -inf).topk(k).indices
    new = flat.clone()
    new[drop] = False
    new[grow] = True
    return new.reshape(rows, cols), k
