"""Actor-critic pieces learned in imagination (DreamerV3): policy and value networks,
lambda-returns and the percentile return normaliser.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from imagine_rl.worldmodels.layers import LayerFactory, NormalDist, OneHotDist, TwoHot
from imagine_rl.worldmodels.networks import Head


def lambda_return(
    reward: torch.Tensor, discount: torch.Tensor, value: torch.Tensor, lam: float
) -> torch.Tensor:
    """TD(lambda) returns along an imagined trajectory of ``H + 1`` states ``s_0 .. s_H``.

    All inputs are ``[N, H + 1]``, index ``i`` belonging to state ``s_i``: ``reward[:, i]`` is
    received on arriving at ``s_i``, ``discount[:, i]`` is ``gamma * P(continue at s_i)`` and
    ``value[:, i]`` the critic's estimate at ``s_i`` (index 0 of ``reward``/``discount`` is
    unused). Returns ``R_0 .. R_{H-1}`` ``[N, H]`` with ``R_H = v_H`` and

        ``R_t = r_{t+1} + d_{t+1} * ((1 - lam) * v_{t+1} + lam * R_{t+1})``.
    """
    horizon = value.shape[1] - 1
    ret = value[:, -1]
    out = []
    for t in reversed(range(horizon)):
        ret = reward[:, t + 1] + discount[:, t + 1] * ((1 - lam) * value[:, t + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1], 1)


def replay_lambda_return(
    reward: torch.Tensor,
    discount: torch.Tensor,
    bootstrap: torch.Tensor,
    is_first: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """TD(lambda) returns along a replayed sequence, for DreamerV3's replay value loss.

    All inputs are ``[B, T]`` in the replay convention (``reward[:, t]`` received on arriving at
    step ``t``, ``discount[:, t]`` is ``gamma * (1 - is_terminal[:, t])``); ``bootstrap[:, t]`` is
    the value estimate at step ``t`` (DreamerV3: the imagined return started there). Returns
    ``R_0 .. R_{T-2}`` ``[B, T - 1]`` with ``R_{T-1} = bootstrap[:, T-1]`` and

        ``R_t = r_{t+1} + d_{t+1} * ((1 - lam) * b_{t+1} + lam * R_{t+1})``,

    except ``R_t = b_t`` where step ``t + 1`` starts a new episode (``is_first``).
    """
    same_episode = 1.0 - is_first[:, 1:].float()
    ret, out = bootstrap[:, -1], []
    for t in reversed(range(reward.shape[1] - 1)):
        step = reward[:, t + 1] + discount[:, t + 1] * ((1 - lam) * bootstrap[:, t + 1] + lam * ret)
        ret = same_episode[:, t] * step + (1 - same_episode[:, t]) * bootstrap[:, t]
        out.append(ret)
    return torch.stack(out[::-1], 1)


class Actor(nn.Module):
    """Policy ``pi(a | s)`` on model features.

    Discrete: a categorical over ``action_dim`` one-hot actions with ``unimix`` uniform mixing.
    Continuous: a diagonal Gaussian with ``tanh`` mean and std in ``[min_std, max_std]``;
    samples are reparameterised (for dynamics backprop) and clipped to ``[-1, 1]`` with a
    straight-through gradient by ``action``.
    """

    def __init__(
        self,
        feat_dim: int,
        action_dim: int,
        discrete: bool,
        units: int,
        layers: int,
        factory: LayerFactory,
        unimix: float = 0.01,
        min_std: float = 0.1,
        max_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.discrete, self.action_dim = discrete, action_dim
        self.unimix, self.min_std, self.max_std = unimix, min_std, max_std
        out = action_dim if discrete else 2 * action_dim
        self.net = Head(feat_dim, out, units, layers, factory, "actor", outscale=0.01)

    def forward(self, feat: torch.Tensor) -> OneHotDist | NormalDist:
        return self.dist(self.net(feat))

    def dist(self, raw: torch.Tensor) -> OneHotDist | NormalDist:
        """The action distribution from the network's raw outputs ``net(feat)``."""
        raw = raw.float()
        if self.discrete:
            return OneHotDist(raw, self.unimix)
        mean, std = raw.chunk(2, -1)
        std = (self.max_std - self.min_std) * torch.sigmoid(std + 2.0) + self.min_std
        return NormalDist(torch.tanh(mean), std)

    def action(self, dist: OneHotDist | NormalDist, sample: bool) -> torch.Tensor:
        """A sample (or the mode) of ``dist`` as the env and the world model consume it."""
        return self.executed(dist.sample() if sample else dist.mode())

    def sample(self, dist: OneHotDist | NormalDist) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sample, executed)``: a raw sample of ``dist`` and the action the env and the
        world model get (``executed``, clipped). REINFORCE must score the raw sample: the
        log-probability of the clipped action is a biased score function (a Gaussian puts
        density on actions beyond the bounds, and the clip moves them all onto the bound)."""
        raw = dist.sample()
        return raw, self.executed(raw)

    def executed(self, action: torch.Tensor) -> torch.Tensor:
        """Continuous actions clipped to ``[-1, 1]`` with a straight-through gradient (dynamics
        backprop still differentiates the sample); discrete ones unchanged."""
        if self.discrete:
            return action
        return action + (action.clamp(-1.0, 1.0) - action).detach()

    def log_prob(self, dist: OneHotDist | NormalDist, action: torch.Tensor) -> torch.Tensor:
        lp = dist.log_prob(action)
        return lp if self.discrete else lp.sum(-1)

    def entropy(self, dist: OneHotDist | NormalDist) -> torch.Tensor:
        ent = dist.entropy()
        return ent if self.discrete else ent.sum(-1)


class Critic(nn.Module):
    """Value ``v(s)`` as a two-hot distribution over symlog-spaced bins (zero-initialised)."""

    def __init__(
        self,
        feat_dim: int,
        units: int,
        layers: int,
        factory: LayerFactory,
        bins: int = 255,
        name: str = "critic",
    ) -> None:
        super().__init__()
        self.net = Head(feat_dim, bins, units, layers, factory, name, outscale=0.0)
        self.twohot = TwoHot(bins)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., bins]``."""
        return self.net(feat)

    def value(self, feat: torch.Tensor) -> torch.Tensor:
        return self.twohot.decode(self.net(feat))


class ReturnNormalizer(nn.Module):
    """EMA of the ``low``/``high`` percentiles of returns; ``scale = max(limit, high - low)``.

    Buffers: ``low``, ``high`` (start at 0, as DreamerV3 without debiasing). ``gather`` (optional)
    maps this process's returns to everyone's (data-parallel training passes its all-gather),
    so every process takes the percentiles of the same values and keeps identical buffers.
    """

    def __init__(
        self,
        decay: float = 0.99,
        limit: float = 1.0,
        low: float = 5.0,
        high: float = 95.0,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.decay, self.limit = decay, limit
        self.gather = gather
        self.register_buffer(
            "quantiles", torch.tensor([low / 100.0, high / 100.0]), persistent=False
        )
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))

    @torch.no_grad()
    def update(self, returns: torch.Tensor) -> None:
        values = returns.detach().float().flatten()
        if self.gather is not None:
            values = self.gather(values)
        q = torch.quantile(values, self.quantiles)
        self.low.lerp_(q[0], 1.0 - self.decay)
        self.high.lerp_(q[1], 1.0 - self.decay)

    def scale(self) -> torch.Tensor:
        return (self.high - self.low).clamp(min=self.limit)
