"""Actor-critic learned in a world model's imagination (DreamerV3), as one part.

``ActorCritic`` holds the actor, the critic, its slow (EMA) copy and the return normaliser,
and turns posterior states of any world model (``worldmodels.interface``) into named loss
terms: it imagines ``horizon`` steps from every start, computes lambda-returns from the
model's predicted rewards and continues, and returns ``{"actor", "critic",
"replay_critic"}`` (each already weighted) and its metrics. It never steps an optimizer: the
agent decides how the terms are summed and stepped (one Adam per part, or one LaProp).

Gradient paths (each term reaches only its own part): the critic's losses read the features
detached; for dynamics backprop the actor differentiates the returns through the imagined
dynamics and reads the critic through detached copies of its weights; REINFORCE scores the
raw (unclipped) samples with detached advantages. The world model's weights must be frozen
by the caller (``frozen``) when it should get no gradient from imagination; the replay
value loss reaches the world model through ``post`` only with ``replay_critic_grad``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from imagine_rl.worldmodels.behavior import (
    Actor,
    Critic,
    ReturnNormalizer,
    lambda_return,
    replay_lambda_return,
)
from imagine_rl.worldmodels.interface import State, WorldModelInterface, flatten_states
from imagine_rl.worldmodels.layers import LayerFactory


@dataclass
class ActorCriticSpec:
    """Sizes and hyperparameters of ``ActorCritic`` (the ``agent.*`` keys of ``agent=dreamer``
    of the same names; see ``agents.dreamer_config.DreamerAgentConfig``)."""

    horizon: int = 15
    discount: float = 0.997
    return_lambda: float = 0.95
    units: int = 512
    layers: int = 2
    # reinforce (score function) or dynamics (backprop through the imagined dynamics).
    actor_grad: Literal["reinforce", "dynamics"] = "dynamics"
    actor_entropy: float = 3e-4
    actor_unimix: float = 0.01
    actor_min_std: float = 0.1
    actor_max_std: float = 1.0
    critic_bins: int = 255
    actor_scale: float = 1.0
    critic_scale: float = 1.0
    slow_critic_fraction: float = 0.02
    slow_critic_every: int = 1
    slow_critic_reg: float = 1.0
    replay_critic_scale: float = 0.3
    replay_critic_grad: bool = False
    imagine_start_continue: bool = False
    return_norm_decay: float = 0.99
    return_norm_limit: float = 1.0
    return_norm_low: float = 5.0
    return_norm_high: float = 95.0


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s trainable parameters stop requiring gradients inside the block: a graph
    built inside computes no gradient for them (cheaper than computing and discarding it)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class ActorCritic(nn.Module):
    """Policy and value learned on imagined rollouts of a world model.

    ``feat_size``: the world model's feature size; ``gather`` (optional) all-gathers returns
    across ranks for the return normaliser's percentiles (torchrun).
    """

    def __init__(
        self,
        feat_size: int,
        action_dim: int,
        discrete: bool,
        spec: ActorCriticSpec,
        factory: LayerFactory,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if spec.actor_grad == "dynamics" and discrete:
            raise ValueError("agent.actor_grad=dynamics needs continuous actions; use reinforce")
        self.spec = spec
        self.discrete = discrete
        self.dynamics_grad = spec.actor_grad == "dynamics"
        self.actor = Actor(
            feat_size,
            action_dim,
            discrete,
            spec.units,
            spec.layers,
            factory,
            spec.actor_unimix,
            spec.actor_min_std,
            spec.actor_max_std,
        )
        self.critic = Critic(feat_size, spec.units, spec.layers, factory, spec.critic_bins)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.return_norm = ReturnNormalizer(
            spec.return_norm_decay,
            spec.return_norm_limit,
            spec.return_norm_low,
            spec.return_norm_high,
            gather=gather,
        )

    # ---------------------------------------------------------------------------------
    def act(self, feat: torch.Tensor, explore: bool) -> torch.Tensor:
        """The action at features ``[N, F]``: a sample (``explore``) or the mode, continuous
        actions clipped to ``[-1, 1]``; ``[N, A]``."""
        action = self.actor.action(self.actor(feat), sample=explore)
        return action if self.discrete else action.clamp(-1.0, 1.0)

    def imagine(self, world_model: WorldModelInterface, start: State) -> tuple[State, torch.Tensor]:
        """An imagined rollout of ``horizon`` steps from ``start`` and the policy's raw outputs
        at each of its first ``horizon`` states.

        The policy runs once per imagined state; for REINFORCE the rollout itself is not
        differentiated (the policy sees detached features, its samples are detached).

        Shapes: ``start`` ``[N, ...]`` -> states ``[N, H + 1, ...]``, ``action`` and
        ``policy_sample`` ``[N, H, A]``; raw outputs ``[N, H, O]``.
        """
        dynamics = self.dynamics_grad
        raws, samples = [], []

        def policy(state: State) -> torch.Tensor:
            feat = world_model.feat(state)
            with torch.enable_grad():
                raw = self.actor.net(feat if dynamics else feat.detach())
            raws.append(raw)
            sample, action = self.actor.sample(self.actor.dist(raw))
            samples.append(sample.detach())
            return action if dynamics else action.detach()

        with contextlib.nullcontext() if dynamics else torch.no_grad():
            traj = world_model.imagine(policy, start, self.spec.horizon)
        # The raw samples, for REINFORCE's score function (``traj["action"]`` is clipped).
        traj["policy_sample"] = torch.stack(samples, 1)
        return traj, torch.stack(raws, 1)

    def loss(
        self,
        world_model: WorldModelInterface,
        post: State,
        data: dict[str, torch.Tensor],
        pick: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Named, weighted loss terms ``{"actor", "critic", "replay_critic"}`` (0-d) and
        metrics from imagination started at every posterior state (or those at ``pick``).

        Shapes: ``post`` ``[B, T, ...]``, ``data`` ``reward``/``is_first``/``is_last``/
        ``is_terminal`` ``[B, T]``, ``pick`` ``[N]`` indices into ``B * T`` or None.
        """
        s = self.spec
        assert data["is_terminal"].dim() == 2, "data flags must be [B, T]"
        # Imagination starts from the posterior as constants (no path into the world model);
        # only the replay value loss may read it with gradient (replay_critic_grad).
        start = {k: v.detach() for k, v in flatten_states(post).items()}
        start_continue = 1.0 - data["is_terminal"].reshape(-1)
        if pick is not None:
            start = {k: v[pick] for k, v in start.items()}
            start_continue = start_continue[pick]
        traj, actor_raw = self.imagine(world_model, start)
        terms, metrics, boot = self.imagination_loss(world_model, traj, actor_raw, start_continue)
        if s.replay_critic_scale > 0:
            replay_loss, replay_metrics = self.replay_critic_loss(world_model, post, data, boot)
            terms["replay_critic"] = s.critic_scale * s.replay_critic_scale * replay_loss
            metrics.update(replay_metrics)
        return terms, metrics

    def imagination_loss(
        self,
        world_model: WorldModelInterface,
        traj: State,
        actor_raw: torch.Tensor,
        start_continue: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """The actor's and the critic's losses on an imagined trajectory: ``(terms, metrics,
        bootstrap)`` with ``bootstrap`` ``[N]`` the return ``R_0`` of every start (the replay
        value loss's bootstrap).

        Shapes: ``traj`` states ``[N, H + 1, ...]`` and ``policy_sample`` ``[N, H, A]``,
        ``actor_raw`` ``[N, H, O]``, ``start_continue`` ``[N]``.
        """
        s = self.spec
        H = s.horizon
        # Heads run on all H+1 states at once (contiguous; the reward and continue predictions
        # at s_0 go unused: the start's own continue flag is known).
        feat = world_model.feat(traj)  # [N, H+1, F]; only differentiable for dynamics backprop
        reward = world_model.reward(feat)
        cont = self.imagined_continue(world_model, feat, start_continue)
        discount = s.discount * cont
        # The critic's own loss sees the features detached (it must not train the actor), and
        # its logits serve the returns too unless the actor differentiates them.
        logits = self.critic(feat.detach())  # [N, H+1, bins]
        if self.dynamics_grad:
            # Gradient into the features (and through the dynamics into the actor), none into
            # the critic's parameters: the critic read with detached copies of its weights.
            weights = {k: v.detach() for k, v in self.critic.named_parameters()}
            value = self.critic.twohot.decode(
                torch.func.functional_call(self.critic, weights, feat)
            )
        else:
            value = self.critic.twohot.decode(logits).detach()
        ret = lambda_return(reward, discount, value, s.return_lambda)  # [N, H]
        # Weight of each state: the (discounted) probability that the episode reaches it.
        weight = (torch.cumprod(discount[:, :H], 1) / s.discount).detach()

        self.return_norm.update(ret)
        scale = self.return_norm.scale()
        base = value[:, :H].detach()
        dist = self.actor.dist(actor_raw)
        entropy = self.actor.entropy(dist)  # [N, H]
        if self.dynamics_grad:
            objective = (ret - base) / scale
        else:
            advantage = ((ret - base) / scale).detach()
            objective = self.actor.log_prob(dist, traj["policy_sample"]) * advantage
        actor_loss = -(weight * (objective + s.actor_entropy * entropy)).mean()

        target = ret.detach()
        with torch.no_grad():
            slow = self.slow_critic.value(feat.detach())[:, :H]
        critic_nll = -self.critic.twohot.log_prob(logits[:, :H], target)
        critic_reg = -self.critic.twohot.log_prob(logits[:, :H], slow)
        critic_loss = (weight * (critic_nll + s.slow_critic_reg * critic_reg)).mean()

        metrics = {
            "train/actor_entropy": entropy.mean().detach(),
            "train/return_scale": scale.detach(),
            "train/return_low": self.return_norm.low.detach().clone(),
            "train/return_high": self.return_norm.high.detach().clone(),
            "train/imagined_return": ret.mean().detach(),
            "train/imagined_reward": reward[:, 1:].mean().detach(),
            "train/imagined_continue": cont[:, 1:].mean().detach(),
            "train/value": base.mean().detach(),
            "train/advantage": ((ret - base) / scale).mean().detach(),
            "train/critic_nll": critic_nll.mean().detach(),
            "loss/actor": actor_loss.detach(),
            "loss/critic": critic_loss.detach(),
        }
        terms = {"actor": s.actor_scale * actor_loss, "critic": s.critic_scale * critic_loss}
        return terms, metrics, ret[:, 0].detach()

    def imagined_continue(
        self, world_model: WorldModelInterface, feat: torch.Tensor, start_continue: torch.Tensor
    ) -> torch.Tensor:
        """Continue probabilities of the imagined states, no gradient (the discount is not a
        path for the actor's gradient): the continue head's at steps ``1..H``; at step 0 the
        replayed step's own flag ``start_continue``, or the head's prediction there with
        ``imagine_start_continue`` (current DreamerV3: its weight of step 0 is the predicted
        continue of the start state).

        Shapes: ``feat`` ``[N, H+1, F]``, ``start_continue`` ``[N]`` -> ``[N, H+1]``.
        """
        with torch.no_grad():
            cont = world_model.continue_prob(feat)
        if self.spec.imagine_start_continue:
            return cont
        return torch.cat([start_continue[:, None], cont[:, 1:]], 1)

    def replay_critic_loss(
        self,
        world_model: WorldModelInterface,
        post: State,
        data: dict[str, torch.Tensor],
        boot: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Critic loss on the replayed sequences (DreamerV3's replay value loss), unweighted.

        Targets are lambda-returns along the real sequence: real rewards and continues, and at
        every step the imagined return ``R_0`` started from that state as the bootstrap
        (``boot``, or the critic's own value when imagination started from a subset). A step
        whose successor begins a new episode falls back to its bootstrap. An episode's last
        step has no return of its own to learn (its target would be its own bootstrap): its
        weight is ``1 - is_last``, as DreamerV3's repval loss.

        With ``replay_critic_grad`` the loss also backpropagates into the world model through
        ``post`` (when ``post`` carries its graph), as DreamerV3's ``repval_grad``: the targets
        (returns and the slow critic) stay constants either way.

        Shapes: ``post`` ``[B, T, ...]``, ``data`` ``[B, T]`` flags, ``boot`` ``[B * T]`` or
        ``[N]`` (a subset); returns a 0-d loss.
        """
        s = self.spec
        B, T = data["reward"].shape
        feat = world_model.feat(post)
        if not s.replay_critic_grad:
            feat = feat.detach()
        logits = self.critic(feat)  # [B, T, bins]
        if boot.numel() == B * T:
            boot = boot.reshape(B, T)
        else:
            boot = self.critic.twohot.decode(logits).detach()
        discount = s.discount * (1.0 - data["is_terminal"])
        target = replay_lambda_return(
            data["reward"], discount, boot, data["is_first"], s.return_lambda
        )  # [B, T - 1]
        with torch.no_grad():
            slow = self.slow_critic.value(feat.detach())[:, :-1]
        nll = -self.critic.twohot.log_prob(logits[:, :-1], target)
        reg = -self.critic.twohot.log_prob(logits[:, :-1], slow)
        weight = 1.0 - data["is_last"][:, :-1]
        loss = (weight * (nll + s.slow_critic_reg * reg)).mean()
        return loss, {
            "train/replay_critic_nll": nll.mean().detach(),
            "train/replay_return": target.mean().detach(),
        }

    @torch.no_grad()
    def update_slow_critic(self, updates: int) -> None:
        """After the step of update number ``updates`` (0 for the first): every
        ``slow_critic_every`` updates, move the slow critic toward the critic by
        ``slow_critic_fraction``."""
        if updates % self.spec.slow_critic_every:
            return
        slow, fast = self._slow_and_fast()
        torch._foreach_lerp_(slow, fast, self.spec.slow_critic_fraction)

    @torch.no_grad()
    def sync_slow_critic(self) -> None:
        """Set the slow critic to the critic, as at construction (after the critic's weights
        changed outside training, e.g. sparse masks zeroed some)."""
        slow, fast = self._slow_and_fast()
        torch._foreach_copy_(slow, fast)

    def _slow_and_fast(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Pair parameters by name, ignoring parametrizations (sparse masks put ``weight``
        # under ``parametrizations.weight.original``), so the order of the lists cannot drift.
        def canonical(name: str) -> str:
            return name.replace("parametrizations.", "").replace(".original", "")

        fast = {canonical(n): p for n, p in self.critic.named_parameters()}
        slow = {canonical(n): p for n, p in self.slow_critic.named_parameters()}
        names = sorted(slow)
        return [slow[n] for n in names], [fast[n].detach() for n in names]


__all__ = ["ActorCritic", "ActorCriticSpec", "frozen"]
