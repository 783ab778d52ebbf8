"""Contrastive predictive coding (CPC) over sequences, and Greedy InfoMax encoders.

InfoNCE (van den Oord et al. 2018): a query must pick its own key out of ``N`` candidates; the
loss is the cross-entropy of that choice, and ``log N - loss`` is a lower bound on the mutual
information between what the queries and keys are computed from (never above ``log N``).

``SequenceCPC`` applies it to sequences: the context at step ``t`` (the RSSM state, or an encoder
module's output), together with the actions taken at ``t .. t+k-1``, predicts the embedding of
the observation ``k`` steps ahead for ``k = 1..K``; the other batch and time positions of the
same horizon are the negatives. Predictions (one linear map per horizon) and keys (one shared
linear map) are L2-normalised and compared by dot product over a fixed temperature. A pair whose
window crosses an episode start (``is_first`` in ``t+1..t+k``) is no positive, though its key
stays a candidate for the others.

``GreedyInfoMax`` (Loewe et al. 2019) splits an ``Encoder``'s layer stack into ``M`` modules;
module ``i`` gets the *detached* output of module ``i-1``, has its own ``SequenceCPC`` loss on
its own output and its own optimizer, so no gradient crosses a module boundary and each module
can be stepped on its own (one pipeline stage each). The last module's output, detached, is the
embedding the world model above consumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imagine_rl.worldmodels.layers import LayerFactory, symlog
from imagine_rl.worldmodels.networks import Encoder


@dataclass
class CPCSpec:
    """``horizons``: K (predict 1..K steps ahead); ``dim``: projection size; ``temperature``
    divides the cosine similarities; ``actions``: condition predictions on the actions taken in
    between (the future depends on them, so without them the state would have to predict the
    policy)."""

    horizons: int = 3
    dim: int = 64
    temperature: float = 0.1
    actions: bool = True

    def __post_init__(self) -> None:
        if self.horizons < 1:
            raise ValueError(f"cpc horizons: must be >= 1, got {self.horizons}")
        if self.temperature <= 0:
            raise ValueError(f"cpc temperature: must be > 0, got {self.temperature}")


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of ``queries[i]`` against all ``keys`` with ``keys[i]`` the positive.

    Scores are plain dot products over ``temperature`` (normalise first for cosine scores).
    ``valid`` (bool ``[N]``) picks the rows that count as anchors; every key is a candidate.
    Float weights in ``[0, 1]`` work too (a weighted mean over anchors; ``SlotCPC``).
    Returns ``(loss, accuracy)``: mean cross-entropy and the fraction of anchors whose own key
    scores highest, both 0-d. ``log N - loss`` is the mutual-information lower bound.

    Shapes:
        queries ``[N, D]``, keys ``[N, D]``, valid ``[N]``.
    """
    assert queries.dim() == 2 and queries.shape == keys.shape, (
        f"info_nce: queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be [N, D]"
    )
    logits = queries.float() @ keys.float().T / temperature
    target = torch.arange(len(logits), device=logits.device)
    nll = F.cross_entropy(logits, target, reduction="none")
    hit = (logits.argmax(-1) == target).float()
    if valid is None:
        return nll.mean(), hit.mean()
    weight = valid.float()
    count = weight.sum().clamp(min=1.0)
    return (nll * weight).sum() / count, (hit * weight).sum() / count


def mi_bound(loss: torch.Tensor, candidates: int) -> torch.Tensor:
    """The InfoNCE lower bound ``log N - loss`` on the mutual information, in nats."""
    return math.log(candidates) - loss


class SequenceCPC(nn.Module):
    """InfoNCE from contexts ``[B, T, C]`` to the targets ``k = 1..K`` steps ahead.

    ``forward(context, targets, action, is_first)`` returns ``(loss, metrics)``: the mean over
    horizons of the InfoNCE loss, and 0-d metrics ``{prefix}accuracy_k{k}``,
    ``{prefix}mi_bound_k{k}`` (``log N_k - loss_k``, ``N_k = B * (T - k)`` candidates) and
    ``{prefix}mi_bound`` (their mean). Horizons ``k >= T`` are skipped.

    Shapes:
        context ``[B, T, C]``, targets ``[B, T, E]``, action ``[B, T, A]``, is_first ``[B, T]``.
    """

    def __init__(
        self,
        context_dim: int,
        target_dim: int,
        action_dim: int,
        spec: CPCSpec,
        factory: LayerFactory,
        prefix: str = "cpc_",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.prefix = prefix
        self.action_dim = action_dim if spec.actions else 0
        self.target = factory.linear(target_dim, spec.dim, name="target")
        self.predict = nn.ModuleList(
            factory.linear(context_dim + k * self.action_dim, spec.dim, name=f"predict.{k}")
            for k in range(1, spec.horizons + 1)
        )

    def forward(
        self,
        context: torch.Tensor,
        targets: torch.Tensor,
        action: torch.Tensor,
        is_first: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, T = context.shape[:2]
        assert targets.shape[:2] == (B, T) and is_first.shape == (B, T), (
            f"SequenceCPC: context {tuple(context.shape)}, targets {tuple(targets.shape)} and "
            f"is_first {tuple(is_first.shape)} must share [B, T]"
        )
        horizons = [k for k in range(1, self.spec.horizons + 1) if k < T]
        if not horizons:
            raise ValueError(
                f"CPC needs sequences longer than 1 step to predict ahead, got T={T}; "
                "raise replay.batch_length"
            )
        keys_all = F.normalize(self.target(targets).float(), dim=-1)
        # Episode starts seen so far: a window t -> t+k is valid when none lies in t+1..t+k.
        starts = torch.cumsum(is_first.float(), 1)
        losses, metrics = [], {}
        for k in horizons:
            inputs = [context[:, : T - k]]
            if self.action_dim:
                inputs += [action[:, j : T - k + j] for j in range(k)]
            query = F.normalize(self.predict[k - 1](torch.cat(inputs, -1)).float(), dim=-1)
            keys = keys_all[:, k:]
            valid = (starts[:, k:] - starts[:, : T - k]) == 0
            loss, accuracy = info_nce(
                query.reshape(-1, query.shape[-1]),
                keys.reshape(-1, keys.shape[-1]),
                self.spec.temperature,
                valid.reshape(-1),
            )
            losses.append(loss)
            metrics[f"{self.prefix}accuracy_k{k}"] = accuracy.detach()
            metrics[f"{self.prefix}mi_bound_k{k}"] = mi_bound(loss, B * (T - k)).detach()
        metrics[f"{self.prefix}mi_bound"] = torch.stack(
            [metrics[f"{self.prefix}mi_bound_k{k}"] for k in horizons]
        ).mean()
        return torch.stack(losses).mean(), metrics


class SlotCPC(nn.Module):
    """InfoNCE between predicted and observed elements of sets (the slot world model's
    ``loss/cpc``, C-SWM-style contrastive dynamics; ``worldmodels/slots.py``).

    ``forward(predicted, observed, weight)``: element ``i`` of ``predicted [..., F]`` (a
    predicted slot) must pick its own partner ``observed[i]`` (the inferred slot it was
    matched to) out of *every* element of ``observed``: the other elements of the same set,
    and all elements of the other leading positions (other samples, other time steps). Query
    and key are separate linear projections to ``dim``, L2-normalised, scored by dot product
    over ``temperature`` (as ``SequenceCPC``); ``weight [...]`` in ``[0, 1]`` weighs each
    element as an anchor (0: no anchor, still a candidate). Returns ``(loss, metrics)``: the
    weighted mean cross-entropy and ``{prefix}accuracy_k1``, ``{prefix}mi_bound_k1`` and
    ``{prefix}mi_bound`` (``log N - loss``, ``N`` = all elements), the names ``SequenceCPC``
    gives a one-step horizon. Invariant to the order of the elements (applied to both sides).

    Shapes: predicted ``[..., F]``, observed ``[..., F]``, weight ``[...]``.
    """

    def __init__(
        self,
        input_dim: int,
        dim: int,
        temperature: float,
        factory: LayerFactory,
        prefix: str = "cpc_",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"cpc temperature: must be > 0, got {temperature}")
        self.temperature = temperature
        self.prefix = prefix
        self.query = factory.linear(input_dim, dim, name="query")
        self.key = factory.linear(input_dim, dim, name="key")

    def forward(
        self, predicted: torch.Tensor, observed: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert predicted.shape == observed.shape and weight.shape == predicted.shape[:-1], (
            f"SlotCPC: predicted {tuple(predicted.shape)}, observed {tuple(observed.shape)} "
            f"and weight {tuple(weight.shape)} must be [..., F], [..., F] and [...]"
        )
        query = F.normalize(self.query(predicted).float(), dim=-1).flatten(0, -2)
        key = F.normalize(self.key(observed).float(), dim=-1).flatten(0, -2)
        loss, accuracy = info_nce(query, key, self.temperature, weight.reshape(-1))
        bound = mi_bound(loss, len(query)).detach()
        p = self.prefix
        return loss, {
            f"{p}accuracy_k1": accuracy.detach(),
            f"{p}mi_bound_k1": bound,
            f"{p}mi_bound": bound,
        }


def _split(stages: int, modules: int) -> list[tuple[int, int]]:
    """``modules`` contiguous ``[start, stop)`` ranges over ``stages``, sizes within one."""
    sizes = [stages // modules + (i < stages % modules) for i in range(modules)]
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


class GreedyInfoMax(nn.Module):
    """An ``Encoder``'s stack split into ``modules`` greedily trained modules.

    The encoder must have one branch: images (its CNN, a stage being conv + norm + act) or
    vectors (its MLP, a stage being one dense block). The layers stay the encoder's own (acting
    and checkpoints are unchanged, ``forward`` equals ``encoder(obs)`` in value); this module
    adds one ``SequenceCPC`` head per module. Image modules are scored on their feature maps
    average-pooled to ``minres x minres`` and flattened, which keeps coarse positions.

    ``step(i, x, ...)`` trains module ``i`` alone on its (detached) input with its optimizer;
    ``train_step`` runs all of them in order. ``local_losses`` computes every module's loss
    without stepping (for checks).

    Shapes:
        observations ``{key: [B, T, ...]}`` -> embedding ``[B, T, encoder.embed_dim]``.
    """

    def __init__(
        self,
        encoder: Encoder,
        modules: int,
        action_dim: int,
        spec: CPCSpec,
        factory: LayerFactory,
        minres: int = 4,
    ) -> None:
        super().__init__()
        if encoder.image_keys and encoder.vector_keys:
            raise ValueError(
                "world_model.greedy_infomax.modules needs one encoder branch, got images "
                f"{encoder.image_keys} and vectors {encoder.vector_keys}: use env.obs=pixels "
                "or env.obs=state"
            )
        self.images = bool(encoder.image_keys)
        stack = encoder.cnn if self.images else encoder.mlp
        per_stage = 3 if self.images else 1  # conv, norm, act | one dense block
        stages = len(stack) // per_stage
        if not 1 <= modules <= stages:
            raise ValueError(
                f"world_model.greedy_infomax.modules={modules}: the encoder has {stages} "
                f"stages, so use 1..{stages} (0 turns Greedy InfoMax off)"
            )
        self.minres = minres
        self.bounds = [(a * per_stage, b * per_stage) for a, b in _split(stages, modules)]
        # A plain list: the layers are registered (and saved) under the encoder already.
        self._encoder = [encoder]
        dims = []
        for _, stop in self.bounds:
            # Output units of the module's last weight layer (conv / dense block's linear).
            last = stack[stop - 3] if self.images else stack[stop - 1][0]
            units = last.weight.shape[0]
            dims.append(units * minres * minres if self.images else units)
        self.heads = nn.ModuleList(
            SequenceCPC(dim, dim, action_dim, spec, factory.scope(f"greedy.{i}"), f"gim{i}_")
            for i, dim in enumerate(dims)
        )

    @property
    def num_modules(self) -> int:
        return len(self.bounds)

    def _stack(self) -> nn.Sequential:
        encoder = self._encoder[0]
        return encoder.cnn if self.images else encoder.mlp

    def layers(self, i: int) -> nn.Sequential:
        start, stop = self.bounds[i]
        return self._stack()[start:stop]

    def module_parameters(self, i: int) -> list[nn.Parameter]:
        """Module ``i``'s encoder layers and its CPC head: what its optimizer steps."""
        return [*self.layers(i).parameters(), *self.heads[i].parameters()]

    def inputs(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Observations ``{key: [B, T, ...]}`` -> module 0's input ``[B * T, ...]``."""
        encoder = self._encoder[0]
        if self.images:
            x = torch.cat([obs[k] for k in encoder.image_keys], -3)
            return x.reshape(-1, *x.shape[-3:])
        x = torch.cat([obs[k].float() for k in encoder.vector_keys], -1)
        return symlog(x.reshape(-1, x.shape[-1]))

    def module_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.layers(i)(x)

    def local_loss(
        self,
        i: int,
        y: torch.Tensor,
        action: torch.Tensor,
        is_first: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Module ``i``'s CPC loss on its output ``y [B * T, ...]``."""
        B, T = is_first.shape
        if self.images and y.shape[-1] != self.minres:
            y = F.adaptive_avg_pool2d(y, self.minres)
        z = y.reshape(B, T, -1)
        return self.heads[i](z, z, action, is_first)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The embedding ``[B, T, E]`` with every module boundary detached."""
        lead = next(iter(obs.values())).shape[:2]
        x = self.inputs(obs)
        for i in range(self.num_modules):
            x = self.module_forward(i, x.detach())
        return x.detach().reshape(*lead, -1)

    def local_losses(
        self, obs: dict[str, torch.Tensor], action: torch.Tensor, is_first: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(losses, outputs)`` of every module, boundaries detached, nothing stepped."""
        x = self.inputs(obs)
        losses, outputs = [], []
        for i in range(self.num_modules):
            y = self.module_forward(i, x.detach())
            losses.append(self.local_loss(i, y, action, is_first)[0])
            outputs.append(y)
            x = y
        return losses, outputs

    def step(
        self,
        i: int,
        x: torch.Tensor,
        action: torch.Tensor,
        is_first: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None = None,
        update: Callable[[torch.Tensor, torch.optim.Optimizer], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step of module ``i`` on input ``x`` (detached here); returns its
        output (detached, the next module's input) and its metrics. Its graph is freed before
        returning, so only one module's activations are alive at a time.

        ``update(loss, optimizer) -> grad norm`` does backward, clipping and the step (e.g. an
        accelerator's, with loss scaling); by default plain ``backward``, clipping to
        ``grad_clip`` and ``optimizer.step()``."""
        optimizer.zero_grad(set_to_none=True)
        y = self.module_forward(i, x.detach())
        loss, metrics = self.local_loss(i, y, action, is_first)
        if update is not None:
            norm = update(loss, optimizer)
        else:
            loss.backward()
            clip = float("inf") if grad_clip is None else grad_clip
            norm = torch.nn.utils.clip_grad_norm_(self.module_parameters(i), clip, foreach=True)
            optimizer.step()
        metrics[f"gim{i}_grad_norm"] = norm.detach()
        optimizer.zero_grad(set_to_none=True)
        metrics[f"gim{i}_loss"] = loss.detach()
        return y.detach(), metrics

    def train_step(
        self,
        obs: dict[str, torch.Tensor],
        action: torch.Tensor,
        is_first: torch.Tensor,
        optimizers: Sequence[torch.optim.Optimizer],
        grad_clip: float | None = None,
        update: Callable[[torch.Tensor, torch.optim.Optimizer], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Step every module in order (see ``step``); returns the detached embedding
        ``[B, T, E]`` (from the weights before the steps) and the modules' metrics."""
        assert len(optimizers) == self.num_modules, (
            f"GreedyInfoMax.train_step: {len(optimizers)} optimizers for {self.num_modules} modules"
        )
        x = self.inputs(obs)
        metrics: dict[str, torch.Tensor] = {}
        for i, optimizer in enumerate(optimizers):
            x, m = self.step(i, x, action, is_first, optimizer, grad_clip, update)
            metrics.update(m)
        return x.reshape(*is_first.shape, -1), metrics


__all__ = ["CPCSpec", "GreedyInfoMax", "SequenceCPC", "SlotCPC", "info_nce", "mi_bound"]
