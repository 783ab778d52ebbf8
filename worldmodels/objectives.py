"""The Dreamer world model's training objectives as parts, chosen by ``spec.representation``.

Each objective is a small callable that turns what one world-model pass computed into unscaled
loss terms (0-d tensors, keys ``loss/...``) and 0-d diagnostics (keys ``world_model/...``):

- ``ReconstructionObjective(decoder)`` -> ``loss/reconstruction`` (representations
  ``reconstruction`` and ``reconstruction+cpc``);
- ``ContrastiveObjective(sequence_cpc)`` -> ``loss/cpc`` (``reconstruction+cpc`` and ``cpc``);
- ``RewardContinueObjective(reward_head, continue_head, twohot)`` -> ``loss/reward``,
  ``loss/continue`` (always);
- ``GraphObjective(graph)`` -> ``loss/graph`` for the ``l1`` graph of factored dynamics, and
  the graph's metrics (factored dynamics only);
- ``KLObjective(rssm, free_nats)`` -> ``loss/dynamics``, ``loss/representation`` (always).

Each has a call with its own inputs (``__call__``, documented with ``Shapes:``), which is what
the tests use, and ``apply(step)`` that picks those inputs out of an ``ObjectiveInputs``, which
is what ``WorldModel`` loops over. ``objectives_for`` builds the list, in the order in which
their losses are summed.

Objectives own no parameters: they hold references to the world model's modules (decoder,
heads, ``SequenceCPC``, RSSM) in plain attributes, never as registered submodules, so the world
model's module tree, its parameter names and their order (checkpoints, sparse masks, optimizer
state) do not depend on them. ``WorldModel`` builds them afresh for each loss, so they always
see its current modules (after ``.to``, a deep copy or a swapped layer). Sparse layers stay a
property of whichever model was built.

The encoder-side objective is Greedy InfoMax (``worldmodels.cpc.GreedyInfoMax``): with
``spec.greedy_modules > 0`` every encoder module is trained by its own ``SequenceCPC`` loss and
optimizer (``GreedyInfoMax.train_step``), and the objectives here see its output detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from imagine_rl.worldmodels.layers import TwoHot, symlog

Losses = dict[str, torch.Tensor]
Metrics = dict[str, torch.Tensor]


@dataclass
class ObjectiveInputs:
    """What one world-model pass computed, for ``Objective.apply``.

    Shapes:
        batch: replay batch, ``[B, T, ...]`` (observation keys, ``action [B, T, A]``,
        ``reward``, ``is_first``, ``is_terminal`` ``[B, T]``); post/prior: RSSM states
        ``[B, T, ...]`` (distribution statistics besides ``deter``/``stoch``); feat: the
        posterior's model features ``[B, T, F]``; embed: the encoder output ``[B, T, E]``.
    """

    batch: dict[str, torch.Tensor]
    post: dict[str, torch.Tensor]
    prior: dict[str, torch.Tensor]
    feat: torch.Tensor
    embed: torch.Tensor


class Objective(Protocol):
    """A loss part: ``keys`` are the loss terms it returns from ``apply``."""

    keys: tuple[str, ...]

    def apply(self, step: ObjectiveInputs) -> tuple[Losses, Metrics]: ...


class ReconstructionObjective:
    """``loss/reconstruction``: the decoder's squared error, summed over each observation's
    dims (vectors against ``symlog`` of the target, images against the target as is), summed
    over observation keys and averaged over batch and time. Metrics
    ``world_model/recon_<key>``: each key's error, averaged over batch and time.

    Shapes:
        feat ``[B, T, F]``; batch: the decoder's observation keys, ``[B, T, D]`` vectors and
        ``[B, T, C, H, W]`` images (floats in ``[-0.5, 0.5]``).
    """

    keys = ("loss/reconstruction",)

    def __init__(self, decoder: nn.Module) -> None:
        self._modules = [decoder]  # a reference, not a submodule

    @property
    def decoder(self) -> nn.Module:
        return self._modules[0]

    def __call__(
        self, feat: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[Losses, Metrics]:
        decoder = self.decoder
        recon = decoder(feat)
        metrics: Metrics = {}
        rec = 0.0
        for key in decoder.vector_keys:
            err = (recon[key].float() - symlog(batch[key].float())).square().sum(-1)
            metrics[f"world_model/recon_{key}"] = err.mean().detach()
            rec = rec + err
        for key in decoder.image_keys:
            err = (recon[key].float() - batch[key].float()).square().sum((-3, -2, -1))
            metrics[f"world_model/recon_{key}"] = err.mean().detach()
            rec = rec + err
        return {"loss/reconstruction": rec.mean()}, metrics

    def apply(self, step: ObjectiveInputs) -> tuple[Losses, Metrics]:
        return self(step.feat, step.batch)


class ContrastiveObjective:
    """``loss/cpc``: ``SequenceCPC``'s InfoNCE from the posterior features at ``t`` (with the
    actions in between) to the embeddings at ``t + k``. Metrics: its ``cpc_accuracy_k<k>``,
    ``cpc_mi_bound_k<k>`` and ``cpc_mi_bound``, under ``world_model/``.

    Shapes:
        feat ``[B, T, F]``, embed ``[B, T, E]``, action ``[B, T, A]``, is_first ``[B, T]``.
    """

    keys = ("loss/cpc",)

    def __init__(self, sequence_cpc: nn.Module) -> None:
        self._modules = [sequence_cpc]  # a reference, not a submodule

    @property
    def cpc(self) -> nn.Module:
        return self._modules[0]

    def __call__(
        self,
        feat: torch.Tensor,
        embed: torch.Tensor,
        action: torch.Tensor,
        is_first: torch.Tensor,
    ) -> tuple[Losses, Metrics]:
        cpc, cpc_metrics = self.cpc(feat, embed, action, is_first)
        return {"loss/cpc": cpc}, {f"world_model/{k}": v for k, v in cpc_metrics.items()}

    def apply(self, step: ObjectiveInputs) -> tuple[Losses, Metrics]:
        return self(step.feat, step.embed, step.batch["action"], step.batch["is_first"])


class RewardContinueObjective:
    """``loss/reward``: the two-hot negative log-likelihood of the reward (``symlog`` space,
    ``twohot``'s bins); ``loss/continue``: binary cross-entropy of the continue logit against
    ``1 - is_terminal``; both averaged over batch and time. Metrics ``world_model/
    reward_error`` (mean absolute error of the two-hot mean), ``reward_pred_mean`` and
    ``continue_accuracy``.

    Shapes:
        feat ``[B, T, F]``, reward ``[B, T]``, is_terminal ``[B, T]``.
    """

    keys = ("loss/reward", "loss/continue")

    def __init__(self, reward_head: nn.Module, continue_head: nn.Module, twohot: TwoHot) -> None:
        self._modules = [reward_head, continue_head, twohot]  # references, not submodules

    def __call__(
        self, feat: torch.Tensor, reward: torch.Tensor, is_terminal: torch.Tensor
    ) -> tuple[Losses, Metrics]:
        reward_head, continue_head, twohot = self._modules
        losses: Losses = {}
        reward_logits = reward_head(feat)
        losses["loss/reward"] = -twohot.log_prob(reward_logits, reward).mean()
        cont_logits = continue_head(feat).float().squeeze(-1)
        cont_target = 1.0 - is_terminal.float()
        losses["loss/continue"] = F.binary_cross_entropy_with_logits(cont_logits, cont_target)
        with torch.no_grad():
            reward_pred = twohot.decode(reward_logits)
            metrics = {
                "world_model/reward_error": (reward_pred - reward.float()).abs().mean(),
                "world_model/reward_pred_mean": reward_pred.mean(),
                "world_model/continue_accuracy": (
                    ((cont_logits > 0).float() == cont_target).float().mean()
                ),
            }
        return losses, metrics

    def apply(self, step: ObjectiveInputs) -> tuple[Losses, Metrics]:
        return self(step.feat, step.batch["reward"], step.batch["is_terminal"])


class GraphObjective:
    """Factored dynamics: ``loss/graph``, the ``l1`` gate penalty (already scaled by
    ``l1_scale``; absent for fixed graphs), and the graph's ``world_model/graph_*`` metrics.

    Shapes:
        no inputs; the penalty is a 0-d tensor over the graph's ``[G, G]`` gates.
    """

    keys = ("loss/graph",)

    def __init__(self, graph: nn.Module) -> None:
        self._modules = [graph]  # a reference, not a submodule

    def __call__(self) -> tuple[Losses, Metrics]:
        graph = self._modules[0]
        losses: Losses = {}
        penalty = graph.penalty()
        if penalty is not None:
            losses["loss/graph"] = penalty
        return losses, dict(graph.metrics())

    def apply(self, step: ObjectiveInputs) -> tuple[Losses, Metrics]:
        return self()


class KLObjective:
    """KL balancing with free bits. ``loss/dynamics``: ``KL(sg(post) || prior)`` (trains the
    prior only); ``loss/representation``: ``KL(post || sg(prior))`` (trains the posterior
    only); each summed over the latent, clamped below at ``free_nats`` per step, averaged over
    batch and time. Metrics ``world_model/kl`` (the unclamped mean), ``prior_entropy``,
    ``posterior_entropy``.

    Shapes:
        post, prior: RSSM states ``[B, T, ...]``; their statistics (every key but ``deter``
        and ``stoch``) are what the KL reads.
    """

    keys = ("loss/dynamics", "loss/representation")

    def __init__(self, rssm: nn.Module, free_nats: float) -> None:
        self._modules = [rssm]  # a reference, not a submodule
        self.free_nats = free_nats

    def __call__(
        self, post: dict[str, torch.Tensor], prior: dict[str, torch.Tensor]
    ) -> tuple[Losses, Metrics]:
        rssm = self._modules[0]
        stats = [k for k in post if k not in ("deter", "stoch")]
        post_sg = {k: post[k].detach() for k in stats}
        prior_sg = {k: prior[k].detach() for k in stats}
        post_d = {k: post[k] for k in stats}
        prior_d = {k: prior[k] for k in stats}
        dyn = rssm.kl(post_sg, prior_d)
        rep = rssm.kl(post_d, prior_sg)
        losses = {
            "loss/dynamics": dyn.clamp(min=self.free_nats).mean(),
            "loss/representation": rep.clamp(min=self.free_nats).mean(),
        }
        with torch.no_grad():
            metrics = {
                "world_model/kl": dyn.mean(),
                "world_model/prior_entropy": rssm.entropy(prior_sg).mean(),
                "world_model/posterior_entropy": rssm.entropy(post_sg).mean(),
            }
        return losses, metrics

    def apply(self, step: ObjectiveInputs) -> tuple[Losses, Metrics]:
        return self(step.post, step.prior)


def objectives_for(
    representation: str,
    *,
    rssm: nn.Module,
    reward_head: nn.Module,
    continue_head: nn.Module,
    twohot: TwoHot,
    free_nats: float,
    decoder: nn.Module | None = None,
    cpc: nn.Module | None = None,
) -> list[Objective]:
    """The objectives of a Dreamer world model, in the order its losses are summed:
    reconstruction (unless ``representation == "cpc"``), contrastive (when ``"cpc"`` is in
    it), reward and continue, the factored graph (when ``rssm.graph`` exists), then the KL
    terms. ``decoder`` / ``cpc`` must be given exactly when the representation uses them."""
    out: list[Objective] = []
    if representation != "cpc":
        if decoder is None:
            raise ValueError(f"representation {representation!r} needs a decoder")
        out.append(ReconstructionObjective(decoder))
    if "cpc" in representation:
        if cpc is None:
            raise ValueError(f"representation {representation!r} needs a SequenceCPC")
        out.append(ContrastiveObjective(cpc))
    out.append(RewardContinueObjective(reward_head, continue_head, twohot))
    graph = getattr(rssm, "graph", None)
    if graph is not None:
        out.append(GraphObjective(graph))
    out.append(KLObjective(rssm, free_nats))
    return out
