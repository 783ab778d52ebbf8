"""Recurrent state-space model (RSSM): a deterministic GRU path plus a stochastic latent.

State of the model at one step (a dict of tensors):

- ``deter``: the GRU state ``h_t`` ``[..., deter]``;
- ``stoch``: the latent sample ``z_t``: one-hot ``[..., stoch, classes]`` for the categorical
  latent (straight-through gradients), ``[..., stoch]`` for the Gaussian one;
- the distribution parameters of ``z_t``: ``logits [..., stoch, classes]`` (categorical) or
  ``mean``/``std`` ``[..., stoch]`` (Gaussian).

Transition (DreamerV3 style): ``h_t = GRU(h_{t-1}, z_{t-1}, a_{t-1})`` where the three inputs
are each projected to ``hidden`` units (linear, norm, SiLU), concatenated, and fed into a
block-diagonal GRU of ``blocks`` blocks (each block sees all inputs plus its own slice of
``h_{t-1}``; the recurrent weights are block-diagonal). The prior ``p(z_t | h_t)`` is an MLP on
``h_t``; the posterior ``q(z_t | h_t, e_t)`` an MLP on ``h_t`` and the observation embedding.
With ``factored.groups = G > 0`` the transition and the prior factor over ``G`` groups of the
state along a sparse dependency graph (``worldmodels.factored``; ``graph`` is its adjacency).

Shapes:
    ``observe(embed [B, T, E], action [B, T, A], is_first [B, T], state=None)`` returns
    ``(post, prior)``, dicts of ``[B, T, ...]`` tensors; ``action[:, t]`` is the action taken
    *at* step ``t`` (the replay convention), so step ``t`` consumes ``action[:, t - 1]`` (from
    ``state["action"]`` for ``t = 0``, zeros without a state) and zeros where ``is_first``.
    ``imagine(policy, start [N, ...], horizon)`` returns ``deter``/``stoch``
    ``[N, horizon + 1, ...]`` (the start first) and ``action [N, horizon, A]``, the action taken at each of the first
    ``horizon`` states. ``initial(batch)`` returns ``deter [batch, D]`` and ``stoch``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from imagine_rl.worldmodels.factored import FactoredPrior, FactoredSpec, FactoredTransition
from imagine_rl.worldmodels.layers import LayerFactory, NormalDist, OneHotDist

State = dict[str, torch.Tensor]


@dataclass
class RSSMSettings:
    """The RSSM's sizes and choices a user sets. The Dreamer's ``world_model`` config section
    extends this class (``agents.dreamer_config.WorldModelConfig``), so each field is defined
    once, here; ``metadata["min"]`` is the lower bound the run config checks."""

    # GRU state size and hidden width.
    deter: int = field(default=512, metadata={"min": 1})
    hidden: int = field(default=512, metadata={"min": 1})
    # Categorical: ``stoch`` groups of ``classes`` classes. Gaussian: ``stoch`` dimensions.
    stoch: int = field(default=32, metadata={"min": 1})
    classes: int = field(default=32, metadata={"min": 1})
    latent: Literal["categorical", "gaussian"] = "categorical"
    # Share of the uniform distribution mixed into the categorical latent (DreamerV3's 1%).
    unimix: float = field(default=0.01, metadata={"min": 0})
    # Blocks of the block-diagonal GRU (deter must divide by it).
    blocks: int = field(default=8, metadata={"min": 1})
    prior_layers: int = field(default=2, metadata={"min": 1})
    post_layers: int = field(default=1, metadata={"min": 1})
    # The initial state: learned (DreamerV3) or zeros.
    initial: Literal["learned", "zero"] = "learned"


@dataclass
class RSSMConfig(RSSMSettings):
    """``RSSMSettings`` plus what the agent decides: the Gaussian latent's floor and the
    factored dynamics (with its run-derived schedule)."""

    min_std: float = 0.1  # Gaussian latent only
    # groups > 0: the factored transition and prior (worldmodels.factored); `blocks` unused.
    factored: FactoredSpec = field(default_factory=FactoredSpec)

    def __post_init__(self) -> None:
        if self.latent not in ("categorical", "gaussian"):
            raise ValueError(f"latent: expected 'categorical' or 'gaussian', got {self.latent!r}")
        if self.initial not in ("learned", "zero"):
            raise ValueError(f"initial: expected 'learned' or 'zero', got {self.initial!r}")
        self.factored.check(self.deter, self.hidden, self.stoch)
        if not self.factored.groups and self.deter % self.blocks:
            raise ValueError(f"deter ({self.deter}) must be divisible by blocks ({self.blocks})")

    @property
    def stoch_shape(self) -> tuple[int, ...]:
        return (self.stoch, self.classes) if self.latent == "categorical" else (self.stoch,)

    @property
    def stoch_size(self) -> int:
        return self.stoch * self.classes if self.latent == "categorical" else self.stoch

    @property
    def feat_size(self) -> int:
        return self.deter + self.stoch_size


class RSSM(nn.Module):
    """See the module docstring. ``factory`` builds every weight layer."""

    def __init__(
        self, config: RSSMConfig, action_dim: int, embed_dim: int, factory: LayerFactory
    ) -> None:
        super().__init__()
        self.config = c = config
        self.action_dim, self.embed_dim = action_dim, embed_dim
        f = factory.scope("rssm")
        stats = 2 * c.stoch if c.latent == "gaussian" else c.stoch * c.classes
        # Factored dynamics (c.factored.groups > 0) replace the dense core and prior.
        self.transition: FactoredTransition | None = None
        self.factored_prior: FactoredPrior | None = None
        if c.factored.groups:
            self.action_in = f.dense(action_dim, c.hidden, name="in.action")
            self.transition = FactoredTransition(c.factored, c.deter, c.hidden, c.stoch_size, f)
            self.factored_prior = FactoredPrior(
                c.factored, c.deter, c.hidden, c.prior_layers, stats, c.latent == "gaussian", f
            )
        else:
            per_block = c.deter // c.blocks
            self.deter_in = f.dense(c.deter, c.hidden, name="in.deter")
            self.stoch_in = f.dense(c.stoch_size, c.hidden, name="in.stoch")
            self.action_in = f.dense(action_dim, c.hidden, name="in.action")
            self.gru_hidden = f.block_linear(
                3 * c.hidden + per_block, per_block, c.blocks, name="gru.hidden", bias=False
            )
            self.gru_norm = f.norm(c.deter)
            self.gru_act = f.act()
            self.gru_gates = f.block_linear(per_block, 3 * per_block, c.blocks, name="gru.gates")
            self.prior_net = f.mlp(c.deter, c.hidden, c.prior_layers, name="prior")
            prior_in = c.hidden if c.prior_layers else c.deter
            self.prior_out = f.linear(prior_in, stats, name="prior.out")
        self.post_net = f.mlp(c.deter + embed_dim, c.hidden, c.post_layers, name="post")
        post_in = c.hidden if c.post_layers else c.deter + embed_dim
        self.post_out = f.linear(post_in, stats, name="post.out")
        if c.initial == "learned":
            self.init_deter = nn.Parameter(torch.zeros(c.deter))

    @property
    def graph(self):
        """The factored dynamics' ``FactorGraphLinear`` (adjacency, schedule), or None."""
        return self.transition.graph if self.transition is not None else None

    # ---------------------------------------------------------------------------------
    # Distributions and features
    # ---------------------------------------------------------------------------------
    def _stats(self, raw: torch.Tensor) -> State:
        c = self.config
        raw = raw.float()
        if c.latent == "categorical":
            return {"logits": raw.reshape(*raw.shape[:-1], c.stoch, c.classes)}
        mean, std = raw.chunk(2, -1)
        return {"mean": mean, "std": F.softplus(std) + c.min_std}

    def dist(self, stats: State) -> OneHotDist | NormalDist:
        if self.config.latent == "categorical":
            return OneHotDist(stats["logits"], self.config.unimix)
        return NormalDist(stats["mean"], stats["std"])

    def _sample(self, stats: State, sample: bool) -> torch.Tensor:
        dist = self.dist(stats)
        return dist.sample() if sample else dist.mode()

    def feat(self, state: State) -> torch.Tensor:
        """Model features ``[..., deter + stoch_size]`` (input to heads, actor and critic)."""
        stoch = state["stoch"]
        stoch = stoch.reshape(*stoch.shape[: stoch.dim() - len(self.config.stoch_shape)], -1)
        return torch.cat([state["deter"], stoch.to(state["deter"].dtype)], -1)

    def kl(self, lhs: State, rhs: State) -> torch.Tensor:
        """``KL(lhs || rhs)`` summed over the latent, shape ``[...]``."""
        # Categorical: the class axis is already reduced; sum the groups (or Gaussian dims).
        return self.dist(lhs).kl(self.dist(rhs)).sum(-1)

    def entropy(self, stats: State) -> torch.Tensor:
        ent = self.dist(stats).entropy()
        return ent.sum(-1)

    # ---------------------------------------------------------------------------------
    # Steps
    # ---------------------------------------------------------------------------------
    def initial(self, batch: int, device: torch.device | None = None) -> State:
        """The reset state ``deter [batch, D]``, ``stoch [batch, *stoch_shape]``.

        Learned: ``deter = tanh(w)`` for a learned ``w`` and ``stoch`` the prior's mode there.
        """
        c = self.config
        if c.initial == "zero":
            device = device or self.post_out.weight.device
            deter = torch.zeros(batch, c.deter, device=device)
            return {"deter": deter, "stoch": torch.zeros(batch, *c.stoch_shape, device=device)}
        deter = torch.tanh(self.init_deter.float())[None].expand(batch, c.deter)
        stats = self.prior_stats(deter[:1])
        stoch = self._sample(stats, sample=False).expand(batch, *c.stoch_shape)
        return {"deter": deter, "stoch": stoch}

    def action_features(self, action: torch.Tensor) -> torch.Tensor:
        """Projection of (previous) actions into the GRU's input; batched over any axes."""
        return self.action_in(action)

    def core(self, deter: torch.Tensor, stoch: torch.Tensor, action_feat: torch.Tensor):
        """One GRU step ``h_{t-1}, z_{t-1}, proj(a_{t-1}) -> h_t``."""
        c = self.config
        if self.transition is not None:
            return self.transition(deter, stoch.reshape(stoch.shape[0], -1), action_feat)
        flat = stoch.reshape(stoch.shape[0], -1).to(deter.dtype)
        x = torch.cat([self.deter_in(deter), self.stoch_in(flat), action_feat.to(deter.dtype)], -1)
        blocks = deter.reshape(deter.shape[0], c.blocks, -1)
        x = torch.cat([x[:, None].expand(-1, c.blocks, -1), blocks.to(x.dtype)], -1)
        x = self.gru_hidden(x).reshape(deter.shape[0], c.deter)
        x = self.gru_act(self.gru_norm(x)).reshape(deter.shape[0], c.blocks, -1)
        reset, cand, update = self.gru_gates(x).float().chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1.0)
        new = update * cand + (1.0 - update) * blocks.float()
        return new.reshape(deter.shape[0], c.deter)

    def prior_stats(self, deter: torch.Tensor) -> State:
        if self.factored_prior is not None:
            return self._stats(self.factored_prior(deter))
        return self._stats(self.prior_out(self.prior_net(deter)))

    def obs_step(
        self,
        deter: torch.Tensor,
        stoch: torch.Tensor,
        action_feat: torch.Tensor,
        embed: torch.Tensor,
        keep: torch.Tensor,
        init_deter: torch.Tensor,
        init_stoch: torch.Tensor,
        sample: bool = True,
    ):
        """Reset where ``keep == 0``, step the GRU, return ``deter, stoch, posterior stats``.

        ``action_feat`` is already the projection of the (masked) previous action.
        """
        deter = keep[:, None] * deter + (1 - keep[:, None]) * init_deter
        mask = keep.reshape(-1, *([1] * (stoch.dim() - 1)))
        stoch = mask * stoch + (1 - mask) * init_stoch
        deter = self.core(deter, stoch, action_feat)
        raw = self.post_out(self.post_net(torch.cat([deter, embed.to(deter.dtype)], -1)))
        stats = self._stats(raw)
        return deter, self._sample(stats, sample), stats

    def img_step(
        self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, sample: bool = True
    ):
        """One prior step ``(h, z, a) -> h', z' ~ p(z' | h')``; returns ``deter, stoch, stats``."""
        deter = self.core(deter, stoch, self.action_features(action))
        stats = self.prior_stats(deter)
        return deter, self._sample(stats, sample), stats

    # ---------------------------------------------------------------------------------
    # Sequences
    # ---------------------------------------------------------------------------------
    def observe(
        self,
        embed: torch.Tensor,
        action: torch.Tensor,
        is_first: torch.Tensor,
        state: State | None = None,
        sample: bool = True,
    ) -> tuple[State, State]:
        """Posterior and prior over a sequence; see the module docstring for the alignment.

        ``state`` (optional) carries ``deter``, ``stoch`` and ``action`` (the last action
        taken) from a previous call; without it, the sequence starts from ``initial``.
        Returns ``post`` (``deter``, ``stoch``, posterior stats) and ``prior`` (``deter``,
        ``stoch`` sampled from the prior, prior stats), each ``[B, T, ...]``.
        """
        B, T = embed.shape[:2]
        init = self.initial(B, embed.device)
        if state is None:  # contiguous copies: one memory layout for every step (compile)
            state = {k: v.contiguous() for k, v in init.items()}
            state["action"] = torch.zeros(B, self.action_dim, device=embed.device)
        keep = 1.0 - is_first.float()  # [B, T]
        prev_action = torch.cat([state["action"][:, None].to(action.dtype), action[:, :-1]], 1)
        prev_action = prev_action * keep[..., None]
        action_feat = self.action_features(prev_action)  # [B, T, hidden]
        deter, stoch = state["deter"], state["stoch"]
        deters, stochs, stats = [], [], []
        for t in range(T):
            deter, stoch, st = self.obs_step(
                deter,
                stoch,
                action_feat[:, t],
                embed[:, t],
                keep[:, t],
                init["deter"],
                init["stoch"],
                sample,
            )
            deters.append(deter)
            stochs.append(stoch)
            stats.append(st)
        post = {"deter": torch.stack(deters, 1), "stoch": torch.stack(stochs, 1)}
        for key in stats[0]:
            post[key] = torch.stack([s[key] for s in stats], 1)
        prior = self.prior_stats(post["deter"])
        prior = {"deter": post["deter"], "stoch": self._sample(prior, sample), **prior}
        return post, prior

    def imagine(
        self,
        policy: Callable[[State], torch.Tensor],
        start: State,
        horizon: int,
        sample: bool = True,
    ) -> State:
        """Roll the prior forward under ``policy(state) -> action [N, A]`` for ``horizon`` steps.

        Returns ``deter``/``stoch`` ``[N, horizon + 1, ...]`` (index 0 is ``start``) and
        ``action [N, horizon, A]``.
        """
        deter, stoch = start["deter"], start["stoch"]
        deters, stochs, actions = [deter], [stoch], []
        for _ in range(horizon):
            action = policy({"deter": deter, "stoch": stoch})
            deter, stoch, _ = self.img_step(deter, stoch, action, sample)
            deters.append(deter)
            stochs.append(stoch)
            actions.append(action)
        return {
            "deter": torch.stack(deters, 1),
            "stoch": torch.stack(stochs, 1),
            "action": torch.stack(actions, 1),
        }

    def rollout(self, start: State, actions: torch.Tensor, sample: bool = True) -> State:
        """Open-loop prior rollout under given ``actions [N, K, A]``: states ``[N, K, ...]``
        after each action (the start is not included)."""
        deter, stoch = start["deter"], start["stoch"]
        deters, stochs = [], []
        for t in range(actions.shape[1]):
            deter, stoch, _ = self.img_step(deter, stoch, actions[:, t], sample)
            deters.append(deter)
            stochs.append(stoch)
        return {"deter": torch.stack(deters, 1), "stoch": torch.stack(stochs, 1)}
