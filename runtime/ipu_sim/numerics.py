"""Emulated IPU numerics: fp32 -> fp16 rounding, to nearest or stochastic.

Statistical emulation, not bit-exact: the IPU rounds stochastically in hardware with its own
random source; here ``torch.rand`` from a seeded generator decides, so a run is reproducible and
the rounding is unbiased in expectation (``E[round(x)] = x`` for ``x`` inside the fp16 range),
which is the property training relies on. Values are returned as fp32 tensors holding fp16
values (the host keeps computing in fp32 where autocast does not cast).
"""

from __future__ import annotations

import torch

FP16_MAX = float(torch.finfo(torch.float16).max)


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (ties to even), returned in ``x``'s dtype."""
    return x.to(torch.float16).to(x.dtype)


def stochastic_round_fp16(
    x: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round each element to one of its two fp16 neighbours, the upper one with probability
    ``(x - lo) / (hi - lo)``: unbiased in expectation. Exactly representable values, values
    beyond the fp16 range (they overflow as a plain cast does) and NaN are rounded to nearest.

    Shapes: any; returns ``x``'s shape and dtype.
    """
    x32 = x.detach().float()
    nearest = x32.to(torch.float16)
    near32 = nearest.float()
    toward = torch.where(near32 < x32, torch.inf, -torch.inf).to(torch.float16)
    other = torch.nextafter(nearest, toward).float()
    lo, hi = torch.minimum(near32, other), torch.maximum(near32, other)
    gap = hi - lo
    exact = (near32 == x32) | ~torch.isfinite(near32) | ~torch.isfinite(other) | (gap == 0)
    p_up = torch.where(exact, torch.zeros_like(x32), (x32 - lo) / torch.where(exact, 1.0, gap))
    draw = torch.rand(x32.shape, generator=generator, device=x32.device)
    rounded = torch.where(draw < p_up, hi, lo)
    return torch.where(exact, near32, rounded).to(x.dtype)


@torch.no_grad()
def round_parameters_fp16(
    params: list[torch.Tensor], stochastic: bool, generator: torch.Generator | None = None
) -> None:
    """Store every parameter as an fp16 value (in place), as fp16 weight storage would."""
    for p in params:
        if not p.is_floating_point():
            continue
        p.copy_(stochastic_round_fp16(p, generator) if stochastic else round_fp16(p))
