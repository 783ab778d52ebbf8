"""``worldmodels.actor_critic.ActorCritic`` alone, on a toy world model with known dynamics.

Toy model: state ``{"x": [N, 1]}``, ``x' = x + gain * a`` (``gain`` a parameter, 1),
``feat(state) = x``, ``reward(feat) = -rscale * feat^2`` (``rscale`` a parameter, 1),
``continue_prob = cont`` everywhere (a constant). The actor is made deterministic with
``actor_min_std = actor_max_std = 1e-9`` (its samples equal its mean ``tanh(net(x)[0])`` to
float32 rounding) and ``actor_entropy = 0``; the critic's output layer is zero-initialised, so
its value is exactly 0 (checked).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.testing import assert_close

from imagine_rl.worldmodels.actor_critic import ActorCritic, ActorCriticSpec, frozen
from imagine_rl.worldmodels.interface import WorldModelInterface
from imagine_rl.worldmodels.layers import LayerFactory

torch.set_num_threads(1)


class ToyWorldModel(nn.Module):
    action_dim = 1

    def __init__(self, cont: float = 1.0) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.rscale = nn.Parameter(torch.ones(()))
        self.cont = cont

    @property
    def feat_size(self) -> int:
        return 1

    def loss_and_states(self, data, start=None):
        x = data["obs"]
        return {"loss/toy": (self.gain * 0.0).sum()}, {}, {"x": x}

    def imagine(self, policy, start, horizon):
        x, xs, actions = start["x"], [start["x"]], []
        for _ in range(horizon):
            a = policy({"x": x})
            x = x + self.gain * a
            xs.append(x)
            actions.append(a)
        return {"x": torch.stack(xs, 1), "action": torch.stack(actions, 1)}

    def rollout(self, start, actions):
        x, xs = start["x"], []
        for t in range(actions.shape[1]):
            x = x + self.gain * actions[:, t]
            xs.append(x)
        return {"x": torch.stack(xs, 1)}

    def feat(self, state):
        return state["x"]

    def reward(self, feat):
        return -self.rscale * feat.squeeze(-1) ** 2

    def continue_prob(self, feat):
        return torch.full(feat.shape[:-1], self.cont)


def make(horizon=1, **kwargs):
    torch.manual_seed(0)
    spec = dict(
        horizon=horizon,
        units=8,
        layers=1,
        actor_entropy=0.0,
        actor_min_std=1e-9,
        actor_max_std=1e-9,
        critic_bins=255,
        replay_critic_scale=0.0,
        return_norm_decay=0.0,  # low/high = this batch's percentiles exactly
        return_norm_limit=1e-3,
    )
    spec.update(kwargs)
    return ActorCritic(1, 1, False, ActorCriticSpec(**spec), LayerFactory())


# Two starts ([B=2, T=1]); x0 = 0.5 and -0.3; the second start is not terminal.
X0 = torch.tensor([[[0.5]], [[-0.3]]])


def batch(terminal=(0.0, 0.0)):
    T = X0.shape[1]
    return {
        "reward": torch.zeros(2, T),
        "is_first": torch.zeros(2, T),
        "is_last": torch.zeros(2, T),
        "is_terminal": torch.tensor(terminal).reshape(2, T),
        "obs": X0,
    }


def hand_scale(returns: torch.Tensor, limit: float) -> torch.Tensor:
    """max(limit, q95 - q05) with decay 0 (linear-interpolated percentiles of all returns)."""
    v = returns.detach().flatten().sort().values
    n = v.numel()

    def q(p):
        pos = p * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        return v[lo] + (pos - lo) * (v[hi] - v[lo])

    return torch.clamp(q(0.95) - q(0.05), min=limit)


def test_toy_model_follows_the_protocol():
    assert isinstance(ToyWorldModel(), WorldModelInterface)


def test_zero_initialised_critic_value_is_exactly_zero():
    ac = make()
    feat = torch.tensor([[0.5], [-0.3], [3.0]])
    assert torch.equal(ac.critic.value(feat), torch.zeros(3))
    assert torch.equal(ac.slow_critic.value(feat), torch.zeros(3))


def test_dynamics_backprop_horizon_1_matches_hand_loss_and_gradient():
    """Horizon 1, value 0: R_0 = r(x1) = -(x0 + a0)^2 with a0 = tanh(net(x0)[0]); weight =
    start continue (cumprod(gamma * c)[:1] / gamma); actor loss = -mean(w * R_0 / scale)."""
    wm, ac = ToyWorldModel(), make(horizon=1)
    data = batch(terminal=(0.0, 1.0))
    with frozen(wm):
        terms, metrics = ac.loss(wm, {"x": X0}, data)
    x0 = X0.reshape(2, 1)
    a0 = torch.tanh(ac.actor.net(x0)[:, :1])
    ret = -((x0 + a0) ** 2).squeeze(-1)  # [N]
    weight = torch.tensor([1.0, 0.0])  # the second start is terminal
    scale = hand_scale(ret, 1e-3)
    expected = -(weight * ret / scale.detach()).mean()
    assert_close(terms["actor"], expected)
    assert_close(metrics["train/return_scale"], scale.detach())
    assert_close(metrics["train/imagined_return"], ret.mean().detach())
    # Gradient of the actor loss w.r.t. the actor's weights, against autograd of the hand loss.
    got = torch.autograd.grad(terms["actor"], list(ac.actor.parameters()))
    want = torch.autograd.grad(expected, list(ac.actor.parameters()))
    for g, w in zip(got, want):
        assert_close(g, w)
    assert any(g.abs().sum() > 0 for g in got)
    # The analytic derivative w.r.t. the action: d loss / d a0 = 2 (x0 + a0) w / (N scale).
    a = a0.detach().requires_grad_(True)
    hand = -(weight * -((x0 + a) ** 2).squeeze(-1) / scale).mean()
    (da,) = torch.autograd.grad(hand, a)
    assert_close(da, (2 * (x0 + a0.detach()) * weight[:, None] / (2 * scale)).detach())


def test_dynamics_backprop_horizon_2_matches_hand_lambda_returns():
    """Horizon 2, value 0: R_1 = r(x2), R_0 = r(x1) + gamma lam R_1 (continue 1 everywhere);
    weights [1, gamma]; loss = -mean over the N x 2 steps of w * R / scale."""
    gamma, lam = 0.9, 0.5
    wm, ac = ToyWorldModel(), make(horizon=2, discount=gamma, return_lambda=lam)
    with frozen(wm):
        terms, _ = ac.loss(wm, {"x": X0}, batch())
    x0 = X0.reshape(2, 1)
    x1 = x0 + torch.tanh(ac.actor.net(x0)[:, :1])
    x2 = x1 + torch.tanh(ac.actor.net(x1)[:, :1])
    r1, r2 = -(x1**2).squeeze(-1), -(x2**2).squeeze(-1)
    ret = torch.stack([r1 + gamma * lam * r2, r2], 1)  # [N, 2]
    weight = torch.tensor([1.0, gamma])
    expected = -(weight * ret / hand_scale(ret, 1e-3)).mean()
    assert_close(terms["actor"], expected)
    got = torch.autograd.grad(terms["actor"], list(ac.actor.parameters()))
    want = torch.autograd.grad(expected, list(ac.actor.parameters()))
    for g, w in zip(got, want):
        assert_close(g, w)


def test_dynamics_actor_term_reaches_the_world_model_unless_frozen():
    wm, ac = ToyWorldModel(), make(horizon=2)
    terms, _ = ac.loss(wm, {"x": X0}, batch())
    terms["actor"].backward()
    assert wm.gain.grad is not None and wm.gain.grad.abs() > 0
    assert all(p.grad is None for p in ac.critic.parameters())  # detached critic weights
    wm2, ac2 = ToyWorldModel(), make(horizon=2)
    with frozen(wm2):
        terms, _ = ac2.loss(wm2, {"x": X0}, batch())
    assert all(p.requires_grad for p in wm2.parameters())  # restored after the block
    (terms["actor"] + terms["critic"]).backward()
    assert wm2.gain.grad is None and wm2.rscale.grad is None


def test_reinforce_gives_no_gradient_to_world_model_or_critic_from_actor():
    wm = ToyWorldModel()
    # A real std, so the score function is informative.
    ac = make(horizon=2, actor_grad="reinforce", actor_min_std=0.1, actor_max_std=1.0)
    with frozen(wm):
        terms, _ = ac.loss(wm, {"x": X0}, batch())
    terms["actor"].backward(retain_graph=True)
    assert all(p.grad is None for p in ac.critic.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ac.actor.parameters())
    terms["critic"].backward()
    assert wm.gain.grad is None and wm.rscale.grad is None
    # Even unfrozen, REINFORCE's rollout runs without a graph into the dynamics.
    wm2 = ToyWorldModel()
    terms, _ = ac.loss(wm2, {"x": X0}, batch())
    terms["actor"].backward()
    assert wm2.gain.grad is None


def test_reinforce_actor_loss_matches_hand_score_function():
    """Horizon 1, value 0: loss = -mean(w * log pi(sample) * R_0 / scale), with R_0 =
    -(x0 + clip(sample))^2 and the raw sample scored."""
    wm, ac = ToyWorldModel(), make(horizon=1, actor_grad="reinforce", actor_max_std=1.0)
    ac.actor.min_std = 0.1
    torch.manual_seed(3)
    with frozen(wm):
        traj, raw = ac.imagine(wm, {"x": X0.reshape(2, 1)})
        terms, _, boot = ac.imagination_loss(wm, traj, raw, torch.ones(2))
    sample = traj["policy_sample"][:, 0, 0]
    x0 = X0.reshape(2)
    ret = -((x0 + sample.clamp(-1, 1)) ** 2)
    assert_close(boot, ret)
    dist = ac.actor.dist(raw)
    logp = ac.actor.log_prob(dist, traj["policy_sample"])[:, 0]
    expected = -(logp * ret / hand_scale(ret, 1e-3)).mean()
    assert_close(terms["actor"], expected)


POST3 = {"x": torch.tensor([[[0.5], [0.2], [0.1]], [[-0.3], [0.0], [0.4]]])}  # [2, 3, 1]


def data3():
    return {
        "reward": torch.ones(2, 3),
        "is_first": torch.zeros(2, 3),
        "is_last": torch.zeros(2, 3),
        "is_terminal": torch.zeros(2, 3),
    }


def test_loss_keys_are_named_terms_0d_finite():
    wm = ToyWorldModel()
    for scale, keys in ((0.3, {"actor", "critic", "replay_critic"}), (0.0, {"actor", "critic"})):
        ac = make(horizon=2, replay_critic_scale=scale)
        post, data = POST3, data3()
        with frozen(wm):
            terms, metrics = ac.loss(wm, post, data)
        assert set(terms) == keys
        for v in terms.values():
            assert v.dim() == 0 and torch.isfinite(v)
        assert all(torch.isfinite(v) for v in metrics.values())


def test_critic_term_reaches_only_the_critic():
    wm, ac = ToyWorldModel(), make(horizon=2, replay_critic_scale=0.3)
    with frozen(wm):
        terms, _ = ac.loss(wm, POST3, data3())
    (terms["critic"] + terms["replay_critic"]).backward()
    assert all(p.grad is None for p in ac.actor.parameters())
    assert all(p.grad is None for p in ac.slow_critic.parameters())
    out = ac.critic.net.out
    assert out.weight.grad is not None and out.weight.grad.abs().sum() > 0


def test_update_slow_critic_every_and_fraction():
    ac = make(slow_critic_fraction=0.25, slow_critic_every=2)
    with torch.no_grad():
        for p in ac.critic.parameters():
            p.fill_(1.0)
        for p in ac.slow_critic.parameters():
            p.fill_(0.0)
    ac.update_slow_critic(0)
    for p in ac.slow_critic.parameters():
        assert_close(p, torch.full_like(p, 0.25))
    ac.update_slow_critic(1)  # not a multiple of 2: unchanged
    for p in ac.slow_critic.parameters():
        assert_close(p, torch.full_like(p, 0.25))
    ac.update_slow_critic(2)
    for p in ac.slow_critic.parameters():
        assert_close(p, torch.full_like(p, 0.25 + 0.25 * 0.75))
    for p in ac.critic.parameters():
        assert_close(p, torch.ones_like(p))


def test_imagined_continue_uses_start_flag_at_step_0():
    wm = ToyWorldModel(cont=0.5)
    feat = torch.zeros(2, 3, 1)
    start = torch.tensor([1.0, 0.0])
    ac = make(horizon=2)
    got = ac.imagined_continue(wm, feat, start)
    assert_close(got, torch.tensor([[1.0, 0.5, 0.5], [0.0, 0.5, 0.5]]))
    ac = make(horizon=2, imagine_start_continue=True)
    got = ac.imagined_continue(wm, feat, start)
    assert_close(got, torch.full((2, 3), 0.5))
