"""Factored RSSM dynamics: a sparse factor graph over ``G`` groups of the latent state.

With ``FactoredSpec.groups = G > 0`` the RSSM's deterministic state ``h`` (``deter`` units) is
split into ``G`` groups of ``s = deter / G`` units and its stochastic state ``z`` into ``G``
groups of ``stoch / G`` latents (group ``j`` of ``z`` is drawn from a prior on ``h_j`` alone).
Group ``g`` of the next state reads only its *parents*: the groups ``j`` with
``adjacency[g, j]`` set, through ``(h_j, z_j)``, plus its own slice of the action projection.
The diagonal is always set (a group always reads itself; the GRU also keeps its own state).

Transition of group ``g`` (every layer per group, every norm over the group's units only)::

    u_g = act(norm(sum_j adjacency[g, j] * W[g, j] @ (h_j, z_j)))   # FactorGraphLinear
    x_g = act(norm(U_g @ (u_g, a_g, h_g)))                          # a_g: action slice
    h_g' = GRU gates of x_g, mixing h_g

so ``h_g'`` is a function of ``{h_j, z_j : adjacency[g, j]}`` and the action only: changing a
non-parent group cannot change it (tested exactly). The posterior ``q(z | h, obs)`` stays
dense (inference may pool evidence from every group; the generative model is what factors).

How the graph is chosen (``graph``):

- ``fixed``: random, each group with ``in_degree - 1`` parents besides itself (seeded);
- ``dynamic``: starts as ``fixed`` and is rewired RigL-style on the ``G x G`` block grid
  (block = group): every ``update_every`` optimizer steps the weakest edges (smallest tile
  ``|W|`` sum) are dropped and as many absent edges with the largest dense-gradient tile sum
  are grown (``sparse.masks.drop_and_grow``, balanced: the in-degree stays fixed; the schedule
  is ``sparse.SparseConfig``'s, cosine-decayed until ``stop_fraction``);
- ``l1``: every edge present, each with a gate ``gate[g, j]`` scaling its weight tile (the tile
  is weight-normalised, so the gate alone sets the edge's strength) and the penalty
  ``l1_scale * sum_{g != j} |gate[g, j]|`` added to the world-model loss (``loss/graph``).

Shapes:
    ``FactorGraphLinear``: nodes ``[..., G, n]`` -> ``[..., G, out]``.
    ``FactoredTransition``: ``deter [B, D]``, ``stoch [B, Z]`` (flat), ``action_feat [B, H]``
    -> ``deter [B, D]``. ``FactoredPrior``: ``deter [..., D]`` -> flat prior stats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imagine_rl.sparse import SparseConfig
from imagine_rl.sparse.masks import drop_and_grow
from imagine_rl.worldmodels.layers import LayerFactory

GRAPHS = ("fixed", "dynamic", "l1")
# An l1 edge counts as present (metrics, binary graph) while its |gate| is above this.
EDGE_THRESHOLD = 0.05


@dataclass
class FactoredSettings:
    """Factored dynamics settings a user chooses: the ``world_model.factored`` section of the
    run config is this class (one definition). ``metadata["min"]`` is the lower bound the run
    config checks.

    groups:        G, groups of the latent state; 0 = off (the plain RSSM). deter, hidden and
                   stoch must divide by G.
    graph:         fixed: a random graph of ``in_degree`` parents a group (itself included);
                   dynamic: rewired RigL-style on the G x G block grid; l1: all edges, gated,
                   with an L1 penalty on the gates.
    in_degree:     parents per group, itself included (fixed and dynamic graphs), 1..G.
    l1_scale:      l1 graph: loss/graph = l1_scale * sum of |gate| over the G (G - 1) non-self
                   edges.
    update_every:  dynamic graph: world-model updates between rewirings.
    drop_fraction: fraction of each group's non-self edges replaced at a rewiring (at the
                   start; cosine-decayed).
    stop_fraction: no rewiring after this fraction of the run's updates.
    """

    groups: int = field(default=0, metadata={"min": 0})
    graph: Literal["fixed", "dynamic", "l1"] = "fixed"
    in_degree: int = field(default=2, metadata={"min": 1})
    l1_scale: float = field(default=0.01, metadata={"min": 0})
    update_every: int = field(default=100, metadata={"min": 1})
    drop_fraction: float = field(default=0.3, metadata={"min": 0})
    stop_fraction: float = field(default=0.75, metadata={"min": 0})


@dataclass
class FactoredSpec(FactoredSettings):
    """``FactoredSettings`` plus what the agent derives from its run.

    total_steps:   optimizer steps of the run (for the rewiring schedule).
    seed:          seeds the initial graph.
    """

    total_steps: int = 100_000
    seed: int = 0

    def check(self, deter: int, hidden: int, stoch: int) -> None:
        """Raise ``ValueError`` naming the ``world_model.*`` key when the sizes do not split."""
        if self.groups <= 0:
            return
        G = self.groups
        if self.graph not in GRAPHS:
            raise ValueError(
                f"world_model.factored.graph: expected one of {GRAPHS}, got {self.graph!r}"
            )
        for key, size in (("deter", deter), ("hidden", hidden), ("stoch", stoch)):
            if size % G:
                raise ValueError(
                    f"world_model.{key} ({size}) must be divisible by world_model.factored."
                    f"groups ({G}): every group gets the same number of units"
                )
        if not 1 <= self.in_degree <= G:
            raise ValueError(
                f"world_model.factored.in_degree: must be in [1, groups={G}] (parents per "
                f"group, itself included), got {self.in_degree}"
            )

    def schedule(self) -> SparseConfig:
        """The rewiring schedule (``is_update_step``, ``drop_fraction_at``) of ``sparse``."""
        return SparseConfig(
            method="rigl",
            update_every=self.update_every,
            drop_fraction=self.drop_fraction,
            stop_fraction=self.stop_fraction,
            total_steps=max(1, self.total_steps),
            drop_schedule="cosine",
        )


def random_graph(groups: int, in_degree: int, generator: torch.Generator) -> torch.Tensor:
    """A ``[G, G]`` bool adjacency: the diagonal plus ``in_degree - 1`` random parents a row."""
    scores = torch.rand(groups, groups, generator=generator)
    scores.fill_diagonal_(2.0)  # above any uniform draw: the self edge is always taken
    adjacency = torch.zeros(groups, groups, dtype=torch.bool)
    adjacency.scatter_(1, scores.topk(in_degree, dim=1).indices, True)
    return adjacency


class PerGroupNorm(nn.Module):
    """Layer or RMS norm over the last axis of ``[..., G, F]``, with per-group affine weights
    (no statistic or parameter is shared between groups)."""

    def __init__(self, groups: int, features: int, kind: str, eps: float) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(groups, features)) if kind != "none" else None
        self.bias = nn.Parameter(torch.zeros(groups, features)) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight + self.bias
        if self.kind == "rms":
            return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight
        return x


class FactorGraphLinear(nn.Module):
    """Per-group linear maps, group ``g`` reading only its parents' node vectors.

    Weight ``[G, G * n, out]`` (a ``BlockLinear`` built by the factory, named ``graph``): tile
    ``(g, j)`` = ``weight[g, j*n:(j+1)*n]`` maps node ``j`` into group ``g``. Fixed/dynamic
    graphs multiply it by the ``adjacency`` mask (absent tiles are also kept exactly zero, with
    zero optimizer state); the l1 graph scales each weight-normalised tile by its gate.
    ``step(optimizer)`` after every optimizer step applies the mask and the rewiring schedule.

    Shapes: nodes ``[..., G, n]`` -> ``[..., G, out]``.
    """

    def __init__(self, spec: FactoredSpec, node_size: int, out: int, factory: LayerFactory):
        super().__init__()
        G = spec.groups
        self.spec, self.groups, self.node_size = spec, G, node_size
        self.linear = factory.block_linear(G * node_size, out, G, name="graph")
        generator = torch.Generator().manual_seed(int(spec.seed))
        degree = G if spec.graph == "l1" else spec.in_degree
        self.register_buffer("adjacency", random_graph(G, degree, generator))
        # Optimizer steps seen (persistent, so a resumed run continues the schedule).
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.gate: nn.Parameter | None = None
        with torch.no_grad():
            # The factory scaled the init by the full fan-in G * n; a group reads in_degree.
            self.linear.weight.mul_(math.sqrt(G / degree))
            if spec.graph == "l1":
                self.gate = nn.Parameter(torch.ones(G, G))
                self.register_buffer("tile_scale", self._tile_norms(self.linear.weight))
            else:
                self.linear.weight.mul_(self._expand(self.adjacency, self.linear.weight.dtype))
        self._schedule = spec.schedule()
        self._probe: torch.Tensor | None = None  # dense-gradient capture on a rewiring step
        self._changed = 0.0
        self.register_load_state_dict_post_hook(lambda module, _: module._arm())
        self._arm()  # the first step may already end with a rewiring (update_every=1)

    # -- weights ------------------------------------------------------------------------
    def _expand(self, per_edge: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[G, G]`` per-edge values -> ``[G, G * n, 1]``, broadcastable over the weight."""
        return per_edge.to(dtype).repeat_interleave(self.node_size, dim=1)[..., None]

    def _tiles(self, weight: torch.Tensor) -> torch.Tensor:
        """``[G, G, n, out]`` view of a weight (or gradient) ``[G, G * n, out]``."""
        G, n = self.groups, self.node_size
        return weight.reshape(G, G, n, weight.shape[-1])

    def _tile_norms(self, weight: torch.Tensor) -> torch.Tensor:
        return self._tiles(weight.detach()).float().square().sum((2, 3)).sqrt()

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward uses, ``[G, G * n, out]``."""
        weight = self.linear.weight
        if self.gate is None:
            return weight * self._expand(self.adjacency, weight.dtype)
        # Weight-normalised tiles: without it the penalty could be dodged by shrinking the
        # gate and growing the tile.
        norms = self._tiles(weight).float().square().sum((2, 3)).add(1e-12).sqrt()
        scale = self.gate * self.tile_scale / norms
        return weight * self._expand(scale, weight.dtype)

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        G, n = self.groups, self.node_size
        assert nodes.shape[-2:] == (G, n), f"nodes {tuple(nodes.shape)}: expected [..., {G}, {n}]"
        weight = self.effective_weight()
        if self._probe is not None and self._probe.device != weight.device:
            self._probe = None  # armed before the module moved (accelerator placement)
            self._arm()
        if self._probe is not None and torch.is_grad_enabled():
            # Adds zero; its .grad after backward is dL/d(effective weight), dense (RigL).
            weight = weight + self._probe.to(weight.dtype)
        flat = nodes.reshape(*nodes.shape[:-2], G * n)
        out = torch.einsum("...i,gio->...go", flat, weight)
        bias = self.linear.bias
        return out + bias if bias is not None else out

    # -- graph ----------------------------------------------------------------------------
    def strength(self) -> torch.Tensor:
        """``[G, G]`` float edge strengths: the 0/1 adjacency, or ``|gate|`` for l1."""
        if self.gate is None:
            return self.adjacency.float()
        return self.gate.detach().abs().float()

    def binary(self) -> torch.Tensor:
        """``[G, G]`` bool: the edges present (l1: ``|gate| > EDGE_THRESHOLD``, diagonal set)."""
        if self.gate is None:
            return self.adjacency.clone()
        eye = torch.eye(self.groups, dtype=torch.bool, device=self.gate.device)
        return (self.strength() > EDGE_THRESHOLD) | eye

    def penalty(self) -> torch.Tensor | None:
        """``l1_scale * sum |gate|`` over the non-self edges (l1 graph), else None."""
        if self.gate is None:
            return None
        off = 1.0 - torch.eye(self.groups, device=self.gate.device)
        return self.spec.l1_scale * (self.gate.abs() * off).sum()

    def metrics(self) -> dict[str, torch.Tensor]:
        """0-d tensors: non-self edges present, their share of the G (G - 1) possible, and
        the fraction of edges replaced at the last rewiring."""
        G = self.groups
        edges = self.binary().sum() - G
        out = {
            "world_model/graph_edges": edges.float(),
            "world_model/graph_density": edges.float() / max(1, G * (G - 1)),
            "world_model/graph_changed": torch.tensor(self._changed, device=edges.device),
        }
        if self.gate is not None:
            off = ~torch.eye(G, dtype=torch.bool, device=self.gate.device)
            out["world_model/graph_gate_mean"] = self.strength()[off].mean()
        return out

    def image(self, cell: int = 16) -> np.ndarray:
        """The adjacency as uint8 ``[G * cell, G * cell, 3]``: row ``g`` = the group receiving,
        column ``j`` = its parent; white = full strength (l1: ``|gate|`` over the largest)."""
        strength = self.strength().cpu().numpy()
        top = float(strength.max())
        grey = np.clip(strength / top if top > 0 else strength, 0.0, 1.0)
        pixels = np.kron(grey, np.ones((cell, cell)))
        if cell >= 4:  # a grey grid line between cells keeps the layout readable
            pixels[::cell, :] = 0.25
            pixels[:, ::cell] = 0.25
        return np.repeat((pixels * 255).round().astype(np.uint8)[..., None], 3, axis=-1)

    # -- schedule -------------------------------------------------------------------------
    def _arm(self) -> None:
        """Capture the dense gradient during the next step when it ends with a rewiring."""
        wanted = self.spec.graph == "dynamic" and self._schedule.is_update_step(int(self.steps) + 1)
        if wanted and self._probe is None:
            weight = self.linear.weight
            self._probe = torch.zeros(
                weight.shape, dtype=torch.float32, device=weight.device, requires_grad=True
            )
        elif not wanted:
            self._probe = None

    @torch.no_grad()
    def step(self, optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] = ()):
        """Call after every optimizer step: keeps absent tiles at zero, rewires when scheduled
        (zeroing the optimizer state of changed tiles) and arms the next capture. Returns the
        metrics of a rewiring, else None."""
        opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        self.steps += 1
        info = None
        if self.gate is None:
            self.linear.weight.mul_(self._expand(self.adjacency, self.linear.weight.dtype))
            if self.spec.graph == "dynamic" and self._schedule.is_update_step(int(self.steps)):
                info = self.rewire(opts, self._schedule.drop_fraction_at(int(self.steps)))
        self._arm()
        return info

    @torch.no_grad()
    def rewire(self, optimizers: list[torch.optim.Optimizer], fraction: float) -> dict[str, float]:
        """Drop the weakest non-self edges of every group and grow as many absent ones where
        the dense gradient is largest (random scores when no gradient was captured)."""
        G = self.groups
        degree = int(self.adjacency[0].sum())
        weight = self.linear.weight
        if degree <= 1 or degree >= G:
            self._changed = 0.0
            return {"world_model/graph_changed": 0.0}
        eye = torch.eye(G, dtype=torch.bool, device=weight.device)
        drop = self._tiles(weight).abs().float().sum((2, 3))
        # The self edge: finite but above every real score, so never among the weakest.
        drop = drop.masked_fill(eye, torch.finfo(torch.float32).max)
        probe = self._probe
        if probe is not None and probe.grad is not None:
            grow = self._tiles(probe.grad).abs().float().sum((2, 3))
        else:
            grow = torch.rand(G, G).to(weight.device)
        # k <= degree - 1 so only non-self edges are dropped.
        fraction = min(fraction, (degree - 1) / degree)
        new, k = drop_and_grow(self.adjacency, drop, grow, fraction, balanced=True)
        keep = self._expand(self.adjacency & new, weight.dtype)
        weight.mul_(keep)
        for opt in optimizers:
            for value in opt.state.get(weight, {}).values():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    value.mul_(keep.to(value.dtype))
        self.adjacency.copy_(new)
        self._changed = k / (G * (degree - 1))
        return {"world_model/graph_changed": self._changed}


class FactoredTransition(nn.Module):
    """The factored GRU step (module docstring); built in place of the RSSM's dense core.

    Shapes: ``deter [B, D]``, ``stoch [B, Z]`` (flat), ``action_feat [B, H]`` -> ``[B, D]``.
    """

    def __init__(
        self, spec: FactoredSpec, deter: int, hidden: int, stoch_size: int, factory: LayerFactory
    ) -> None:
        super().__init__()
        G = spec.groups
        self.groups = G
        self.s, self.hg, self.zs = deter // G, hidden // G, stoch_size // G
        norm, eps = factory.norm_kind, factory.eps
        self.graph = FactorGraphLinear(spec, self.s + self.zs, self.hg, factory)
        self.graph_norm = PerGroupNorm(G, self.hg, norm, eps)
        self.act = factory.act()
        self.gru_hidden = factory.block_linear(
            2 * self.hg + self.s, self.s, G, name="gru.hidden", bias=False
        )
        self.gru_norm = PerGroupNorm(G, self.s, norm, eps)
        self.gru_gates = factory.block_linear(self.s, 3 * self.s, G, name="gru.gates")

    def forward(
        self, deter: torch.Tensor, stoch: torch.Tensor, action_feat: torch.Tensor
    ) -> torch.Tensor:
        B, G = deter.shape[0], self.groups
        h = deter.reshape(B, G, self.s)
        z = stoch.reshape(B, G, self.zs).to(h.dtype)
        u = self.act(self.graph_norm(self.graph(torch.cat([h, z], -1))))
        a = action_feat.reshape(B, G, self.hg).to(u.dtype)
        x = self.gru_hidden(torch.cat([u, a, h.to(u.dtype)], -1))
        x = self.act(self.gru_norm(x))
        reset, cand, update = self.gru_gates(x).float().chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1.0)
        new = update * cand + (1.0 - update) * h.float()
        return new.reshape(B, G * self.s)


class FactoredPrior(nn.Module):
    """``p(z_g | h_g)`` per group: a per-group MLP on ``h_g`` only.

    Returns the flat statistics the RSSM's ``_stats`` expects: categorical logits
    ``[..., stoch * classes]`` (group-major), Gaussian ``[..., 2 * stoch]`` (all means, then
    all std parameters, each group-major).
    """

    def __init__(
        self,
        spec: FactoredSpec,
        deter: int,
        hidden: int,
        layers: int,
        stats: int,
        gaussian: bool,
        factory: LayerFactory,
    ) -> None:
        super().__init__()
        G = spec.groups
        self.groups, self.s, self.gaussian = G, deter // G, gaussian
        hg = hidden // G
        blocks: list[nn.Module] = []
        width = self.s
        for i in range(layers):
            blocks += [
                factory.block_linear(width, hg, G, name=f"prior.{i}"),
                PerGroupNorm(G, hg, factory.norm_kind, factory.eps),
                factory.act(),
            ]
            width = hg
        self.net = nn.Sequential(*blocks)
        self.out = factory.block_linear(width, stats // G, G, name="prior.out")

    def forward(self, deter: torch.Tensor) -> torch.Tensor:
        lead = deter.shape[:-1]
        raw = self.out(self.net(deter.reshape(*lead, self.groups, self.s)))  # [..., G, S/G]
        if self.gaussian:  # [..., G, 2, k] -> [..., 2, G, k]: means first, as _stats splits
            raw = raw.reshape(*lead, self.groups, 2, -1).transpose(-3, -2)
        return raw.reshape(*lead, -1)


__all__ = [
    "EDGE_THRESHOLD",
    "GRAPHS",
    "FactorGraphLinear",
    "FactoredPrior",
    "FactoredSpec",
    "FactoredTransition",
    "PerGroupNorm",
    "random_graph",
]
