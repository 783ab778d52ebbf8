"""World-model pieces: transforms, distributions, RSSM, losses and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imagine_rl.worldmodels import (
    RSSM,
    BlockLinear,
    LayerFactory,
    OneHotDist,
    RSSMConfig,
    TwoHot,
    WorldModel,
    WorldModelSpec,
    lambda_return,
    replay_lambda_return,
    symexp,
    symlog,
)
from imagine_rl.worldmodels.dreamer_wm import LOSS_KEYS

torch.set_num_threads(1)

TINY_RSSM = dict(deter=16, hidden=16, stoch=4, classes=4, blocks=2)


def tiny_spec(latent: str = "categorical", **rssm) -> WorldModelSpec:
    return WorldModelSpec(
        rssm=RSSMConfig(**{**TINY_RSSM, "latent": latent, **rssm}),
        units=16,
        mlp_layers=1,
        head_layers=1,
        cnn_depth=4,
    )


def make_batch(shapes, action_dim, B=3, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for key, shape in shapes.items():
        if len(shape) == 3:
            batch[key] = torch.rand(B, T, *shape, generator=g) - 0.5
        else:
            batch[key] = torch.randn(B, T, *shape, generator=g)
    batch["action"] = torch.rand(B, T, action_dim, generator=g) * 2 - 1
    batch["reward"] = torch.randn(B, T, generator=g)
    batch["is_first"] = torch.zeros(B, T)
    batch["is_first"][:, 0] = 1
    batch["is_terminal"] = torch.zeros(B, T)
    batch["is_terminal"][0, -1] = 1
    return batch


# --------------------------------------------------------------------------------------
# Transforms and distributions
# --------------------------------------------------------------------------------------


def test_symlog_symexp_inverse():
    x = torch.tensor([-1e6, -123.4, -1.0, -1e-3, 0.0, 1e-3, 0.5, 7.0, 1e5], dtype=torch.float64)
    assert torch.allclose(symexp(symlog(x)), x, rtol=1e-9, atol=1e-12)
    assert torch.allclose(symlog(symexp(x.clamp(-50, 50))), x.clamp(-50, 50), rtol=1e-9)
    assert symlog(torch.tensor(0.0)) == 0 and symlog(torch.tensor(-3.0)) < 0


def test_twohot_round_trip():
    twohot = TwoHot(255)
    y = torch.tensor([-3000.0, -10.5, -1.0, -0.01, 0.0, 0.3, 1.0, 42.0, 12345.0])
    weights = twohot.encode(y)
    assert weights.shape == (9, 255)
    assert torch.allclose(weights.sum(-1), torch.ones(9))
    assert ((weights > 0).sum(-1) <= 2).all()
    # The weighted mean bin is symlog(y) exactly; decoding its log-weights gives y back.
    assert torch.allclose((weights * twohot.bins).sum(-1), symlog(y), atol=1e-5)
    decoded = twohot.decode(torch.log(weights + 1e-30))
    assert torch.allclose(decoded, y, rtol=1e-4, atol=1e-4)
    # The cross-entropy is best at the target's own encoding.
    logits = torch.log(weights + 1e-8)
    assert (twohot.log_prob(logits, y) > twohot.log_prob(logits, 3 * y + 5.0)).all()
    # Out-of-range targets clamp to the end bins.
    assert twohot.encode(torch.tensor([1e12]))[0, -1] == 1


def test_twohot_decode_stays_exact_under_bf16_autocast():
    twohot = TwoHot(255)
    y = torch.tensor([-250.0, -3.0, 0.5, 17.0, 900.0])
    logits = torch.log(twohot.encode(y) + 1e-30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = twohot.decode(logits)
    assert decoded.dtype == torch.float32
    assert torch.allclose(decoded, y, rtol=1e-4, atol=1e-4)


def test_onehot_dist_unimix_and_straight_through():
    logits = torch.tensor([[50.0, 0.0, -50.0, 0.0]], requires_grad=True)
    dist = OneHotDist(logits, unimix=0.01)
    assert torch.allclose(dist.probs.sum(-1), torch.ones(1))
    assert dist.probs.min() >= 0.01 / 4 - 1e-7
    sample = dist.sample()
    assert torch.equal(sample.detach().sum(-1), torch.ones(1))
    assert set(sample.detach().unique().tolist()) <= {0.0, 1.0}
    (sample * torch.arange(4.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert torch.isfinite(dist.entropy()).all()
    assert dist.kl(dist).abs().max() < 1e-6


def test_lambda_return_hand_computed():
    # Three states s0, s1, s2 (horizon 2); lambda 0.5.
    reward = torch.tensor([[0.0, 1.0, 2.0]])  # r at s0 unused
    discount = torch.tensor([[0.9, 0.9, 0.5]])  # discount at s0 unused
    value = torch.tensor([[10.0, 4.0, 6.0]])
    ret = lambda_return(reward, discount, value, lam=0.5)
    r1 = 2.0 + 0.5 * 6.0  # R_1 = r_2 + d_2 * v_2 (R_2 = v_2)  = 5
    r0 = 1.0 + 0.9 * (0.5 * 4.0 + 0.5 * r1)  # = 1 + 0.9 * 4.5 = 5.05
    assert torch.allclose(ret, torch.tensor([[r0, r1]]))
    # lambda = 1: discounted Monte-Carlo with bootstrap; lambda = 0: one-step TD.
    mc = lambda_return(reward, discount, value, lam=1.0)
    assert torch.allclose(mc, torch.tensor([[1.0 + 0.9 * (2.0 + 0.5 * 6.0), 2.0 + 0.5 * 6.0]]))
    td = lambda_return(reward, discount, value, lam=0.0)
    assert torch.allclose(td, torch.tensor([[1.0 + 0.9 * 4.0, 2.0 + 0.5 * 6.0]]))


def test_replay_lambda_return_hand_computed_and_episode_boundary():
    # Four replayed steps; step 3 starts a new episode, lambda 0.5, gamma 0.9, no terminals.
    reward = torch.tensor([[0.0, 1.0, 2.0, 7.0]])  # r at step 0 unused
    discount = torch.full((1, 4), 0.9)
    boot = torch.tensor([[10.0, 4.0, 6.0, 8.0]])
    is_first = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    ret = replay_lambda_return(reward, discount, boot, is_first, lam=0.5)
    r2 = 6.0  # step 3 belongs to the next episode: fall back to the bootstrap at step 2
    r1 = 2.0 + 0.9 * (0.5 * 6.0 + 0.5 * r2)  # = 7.4
    r0 = 1.0 + 0.9 * (0.5 * 4.0 + 0.5 * r1)  # = 6.13
    assert ret.shape == (1, 3)
    assert torch.allclose(ret, torch.tensor([[r0, r1, r2]]))
    # Without the boundary it is the imagined-rollout formula on the same numbers.
    plain = replay_lambda_return(reward, discount, boot, torch.zeros(1, 4), lam=0.5)
    assert torch.allclose(plain, lambda_return(reward, discount, boot, lam=0.5)[:, :3])


def test_block_linear_is_block_diagonal():
    layer = BlockLinear(3, 2, blocks=4)
    nn.init.normal_(layer.weight)
    x = torch.randn(5, 4, 3)
    dense = torch.block_diag(*layer.weight)  # [12, 8]
    expected = (x.reshape(5, 12) @ dense).reshape(5, 4, 2) + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_dense_input_scale_reaches_the_output_from_init(norm):
    """``norm(W x)`` only sees the direction of ``x``: without a (non-zero) bias a 1-d action
    fed to the RSSM reached it only through its sign, and the actor's dynamics gradient was 0."""
    torch.manual_seed(0)
    rssm = RSSM(RSSMConfig(**TINY_RSSM), 1, 8, LayerFactory(norm=norm))
    small, large = rssm.action_features(torch.tensor([[0.2], [1.0]]))
    assert (small - large).abs().max() > 0.05
    jacobian = torch.autograd.functional.jacobian(rssm.action_features, torch.tensor([[0.5]]))
    assert jacobian.norm() > 0.1
    # Wider inputs: the output depends on their scale, not only their direction.
    dense = LayerFactory(norm=norm).dense(5, 16, name="d")
    x = torch.randn(3, 5)
    assert (dense(x) - dense(3 * x)).abs().max() > 0.05


# --------------------------------------------------------------------------------------
# RSSM
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent", ["categorical", "gaussian"])
def test_rssm_observe_imagine_shapes(latent):
    config = RSSMConfig(**TINY_RSSM, latent=latent)
    rssm = RSSM(config, action_dim=3, embed_dim=7, factory=LayerFactory())
    B, T, H = 2, 5, 4
    is_first = torch.zeros(B, T)
    is_first[:, 0] = 1
    post, prior = rssm.observe(torch.randn(B, T, 7), torch.randn(B, T, 3), is_first)
    stoch = (B, T, *config.stoch_shape)
    for state in (post, prior):
        assert state["deter"].shape == (B, T, 16)
        assert state["stoch"].shape == stoch
    assert rssm.feat(post).shape == (B, T, config.feat_size)
    assert rssm.kl(post, prior).shape == (B, T)
    start = {k: post[k].reshape(B * T, *post[k].shape[2:]) for k in ("deter", "stoch")}
    traj = rssm.imagine(lambda s: torch.tanh(s["deter"][:, :3]), start, H)
    assert traj["deter"].shape == (B * T, H + 1, 16)
    assert traj["stoch"].shape == (B * T, H + 1, *config.stoch_shape)
    assert traj["action"].shape == (B * T, H, 3)
    assert torch.equal(traj["deter"][:, 0], start["deter"])
    init = rssm.initial(6)
    assert init["deter"].shape == (6, 16) and init["stoch"].shape == (6, *config.stoch_shape)


@pytest.mark.parametrize("initial", ["learned", "zero"])
def test_rssm_is_first_resets_state(initial):
    torch.manual_seed(0)
    rssm = RSSM(RSSMConfig(**TINY_RSSM, initial=initial), 2, 6, LayerFactory())
    with torch.no_grad():  # a non-trivial learned initial state
        for p in rssm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    B, T, k = 2, 7, 3
    embed, action = torch.randn(B, T, 6), torch.randn(B, T, 2)
    is_first = torch.zeros(B, T)
    is_first[:, 0] = 1
    is_first[:, k] = 1  # a new episode starts at step k
    post, prior = rssm.observe(embed, action, is_first, sample=False)
    fresh_first = torch.zeros(B, T - k)
    fresh_first[:, 0] = 1
    fresh, fresh_prior = rssm.observe(embed[:, k:], action[:, k:], fresh_first, sample=False)
    for key in post:
        assert torch.allclose(post[key][:, k:], fresh[key], atol=1e-6), key
        assert torch.allclose(prior[key][:, k:], fresh_prior[key], atol=1e-6), key
    # Without the reset the continuation differs.
    no_reset = is_first.clone()
    no_reset[:, k] = 0
    cont, _ = rssm.observe(embed, action, no_reset, sample=False)
    assert not torch.allclose(cont["deter"][:, k:], fresh["deter"])


def test_rssm_carries_state_between_calls():
    torch.manual_seed(0)
    rssm = RSSM(RSSMConfig(**TINY_RSSM), 2, 6, LayerFactory())
    embed, action = torch.randn(1, 6, 6), torch.randn(1, 6, 2)
    is_first = torch.zeros(1, 6)
    is_first[:, 0] = 1
    whole, _ = rssm.observe(embed, action, is_first, sample=False)
    first, _ = rssm.observe(embed[:, :3], action[:, :3], is_first[:, :3], sample=False)
    carry = {"deter": first["deter"][:, -1], "stoch": first["stoch"][:, -1], "action": action[:, 2]}
    second, _ = rssm.observe(embed[:, 3:], action[:, 3:], is_first[:, 3:], carry, sample=False)
    assert torch.allclose(whole["deter"][:, 3:], second["deter"], atol=1e-6)


# --------------------------------------------------------------------------------------
# World model
# --------------------------------------------------------------------------------------


def _grad_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize(
    "shapes,latent",
    [
        ({"state": (5,)}, "categorical"),
        ({"pixels": (3, 64, 64)}, "categorical"),
        ({"state": (4,), "pixels": (3, 32, 32)}, "gaussian"),
    ],
)
def test_world_model_losses_finite_and_gradients(shapes, latent):
    torch.manual_seed(0)
    # No free bits (they would zero the KL gradients of this barely trained model) and a zero
    # initial state (the learned one is the prior's mode, which would route gradients from the
    # representation loss into the prior network).
    spec = tiny_spec(latent, initial="zero")
    spec.free_nats = 0.0
    wm = WorldModel(shapes, action_dim=2, spec=spec)
    batch = make_batch(shapes, 2, B=2, T=6)
    losses, metrics = wm.loss(batch)
    assert set(losses) == set(LOSS_KEYS)
    for value in (*losses.values(), *metrics.values()):
        assert value.dim() == 0 and torch.isfinite(value)
    assert all(k.startswith("world_model/") for k in metrics)

    def grads_of(key):
        wm.zero_grad(set_to_none=True)
        losses, _ = wm.loss(batch)
        losses[key].backward()
        return _grad_names(wm)

    total = set()
    rec = grads_of("loss/reconstruction")
    assert any(n.startswith("decoder.") for n in rec)
    assert any(n.startswith("encoder.") for n in rec)
    assert any(n.startswith("rssm.gru") for n in rec)
    assert not any(n.startswith(("reward_head.", "continue_head.")) for n in rec)
    total |= rec
    rew = grads_of("loss/reward")
    assert any(n.startswith("reward_head.") for n in rew)
    assert not any(n.startswith(("decoder.", "continue_head.")) for n in rew)
    total |= rew
    con = grads_of("loss/continue")
    assert any(n.startswith("continue_head.") for n in con)
    assert not any(n.startswith(("decoder.", "reward_head.")) for n in con)
    total |= con
    dyn = grads_of("loss/dynamics")
    assert any(n.startswith("rssm.prior") for n in dyn)
    assert not any(n.startswith(("decoder.", "reward_head.", "continue_head.")) for n in dyn)
    total |= dyn
    rep = grads_of("loss/representation")
    # The prior is the (stopped) target of the representation loss.
    assert not any(n.startswith("rssm.prior") for n in rep)
    assert any(n.startswith(("rssm.post", "encoder.")) for n in rep)
    total |= rep
    # Every world-model parameter learns from some term, except the reward head's hidden
    # layer at init: its output layer starts at zero (DreamerV3), so no gradient passes yet.
    expected = {n for n, _ in wm.named_parameters() if not n.startswith("reward_head.mlp")}
    assert expected <= total, sorted(expected - total)


def test_world_model_layers_all_come_from_the_factory():
    factory = LayerFactory()
    wm = WorldModel({"state": (5,), "pixels": (3, 64, 64)}, 3, tiny_spec(), factory)
    weight_layers = [
        m
        for m in wm.modules()
        if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d | BlockLinear)
    ]
    registered = list(factory.layers.values())
    assert len(weight_layers) == len(registered)
    assert {id(m) for m in weight_layers} == {id(m) for m in registered}
    assert all(name.startswith("wm.") for name in factory.layers)
    assert {"wm.rssm.gru.hidden", "wm.rssm.gru.gates", "wm.decoder.cnn.0"} <= set(factory.layers)


def test_world_model_open_loop_shapes():
    shapes = {"pixels": (3, 32, 32)}
    wm = WorldModel(shapes, 2, tiny_spec())
    batch = make_batch(shapes, 2, B=2, T=9)
    pred = wm.open_loop(batch, context=5)
    assert pred["pixels"].shape == (2, 9, 3, 32, 32)


def test_world_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    shapes = {"state": (6,)}
    wm = WorldModel(shapes, 2, tiny_spec())
    batch = make_batch(shapes, 2, B=4, T=12, seed=1)
    opt = torch.optim.Adam(wm.parameters(), lr=3e-3)
    scales = {"loss/dynamics": 0.5, "loss/representation": 0.1}
    history, terms = [], []
    for _ in range(30):
        losses, _ = wm.loss(batch)
        total = sum(scales.get(k, 1.0) * v for k, v in losses.items())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
        terms.append({k: v.item() for k, v in losses.items()})
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.8 * first, history
    for key in ("loss/reconstruction", "loss/reward", "loss/continue"):
        assert terms[-1][key] < 0.85 * terms[0][key], (key, terms[0][key], terms[-1][key])
