"""Contrastive slot dynamics (``op3.representation=reconstruction+cpc|cpc``, C-SWM-style
``loss/cpc``) and C-SWM's ranking measures (``worldmodels.slot_metrics.ranking_metrics``,
``scripts/dev/op3_checks.py check=hits``)."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from test_op3 import TINY_OP3, _batch, tiny_model

from imagine_rl.agents.op3 import OP3Agent
from imagine_rl.runtime.config import ConfigError, build_config
from imagine_rl.worldmodels.cpc import SlotCPC
from imagine_rl.worldmodels.layers import LayerFactory
from imagine_rl.worldmodels.slot_metrics import ranking_metrics, slot_distances
from imagine_rl.worldmodels.slots import SlotSpec, SlotWorldModel, match_slots

CPC_METRICS = ("cpc_accuracy_k1", "cpc_mi_bound_k1", "cpc_mi_bound")


def random_slots(model: SlotWorldModel, *lead: int) -> torch.Tensor:
    slots = torch.randn(*lead, model.num_slots, model.state_dim)
    slots[..., -4:-2] = torch.rand(*lead, model.num_slots, 2)
    slots[..., -2:] = 0.05 + 0.2 * torch.rand(*lead, model.num_slots, 2)
    return slots


def _permute(slots: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``slots [..., K, S]`` reordered by ``perm [..., K]`` (one permutation per set)."""
    return slots.gather(-2, perm[..., None].expand_as(slots))


def _perms(*lead: int, K: int) -> torch.Tensor:
    n = math.prod(lead)
    return torch.stack([torch.randperm(K) for _ in range(n)]).reshape(*lead, K)


# --------------------------------------------------------------------------------------
# Losses and metrics
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("representation", ["reconstruction+cpc", "cpc"])
def test_cpc_loss_and_metrics_shapes(representation):
    model = tiny_model(representation=representation)
    B, T, K = 2, 3, model.num_slots
    losses, metrics = model.loss(_batch(B, T))
    expected = {"loss/reconstruction", "loss/dynamics", "loss/cpc"}
    if representation == "reconstruction+cpc":
        expected.add("loss/prediction")
    assert set(losses) == expected
    for key in CPC_METRICS:
        assert f"world_model/{key}" in metrics
    assert all(v.dim() == 0 and torch.isfinite(v) for v in [*losses.values(), *metrics.values()])
    assert float(losses["loss/cpc"].detach()) > 0
    # InfoNCE over all B * T * K inferred slots of the batch: the bound is log N - loss.
    # (Whether the bound means anything: test_slot_cpc_* below, against a known MI.)
    bound = metrics["world_model/cpc_mi_bound"]
    candidates = B * T * K
    torch.testing.assert_close(bound, math.log(candidates) - losses["loss/cpc"].detach())
    assert 0.0 <= float(metrics["world_model/cpc_accuracy_k1"]) <= 1.0
    # The projections exist only in the cpc modes (named op3.cpc.* for the layer factory).
    assert {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("cpc.")} == {
        "query",
        "key",
    }
    assert not any(n.startswith("cpc.") for n, _ in tiny_model().named_parameters())


def test_default_representation_is_unchanged():
    """``representation=reconstruction`` (the default) gives the losses of the code before
    ``loss/cpc`` existed (values computed with the option absent, same seed), and adding the
    contrastive term leaves the other terms and the initial weights as they were."""
    assert SlotSpec().representation == "reconstruction"
    model = tiny_model()
    losses, metrics = model.loss(_batch())
    assert set(losses) == {"loss/reconstruction", "loss/prediction", "loss/dynamics"}
    assert not any("cpc" in k for k in metrics)
    before = {  # SlotWorldModel.loss before this change, tiny_model() and _batch()
        "loss/reconstruction": 0.07471834868192673,
        "loss/prediction": 0.06605685502290726,
        "loss/dynamics": 6.776925086975098,
    }
    for key, value in before.items():
        assert float(losses[key].detach()) == pytest.approx(value, rel=1e-5), key
    both = tiny_model(representation="reconstruction+cpc")
    both_losses, _ = both.loss(_batch())
    for key in before:
        torch.testing.assert_close(both_losses[key], losses[key])
    weights = model.state_dict()
    for key, value in both.state_dict().items():
        if not key.startswith("cpc."):
            torch.testing.assert_close(value, weights[key])


# --------------------------------------------------------------------------------------
# SlotCPC against a known mutual information
# --------------------------------------------------------------------------------------
# SlotCPC scores cosines over a temperature, so the distribution whose optimal critic it can
# express exactly is the von Mises-Fisher one on the sphere: x uniform on S^2 and y | x ~
# vMF(x, kappa) have p(y | x) / p(y) = kappa / sinh(kappa) * exp(kappa x.y), i.e. the critic
# cos(x, y) / (1 / kappa) up to a constant, and I(x; y) = log(kappa / sinh kappa) +
# kappa coth(kappa) - 1 nats (E[x.y] = coth(kappa) - 1/kappa). With identity projections and
# temperature 1 / kappa, SlotCPC *is* the optimal critic: its bound log N - loss must track
# min(I, log N) as InfoNCE's does (Poole et al. 2019). A SlotCPC that ignores its weights, its
# temperature, the pairing of slot i with observed slot i or the count of candidates breaks it.

SLOT_LEAD = (4, 8, 4)  # B, T, K: N = 128 candidates, log N = 4.85 nats
SLOT_BATCHES = 48


def vmf_mi(kappa: float) -> float:
    """I(x; y) in nats for x uniform on S^2 and y | x ~ vMF(x, kappa)."""
    if kappa > 50:  # sinh and coth in closed form: log(2 kappa) - 1 to double precision
        return math.log(2 * kappa) - 1
    return math.log(kappa / math.sinh(kappa)) + kappa / math.tanh(kappa) - 1


def vmf_pairs(lead: tuple[int, ...], kappa: float, g: torch.Generator):
    """``x, y [*lead, 3]``: x uniform on the sphere, y ~ vMF(x, kappa) by inverting the CDF of
    w = x.y in 3-d (Wood 1994): w = 1 + log(u + (1 - u) exp(-2 kappa)) / kappa."""
    x = torch.nn.functional.normalize(torch.randn(*lead, 3, generator=g), dim=-1)
    u = torch.rand(*lead, generator=g, dtype=torch.float64)
    w = 1 + torch.log(u + (1 - u) * math.exp(-2 * kappa)) / kappa
    side = torch.randn(*lead, 3, generator=g)
    side = torch.nn.functional.normalize(side - (side * x).sum(-1, keepdim=True) * x, dim=-1)
    y = w.float()[..., None] * x + (1 - w.square()).clamp(min=0).sqrt().float()[..., None] * side
    return x, y


def test_vmf_mutual_information_matches_monte_carlo():
    """The closed form against E[log p(y | x) - log p(y)] = E[kappa w] + log(kappa / sinh kappa)
    over 200,000 sampled pairs (standard error < 0.002 nats), which also checks the sampler."""
    g = torch.Generator().manual_seed(0)
    for kappa in (1.0, 4.0):
        x, y = vmf_pairs((200_000,), kappa, g)
        w = (x * y).sum(-1).double()
        sampled = (kappa * w + math.log(kappa / math.sinh(kappa))).mean().item()
        assert sampled == pytest.approx(vmf_mi(kappa), abs=0.01)


def slot_cpc_bound(cpc: SlotCPC, make_pairs, seed: int, batches: int = SLOT_BATCHES):
    """Mean ``cpc_mi_bound`` over fresh batches, its standard error, and mean accuracy.
    Slots 2 and 3 of every frame have weight 0 (no prediction) and a prediction unrelated to
    their observed slot: they stay candidates (N counts them) but must not count as anchors."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.ones(SLOT_LEAD)
    weight[..., 2:] = 0.0
    bounds, accuracies = [], []
    with torch.no_grad():
        for _ in range(batches):
            predicted, observed = make_pairs(g)
            unrelated, _ = make_pairs(g)
            predicted = torch.where(weight[..., None] > 0, predicted, unrelated)
            _, metrics = cpc(predicted, observed, weight)
            bounds.append(metrics["cpc_mi_bound"].item())
            accuracies.append(metrics["cpc_accuracy_k1"].item())
    b = torch.tensor(bounds)
    return b.mean().item(), (b.std() / math.sqrt(len(b))).item(), sum(accuracies) / len(accuracies)


def optimal_slot_cpc(kappa: float) -> SlotCPC:
    """SlotCPC whose critic is the vMF density ratio: identity projections, temperature 1/kappa."""
    cpc = SlotCPC(3, 3, 1 / kappa, LayerFactory())
    with torch.no_grad():
        for projection in (cpc.query, cpc.key):
            projection.weight.copy_(torch.eye(3))
            projection.bias.zero_()
    return cpc


# Measured on seed 0 with these settings: see each case's comment.
@pytest.mark.parametrize(
    "kappa",
    [
        2.0,  # I = 0.48 nats: bound 0.47, accuracy 0.031
        8.0,  # I = 1.77 nats: bound 1.74, accuracy 0.113
    ],
)
def test_slot_cpc_with_the_optimal_critic_tracks_the_true_mi(kappa):
    """I <= log N / 2: the bound is within 0.15 nats below I (InfoNCE's finite-N gap at these
    I and N = 128 is under 0.1 nats; plus ~3 standard errors of the 48-batch mean, 0.015-0.02
    nats each) and at most 0.08 over it (a lower bound: only sampling noise lifts it). Accuracy
    above 2x chance (chance 1/128 = 0.0078; binomial sd of a chance accuracy over 48 x 64
    anchors is 0.0016, so 2x chance is 5 sd above it)."""
    mi = vmf_mi(kappa)
    bound, se, accuracy = slot_cpc_bound(
        optimal_slot_cpc(kappa), lambda g: vmf_pairs(SLOT_LEAD, kappa, g), seed=0
    )
    assert mi - 0.15 < bound < mi + 0.08, (mi, bound, se)
    assert accuracy > 2 / math.prod(SLOT_LEAD), accuracy


def test_slot_cpc_with_the_optimal_critic_saturates_at_log_n():
    """kappa = 10^4: I = 8.9 nats >> log N = 4.85. The bound is within 0.05 nats of log N
    (measured 4.839: a few of 128 uniform directions lie within the vMF spread of one another,
    so not every loss is ~0) and the accuracy above 0.98 (measured 0.993)."""
    kappa, log_n = 1e4, math.log(math.prod(SLOT_LEAD))
    assert vmf_mi(kappa) > log_n + 4
    bound, _, accuracy = slot_cpc_bound(
        optimal_slot_cpc(kappa), lambda g: vmf_pairs(SLOT_LEAD, kappa, g), seed=0
    )
    assert log_n - 0.05 < bound <= log_n + 1e-6, bound
    assert accuracy > 0.98, accuracy


def test_slot_cpc_learns_a_bound_that_tracks_gaussian_mi():
    """The learned projections (as loss/cpc trains them) on correlated Gaussian slots: x ~
    N(0, I_4), y = rho x + sqrt(1 - rho^2) n share I = -4/2 log(1 - rho^2) = 1 nat. After 600
    Adam steps the bound is between 0.6 and 1 nat (+3 standard errors): a cosine critic sees
    directions only, so it cannot reach the optimal critic (measured 0.81; 0.77-0.81 over
    seeds 0-3). Accuracy above 3x chance (measured 0.080). Independent slots (rho = 0): within
    0.05 nats of 0 (measured -0.004) and accuracy within 4 binomial sd of chance (measured
    0.0065 against 0.0078 +- 0.0064)."""
    chance = 1 / math.prod(SLOT_LEAD)
    for mi in (1.0, 0.0):
        rho = math.sqrt(1 - math.exp(-2 * mi / 4))

        def gaussian_pairs(g, rho=rho):
            x = torch.randn(*SLOT_LEAD, 4, generator=g)
            return x, rho * x + math.sqrt(1 - rho**2) * torch.randn(*SLOT_LEAD, 4, generator=g)

        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        cpc = SlotCPC(4, 16, 0.1, LayerFactory())
        opt = torch.optim.Adam(cpc.parameters(), lr=3e-3)
        for _ in range(600):
            loss, _ = cpc(*gaussian_pairs(g), torch.ones(SLOT_LEAD))
            opt.zero_grad()
            loss.backward()
            opt.step()
        bound, se, accuracy = slot_cpc_bound(cpc, gaussian_pairs, seed=1)
        anchors = SLOT_BATCHES * math.prod(SLOT_LEAD) // 2
        if mi > 0:
            assert 0.6 < bound < mi + 3 * se, (bound, se)
            assert accuracy > 3 * chance, accuracy
        else:
            assert -0.05 < bound < 3 * se + 0.01, (bound, se)
            assert abs(accuracy - chance) < 4 * math.sqrt(chance * (1 - chance) / anchors)


# --------------------------------------------------------------------------------------
# Invariance to the order of the slots
# --------------------------------------------------------------------------------------


def test_cpc_loss_invariant_to_slot_order():
    model = tiny_model(representation="cpc")
    torch.manual_seed(2)
    B, T, K = 2, 3, model.num_slots
    target = random_slots(model, B, T)
    prior = target + 0.05 * torch.randn_like(target)
    weight = torch.rand(B, T, K)
    loss, metrics = model.cpc_loss(prior, target, weight)
    # The same permutation of predictions, targets and weights: the same loss.
    perm = _perms(B, T, K=K)
    loss_p, metrics_p = model.cpc_loss(
        _permute(prior, perm), _permute(target, perm), weight.gather(-1, perm)
    )
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(metrics_p["cpc_accuracy_k1"], metrics["cpc_accuracy_k1"])
    # Only the targets permuted (a frame's slots come in their own order): the matching
    # (as loss_and_states does it) undoes it, and the loss is the same.
    shuffled = _permute(target, _perms(B, T, K=K))
    matched = match_slots(prior, shuffled, model._feature_error)
    torch.testing.assert_close(matched, target)
    torch.testing.assert_close(model.cpc_loss(prior, matched, weight)[0], loss)


@pytest.mark.parametrize("representation", ["reconstruction+cpc", "cpc"])
def test_model_losses_ignore_the_order_of_the_inferred_slots(representation):
    """End to end: the posterior slots of every frame delivered in another order leave
    ``loss/cpc`` (and ``loss/dynamics``) unchanged."""
    model = tiny_model(representation=representation)
    batch = _batch()
    with torch.no_grad():
        losses, _ = model.loss(batch)
        observe = model.observe
        perm = _perms(2, 3, K=model.num_slots)

        def shuffled_observe(*args, **kwargs):
            states = observe(*args, **kwargs)
            return {**states, "post": _permute(states["post"], perm)}

        model.observe = shuffled_observe
        permuted, _ = model.loss(batch)
    for key in ("loss/cpc", "loss/dynamics", "loss/reconstruction"):
        torch.testing.assert_close(permuted[key], losses[key], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


def _reached(model: SlotWorldModel, loss: torch.Tensor) -> dict[str, bool]:
    """Which parameter groups ``loss`` has a non-zero gradient on (``torch.autograd.grad``)."""
    groups = {
        "encoder": list(model.encoder.parameters()),
        "attention": list(model.attention.parameters()),
        "init": list(model.init_norm.parameters()) + list(model.init_proj.parameters()),
        "decoder": list(model.decoder.parameters()),
        "dynamics": list(model.dynamics.parameters()),
        "cpc": list(model.cpc.parameters()),
    }
    names = list(groups)
    flat = [p for n in names for p in groups[n]]
    grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    out, i = {}, 0
    for name in names:
        chunk = grads[i : i + len(groups[name])]
        i += len(groups[name])
        out[name] = any(g is not None and bool(g.abs().sum() > 0) for g in chunk)
    return out


@pytest.mark.parametrize("inference", ["fresh", "filter"])
def test_cpc_gradients_reach_only_the_dynamics_and_projections(inference):
    model = tiny_model(representation="cpc", inference=inference, background=True)
    losses, _ = model.loss(_batch())
    reached = _reached(model, losses["loss/cpc"])
    assert reached["dynamics"] and reached["cpc"]
    assert not reached["decoder"]
    if inference == "fresh":  # filter: the posterior is refined from the prior (OP3)
        assert not reached["encoder"] and not reached["attention"] and not reached["init"]
    (background,) = torch.autograd.grad(
        losses["loss/cpc"], [model.background], retain_graph=True, allow_unused=True
    )
    assert background is None or not bool(background.abs().sum() > 0)
    # With dynamics_trains_perception the contrastive loss trains the perception (C-SWM).
    model = tiny_model(representation="cpc", inference=inference, dynamics_trains_perception=True)
    losses, _ = model.loss(_batch())
    reached = _reached(model, losses["loss/cpc"])
    assert reached["encoder"] and reached["attention"] and reached["dynamics"] and reached["cpc"]


def test_cpc_mode_decodes_no_prediction():
    """``representation=cpc``: the decoder runs once (the posterior's reconstruction), never
    on the prior slots; with reconstruction(+cpc) it runs twice."""
    calls: dict[str, list[int]] = {}
    for representation in ("reconstruction", "reconstruction+cpc", "cpc"):
        model = tiny_model(representation=representation)
        sizes: list[int] = []
        model.decoder.register_forward_hook(lambda m, args, out, s=sizes: s.append(len(args[0])))
        losses, _ = model.loss(_batch())
        calls[representation] = sizes
        if representation == "cpc":
            assert "loss/prediction" not in losses
            total = losses["loss/dynamics"] + losses["loss/cpc"]
            assert not _reached(model, total)["decoder"]
    B, T = 2, 3
    assert calls["cpc"] == [B * T]  # the posterior of every frame, once
    assert len(calls["reconstruction"]) == 2 and len(calls["reconstruction+cpc"]) == 2


# --------------------------------------------------------------------------------------
# The agent and its config
# --------------------------------------------------------------------------------------


def _spaces():
    pixels = gym.spaces.Box(0, 255, (3, 32, 32), np.uint8)
    obs = gym.spaces.Dict({"pixels": pixels, "goal": pixels})
    return obs, gym.spaces.Box(-1.0, 1.0, (4,), np.float32)


def _config(*extra: str):
    return build_config(["preset=debug", "agent=op3", "env=blocks:push-3", "env.size=32", *extra])


def _replay_batch():
    torch.manual_seed(3)
    return {
        "pixels": torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8),
        "action": torch.rand(2, 3, 4) * 2 - 1,
        "is_first": torch.zeros(2, 3, dtype=torch.bool),
    }


def test_config_keys_and_agent_update():
    config = _config("op3.representation=cpc", "op3.cpc_scale=0.5", "op3.cpc_temperature=0.2")
    assert config.op3.representation == "cpc" and config.op3.cpc_scale == 0.5
    assert _config().op3.representation == "reconstruction"
    with pytest.raises(ConfigError, match="representation"):
        _config("op3.representation=contrastive")
    with pytest.raises(ConfigError, match="cpc_temperature"):
        _config("op3.cpc_temperature=0")
    agent = OP3Agent(config, *_spaces())
    assert agent.wm.cpc is not None and agent.wm.cpc.temperature == 0.2
    metrics = agent.update(_replay_batch())
    assert "loss/prediction" not in metrics
    for key in ("loss/cpc", *(f"world_model/{m}" for m in CPC_METRICS)):
        assert np.isfinite(float(metrics[key])), key
    expected = metrics["loss/reconstruction"] + metrics["loss/dynamics"] + 0.5 * metrics["loss/cpc"]
    torch.testing.assert_close(metrics["loss/world_model"], expected)


def test_cpc_agent_starts_from_reconstruction_weights_and_freezes_perception():
    """``init=`` from a reconstruction perception keeps the new model's fresh projections;
    ``freeze_perception`` trains the dynamics and the projections only."""
    obs_space, action_space = _spaces()
    trained = OP3Agent(_config(), obs_space, action_space)
    agent = OP3Agent(
        _config("op3.representation=cpc", "op3.freeze_perception=true"), obs_space, action_space
    )
    agent.load_weights(trained.state_dict()["weights"])
    for key, value in trained.wm.state_dict().items():
        torch.testing.assert_close(agent.wm.state_dict()[key], value)
    before = {k: v.clone() for k, v in agent.wm.state_dict().items()}
    for _ in range(2):
        agent.update(_replay_batch())
    after = agent.wm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("cpc.") for k in changed)
    assert changed and all(k.startswith(("dynamics.", "cpc.")) for k in changed), sorted(changed)
    # ...and the other way: a cpc model's weights load into a reconstruction agent.
    trained.load_weights(agent.state_dict()["weights"])
    # loss/cpc alone can train a frozen perception's dynamics.
    OP3Agent(
        _config(
            "op3.representation=cpc",
            "op3.freeze_perception=true",
            "op3.dynamics_scale=0",
            "op3.prediction_scale=0",
        ),
        obs_space,
        action_space,
    )
    with pytest.raises(ValueError, match="freeze_perception"):
        OP3Agent(
            _config(
                "op3.representation=cpc",
                "op3.freeze_perception=true",
                "op3.dynamics_scale=0",
                "op3.cpc_scale=0",
            ),
            obs_space,
            action_space,
        )


# --------------------------------------------------------------------------------------
# Hits@1 and MRR
# --------------------------------------------------------------------------------------


def test_ranking_metrics_on_hand_made_cases():
    model = tiny_model()
    torch.manual_seed(4)
    target = random_slots(model, 6)
    perfect = ranking_metrics(target, target)
    assert perfect["hits_at_1"] == 1.0 and perfect["mrr"] == 1.0
    assert perfect["ranks"].tolist() == [1] * 6
    # The slots of each prediction in another order: still perfect (matched distances).
    reordered = _permute(target, _perms(6, K=model.num_slots))
    assert ranking_metrics(reordered, target)["hits_at_1"] == 1.0
    # Predictions close to their own targets, with the planner's distance too.
    near = target + 0.01 * torch.randn_like(target)
    assert ranking_metrics(near, target)["mrr"] == 1.0

    def planner(a, b):
        return slot_distances(a, b, model.spec.slot_dim, 5.0)

    assert ranking_metrics(near, target, planner)["hits_at_1"] == 1.0
    # Every prediction is another sample's state: no hit; its own target ranks 2nd or lower.
    shuffled = ranking_metrics(target.roll(1, 0), target)
    assert shuffled["hits_at_1"] == 0.0 and shuffled["mrr"] <= 0.5
    # Hand-made ranks: 1-d "slots", one slot each; prediction i lies nearest to target 0.
    pred = torch.tensor([[[0.0]], [[0.1]], [[0.2]]])
    truth = torch.tensor([[[0.0]], [[1.0]], [[2.0]]])
    ranks = ranking_metrics(pred, truth)
    assert ranks["ranks"].tolist() == [1, 2, 3]
    assert ranks["hits_at_1"] == pytest.approx(1 / 3)
    assert ranks["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_op3_checks_hits_runs(tmp_path):
    from test_scripts import run_script

    out = tmp_path / "hits.json"
    run_script(
        "dev/op3_checks.py",
        "check=hits",
        "test_episodes=3",
        "hits_steps=1,2",
        *TINY_OP3,
        "op3.representation=cpc",
        f"json={out}",
    )
    report = json.loads(out.read_text())
    assert report["check"] == "hits" and report["test_episodes"] == 3
    for k in ("k1", "k2"):
        for name in ("latent", "planner"):
            assert 0.0 <= report[k][name]["hits_at_1"] <= 1.0
            assert 1 / 3 <= report[k][name]["mrr"] <= 1.0
