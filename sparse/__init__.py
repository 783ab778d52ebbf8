"""Dynamic-sparse layers (SET, RigL) for world models.

Usage::

    from imagine_rl.sparse import SparseConfig, sparsify

    model = build_model()
    cfg = SparseConfig(density=0.1, method="rigl", distribution="erk", block=1,
                       update_every=100, total_steps=num_updates, skip=["encoder.0", "head"])
    sparsifier = sparsify(model, cfg, example_inputs=batch)   # in place; returns the owner
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-2)
    for batch in data:
        optimizer.zero_grad()
        loss(model, batch).backward()
        optimizer.step()
        sparsifier.step(optimizer)          # re-mask, scheduled drop/regrow, optimizer state
    logger.log(sparsifier.metrics())        # sparse/density, sparse/flops_ratio, ...
    checkpoint["sparse"] = sparsifier.state_dict()   # tensors and ints only

- Masks are ``torch.nn.utils.parametrize`` parametrizations (``weight = original * mask``) on
  every ``nn.Linear``/``nn.Conv*``/``nn.ConvTranspose*`` weight, and on any >=2-D parameter
  named by ``include``; ``skip`` keeps layers dense. Masked weights stay exactly zero
  (``sparse.sparsifier`` explains how, and how RigL gets the dense gradient).
- ``distribution``: ``uniform`` or ``erk`` with exact integer block counts per layer
  (``sparse.distribution``); ``block`` in {1, 4, 8, 16}: masks made of whole ``b x b`` blocks
  (conv: over (out, in) channels at each kernel tap); ``balanced``: same count per block-row.
- ``method``: ``static`` (fixed random mask), ``set`` (drop smallest |w| blocks, regrow at
  random), ``rigl`` (drop smallest |w| blocks, regrow the largest |dense grad| blocks), every
  ``update_every`` steps until ``stop_fraction * total_steps``, drop fraction constant or cosine.
- Fast path: a balanced block-sparse ``nn.Linear`` may run through the ``balanced-bsr-bmm``
  kernel (``sparse.kernels``: gather + batched matmul, forward and backward) when a cached
  micro-benchmark says it beats dense-masked.

This package imports only torch, numpy and the standard library.
"""

from .config import SparseConfig, SparseSettings
from .distribution import LayerBudget, allocate_units, closed_form_densities, erk_score
from .kernels import (
    BALANCED_BMM,
    DENSE_MASKED,
    balanced_block_linear,
    choose_kernel,
    clear_workspace,
)
from .sparsifier import MaskParametrization, Sparsifier, sparsify

__all__ = [
    "BALANCED_BMM",
    "DENSE_MASKED",
    "LayerBudget",
    "MaskParametrization",
    "SparseConfig",
    "SparseSettings",
    "Sparsifier",
    "allocate_units",
    "balanced_block_linear",
    "choose_kernel",
    "clear_workspace",
    "closed_form_densities",
    "erk_score",
    "sparsify",
]
