"""The OP3-like agent: slot world model symmetries, planning pieces, ARI, and the scripts."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import imagine_rl.worldmodels.planning as planning
from imagine_rl.agents.op3 import OP3Agent
from imagine_rl.runtime.config import ConfigError, build_config
from imagine_rl.runtime.metrics import adjusted_rand_index, foreground_ari
from imagine_rl.worldmodels.layers import LayerFactory
from imagine_rl.worldmodels.planning import GoalCost, cem
from imagine_rl.worldmodels.slot_metrics import matched_slot_distance, slot_distances
from imagine_rl.worldmodels.slots import (
    MIN_SCALE,
    SlotDynamics,
    SlotSpec,
    SlotWorldModel,
    farthest_tokens,
    hungarian_order,
    match_slots,
)

TINY = SlotSpec(
    slots=4, slot_dim=8, iterations=2, cnn_depth=8, decoder_depth=8, hidden=16, resolution=16
)


def tiny_model(**changes) -> SlotWorldModel:
    torch.manual_seed(0)
    spec = SlotSpec(**{**TINY.__dict__, **changes})
    return SlotWorldModel((3, 32, 32), 4, spec)


def random_slots(model: SlotWorldModel, n: int = 2) -> torch.Tensor:
    slots = torch.randn(n, model.num_slots, model.state_dim)
    slots[..., -4:-2] = torch.rand(n, model.num_slots, 2)  # positions in the image
    slots[..., -2:] = 0.05 + 0.2 * torch.rand(n, model.num_slots, 2)  # scales
    return slots


# --------------------------------------------------------------------------------------
# Permutation symmetry
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [0, 2])
def test_dynamics_permutation_equivariant(topk):
    torch.manual_seed(0)
    dynamics = SlotDynamics(12, 3, 16, topk, LayerFactory())
    slots, action = torch.randn(3, 5, 12), torch.randn(3, 3)
    perm = torch.tensor([3, 0, 4, 1, 2])
    out, info = dynamics(slots, action)
    out_p, info_p = dynamics(slots[:, perm], action)
    torch.testing.assert_close(out_p, out[:, perm])
    torch.testing.assert_close(info_p["action_weight"], info["action_weight"][:, perm])
    torch.testing.assert_close(
        info_p["interaction_weight"], info["interaction_weight"][:, perm][:, :, perm]
    )
    weights = info["interaction_weight"]
    assert torch.all(weights.diagonal(dim1=1, dim2=2) == 0)  # no slot acts on itself
    if topk:  # the sparse graph: exactly topk partners per slot
        assert torch.all((weights > 0).sum(-1) == topk)


@pytest.mark.parametrize("background", [False, True])
def test_decoder_per_slot_outputs_permute_and_masks_sum_to_one(background):
    model = tiny_model(background=background)
    if model.background is not None:
        with torch.no_grad():  # a background layer that is not uniform
            model.background.normal_()
    slots = random_slots(model)
    perm = torch.tensor([2, 0, 3, 1])
    out, out_p = model.decode(slots), model.decode(slots[:, perm])
    # Components: the background layer first (when there is one, unaffected), then the slots.
    b = int(background)
    assert model.num_components == 4 + b
    for key in ("rgb", "masks"):
        torch.testing.assert_close(out_p[key][:, b:], out[key][:, b:][:, perm])
        torch.testing.assert_close(out_p[key][:, :b], out[key][:, :b])
    torch.testing.assert_close(out_p["image"], out["image"], atol=1e-5, rtol=1e-5)
    # Mixture masks: a distribution over the components at every pixel.
    assert out["masks"].shape == (2, 4 + b, 1, 16, 16)
    assert torch.all(out["masks"] >= 0)
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(2, 1, 16, 16))


def test_slot_attention_and_transition_permutation_equivariant():
    model = tiny_model().eval()
    pixels = torch.rand(2, 3, 32, 32) - 0.5
    tokens, colours = model.encode(pixels)
    init = model.initial(tokens, colours)
    perm = torch.tensor([1, 3, 0, 2])
    refined, attn = model.refine(tokens, init)
    refined_p, attn_p = model.refine(tokens, init[:, perm])
    torch.testing.assert_close(refined_p, refined[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn_p, attn[..., perm], atol=1e-5, rtol=1e-5)
    action = torch.rand(2, 4)
    torch.testing.assert_close(
        model.transition(refined[:, perm], action), model.transition(refined, action)[:, perm]
    )


def test_farthest_tokens_picks_distinct_colours():
    colours = torch.zeros(1, 16, 3)
    colours[0, 5] = torch.tensor([1.0, 0.0, 0.0])
    colours[0, 11] = torch.tensor([0.0, 0.0, 1.0])
    picked = farthest_tokens(colours, 3)[0].tolist()
    assert set(picked[:2]) == {5, 11} and picked[2] not in (5, 11)


# --------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------


def test_cem_finds_quadratic_optimum():
    target = torch.tensor([[[0.3, -0.6], [0.0, 0.8]], [[-0.9, 0.2], [0.5, 0.5]]])  # [N, H, A]

    def cost(actions):  # [N, P, H, A] -> [N, P]
        return (actions - target[:, None]).square().sum((-2, -1))

    generator = torch.Generator().manual_seed(0)
    best, best_cost = cem(cost, torch.zeros(2, 2, 2), 1.0, 200, 20, 8, generator=generator)
    assert best.shape == (2, 2, 2) and best_cost.shape == (2,)
    torch.testing.assert_close(best, target, atol=0.05, rtol=0)
    assert torch.all(best_cost < 0.01)


def test_hungarian_matched_distance_is_permutation_invariant():
    torch.manual_seed(0)
    pred, goal = torch.randn(3, 5, 10), torch.randn(3, 5, 10)
    base = matched_slot_distance(pred, goal, slot_dim=6, position_weight=2.0)
    for _ in range(3):
        p, q = torch.randperm(5), torch.randperm(5)
        torch.testing.assert_close(
            matched_slot_distance(pred[:, p], goal[:, q], slot_dim=6, position_weight=2.0), base
        )
    # The same slots in another order are at distance 0; matching beats the identity pairing.
    torch.testing.assert_close(matched_slot_distance(pred, pred[:, p]), torch.zeros(3))
    identity = slot_distances(pred, goal).diagonal(dim1=-2, dim2=-1).sum(-1)
    assert torch.all(matched_slot_distance(pred, goal) <= identity + 1e-6)


@pytest.mark.parametrize("K", [1, 2, 3, 5, 6, 7])
def test_hungarian_order_is_optimal_on_device_and_by_scipy(K):
    """Up to EXACT_MATCHING_MAX_SLOTS every permutation is scored on the device, above it
    scipy's Hungarian algorithm runs: both reach scipy's optimal cost, as a permutation."""
    from scipy.optimize import linear_sum_assignment

    torch.manual_seed(K)
    costs = torch.rand(2, 50, K, K)
    order = hungarian_order(costs)
    assert order.shape == (2, 50, K) and order.dtype == torch.long
    assert torch.equal(order.sort(-1).values, torch.arange(K).expand_as(order))
    total = costs.gather(-1, order[..., None])[..., 0].sum(-1)
    best = []
    for matrix in costs.reshape(-1, K, K).numpy():
        rows, cols = linear_sum_assignment(matrix)
        best.append(matrix[rows, cols].sum())
    torch.testing.assert_close(total.flatten(), torch.tensor(best), atol=1e-5, rtol=0)
    assert hungarian_order(costs[:0]).shape == (0, 50, K)


def test_match_slots_undoes_a_permutation_and_dynamics_loss_ignores_slot_order():
    model = tiny_model()
    torch.manual_seed(1)
    reference = random_slots(model, 6).reshape(2, 3, model.num_slots, model.state_dim)
    perm = torch.stack([torch.randperm(model.num_slots) for _ in range(6)]).reshape(2, 3, -1)
    shuffled = reference.gather(-2, perm[..., None].expand_as(reference))
    noisy = shuffled + 0.01 * torch.randn_like(shuffled)
    matched = match_slots(reference, noisy, model._slot_error)
    torch.testing.assert_close(matched, reference, atol=0.05, rtol=0)
    # With fresh inference a frame's slots come in their own order: permuting the posterior
    # slots of the frames must not change the dynamics loss.
    batch = _batch(2, 3)
    with torch.no_grad():
        states = model.observe(batch["pixels"], batch["action"], batch["is_first"])
        target = states["post"]
        a = model._slot_error(
            states["prior"], match_slots(states["prior"], target, model._slot_error)
        )
        permuted = target.gather(-2, perm[..., None].expand_as(target))
        b = model._slot_error(
            states["prior"], match_slots(states["prior"], permuted, model._slot_error)
        )
    torch.testing.assert_close(a[0], b[0])


# --------------------------------------------------------------------------------------
# Losses and gradients
# --------------------------------------------------------------------------------------


def _batch(B: int = 2, T: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    is_first = torch.zeros(B, T)
    is_first[:, 0] = 1
    return {
        "pixels": torch.rand(B, T, 3, 32, 32) - 0.5,
        "action": torch.rand(B, T, 4) * 2 - 1,
        "is_first": is_first,
    }


def _grads(model: SlotWorldModel, loss: torch.Tensor) -> dict[str, bool]:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    parts = ("encoder", "attention", "decoder", "dynamics")
    reached = {}
    for part in parts:
        grads = [p.grad for p in getattr(model, part).parameters()]
        reached[part] = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    return reached


def test_loss_terms_finite_and_gradients_reach_the_right_parameters():
    model = tiny_model()
    losses, metrics = model.loss(_batch())
    assert set(losses) == {"loss/reconstruction", "loss/prediction", "loss/dynamics"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in [*losses.values(), *metrics.values()])
    assert all(float(v.detach()) > 0 for v in losses.values())
    # The dynamics learn from predicting the next frame and the next slots, on the slots the
    # perception gives them: by default neither term trains the encoder or slot attention...
    assert _grads(model, losses["loss/prediction"]) == {
        "encoder": False,
        "attention": False,
        "decoder": True,
        "dynamics": True,
    }
    assert _grads(model, losses["loss/dynamics"]) == {
        "encoder": False,
        "attention": False,
        "decoder": False,
        "dynamics": True,
    }
    # ...and single frames (the segmentation phase) train everything but the dynamics.
    single = {k: v[:, :1] for k, v in _batch().items()}
    single_losses, _ = model.loss(single)
    assert float(single_losses["loss/prediction"].detach()) == 0.0
    assert float(single_losses["loss/dynamics"].detach()) == 0.0
    assert _grads(model, single_losses["loss/reconstruction"]) == {
        "encoder": True,
        "attention": True,
        "decoder": True,
        "dynamics": False,
    }


@pytest.mark.parametrize("inference", ["fresh", "filter"])
def test_dynamics_trains_perception_only_when_asked(inference):
    model = tiny_model(inference=inference, dynamics_trains_perception=True)
    losses, _ = model.loss(_batch())
    for key in ("loss/prediction", "loss/dynamics"):
        reached = _grads(model, losses[key])
        assert reached["encoder"] and reached["attention"] and reached["dynamics"], key
    model = tiny_model(inference=inference)
    losses, _ = model.loss(_batch())
    reached = _grads(model, losses["loss/dynamics"])
    assert reached["dynamics"] and not reached["decoder"]
    if inference == "fresh":  # filter: the posterior is refined from the prior (OP3)
        assert not reached["encoder"] and not reached["attention"]


def test_reconstruction_loss_falls():
    model = tiny_model()
    batch = {k: v[:, :1] for k, v in _batch(4, 1).items()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model.loss(batch)[0]["loss/reconstruction"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


@pytest.mark.parametrize("inference", ["fresh", "filter"])
def test_observe_rollout_shapes_and_segment_masks(inference):
    model = tiny_model(inference=inference)
    batch = _batch(2, 3)
    states = model.observe(batch["pixels"], batch["action"], batch["is_first"])
    K, S = model.num_slots, model.state_dim
    assert states["post"].shape == states["prior"].shape == (2, 3, K, S)
    assert states["attention"].shape == (2, 3, 64, K)  # 8 x 8 tokens at resolution 16
    assert states["has_prior"].tolist() == [[0.0, 1.0, 1.0]] * 2
    actions = torch.rand(2, 5, 4)
    rollout = model.rollout({"slots": states["post"][:, -1]}, actions)
    assert set(rollout) == {"slots"} and rollout["slots"].shape == (2, 5, K, S)
    # The slots after each action, the start left out.
    first = model.transition(states["post"][:, -1], actions[:, 0])
    torch.testing.assert_close(rollout["slots"][:, 0], first)
    torch.testing.assert_close(rollout["slots"][:, 1], model.transition(first, actions[:, 1]))
    masks = model.segment(batch["pixels"][:, 0])  # back at the frames' 32 x 32
    assert masks.shape == (2, K, 32, 32)
    torch.testing.assert_close(masks.sum(1), torch.ones(2, 32, 32))


def test_imagine_carries_the_goal_and_rollout_replays_its_actions():
    """Closed loop (``imagine``) and open loop (``rollout``) over slot States: the policy sees
    the start's goal at every step, the goal is carried unchanged, and replaying the imagined
    actions open loop gives the same slots (the dynamics is deterministic)."""
    model = tiny_model()
    K, S = model.num_slots, model.state_dim
    torch.manual_seed(2)
    start = {"slots": random_slots(model), "goal": random_slots(model)}
    seen = []

    def policy(state):
        seen.append(state)
        return torch.tanh(state["slots"][:, 0, :4] + state["goal"][:, 1, :4])

    with torch.no_grad():
        imagined = model.imagine(policy, start, 3)
        assert imagined["slots"].shape == imagined["goal"].shape == (2, 4, K, S)
        assert imagined["action"].shape == (2, 3, 4) and len(seen) == 3
        assert all(torch.equal(state["goal"], start["goal"]) for state in seen)
        torch.testing.assert_close(imagined["slots"][:, 0], start["slots"])
        torch.testing.assert_close(imagined["goal"], start["goal"][:, None].expand(2, 4, K, S))
        rolled = model.rollout(start, imagined["action"])
        assert rolled["slots"].shape == rolled["goal"].shape == (2, 3, K, S)
        assert torch.equal(rolled["slots"], imagined["slots"][:, 1:])
        # Zero steps: the start alone, and no states after it.
        assert model.imagine(policy, start, 0)["action"].shape == (2, 0, 4)
        assert model.rollout(start, torch.zeros(2, 0, 4))["slots"].shape == (2, 0, K, S)
    with pytest.raises(AssertionError, match="expected start slots"):
        model.rollout({"slots": start["slots"][:, :2]}, imagined["action"])


def test_feat_concatenates_the_slots_in_order_then_the_goal():
    model = tiny_model()
    K, S = model.num_slots, model.state_dim
    slots = random_slots(model, 6).reshape(2, 3, K, S)
    feat = model.feat({"slots": slots})
    assert model.feat_size == K * S and feat.shape == (2, 3, K * S)
    for k in range(K):
        assert torch.equal(feat[..., k * S : (k + 1) * S], slots[..., k, :])
    with pytest.raises(ValueError, match="goal_features=False"):
        model.feat({"slots": slots, "goal": slots})
    goal_model = tiny_model(goal_features=True, goal_pairing="concat")
    assert goal_model.goal_attention is None
    goal = slots.flip(-2)
    feat = goal_model.feat({"slots": slots, "goal": goal})
    assert goal_model.feat_size == 2 * K * S and feat.shape == (2, 3, 2 * K * S)
    assert torch.equal(feat, torch.cat([slots.flatten(-2), goal.flatten(-2)], -1))
    with pytest.raises(ValueError, match="goal_features=True"):
        goal_model.feat({"slots": slots})


def test_matched_goal_pairs_equal_a_hand_computation():
    model = tiny_model(goal_features=True)  # goal_pairing="matched" is the default
    K, S, D = model.num_slots, model.state_dim, model.spec.slot_dim
    slots = random_slots(model, 2)
    # The goal shows the same objects (features) elsewhere (frames), in another slot order.
    perm = torch.tensor([2, 0, 3, 1])
    goal = slots[:, perm].clone()
    goal[..., D:] = torch.rand(2, K, 4)
    pairs = model.goal_pairs(slots, goal)
    assert pairs.shape == (2, K, 2 * S + 3) and model.pair_size == 2 * S + 3
    for n in range(2):
        for k in range(K):
            j = int((perm == k).nonzero())  # the goal slot showing slot k's object
            offset = goal[n, j, D : D + 2] - slots[n, k, D : D + 2]
            expected = torch.cat([slots[n, k], goal[n, j], offset, offset.norm()[None]])
            torch.testing.assert_close(pairs[n, k], expected)
    # feat: softmax over the K pairs of each of the K scores, the pairs' weighted sums.
    with torch.no_grad():
        model.goal_attention.weight.normal_()
    weights = torch.softmax(pairs @ model.goal_attention.weight.T + model.goal_attention.bias, 1)
    expected = torch.einsum("nkq,nkp->nqp", weights, pairs).flatten(1)
    feat = model.feat({"slots": slots, "goal": goal})
    assert model.feat_size == K * (2 * S + 3) and feat.shape == (2, model.feat_size)
    torch.testing.assert_close(feat, expected)


def test_matched_goal_features_ignore_the_order_of_slots_and_goal_slots():
    model = tiny_model(goal_features=True)
    with torch.no_grad():
        model.goal_attention.weight.normal_()
    slots, goal = random_slots(model, 3), random_slots(model, 3)
    feat = model.feat({"slots": slots, "goal": goal})
    for perm_slots, perm_goal in [([3, 2, 1, 0], [0, 1, 2, 3]), ([1, 3, 0, 2], [2, 0, 3, 1])]:
        permuted = {"slots": slots[:, perm_slots], "goal": goal[:, perm_goal]}
        torch.testing.assert_close(model.feat(permuted), feat)
    # The concatenation is order dependent: the reason for the matching.
    concat = tiny_model(goal_features=True, goal_pairing="concat")
    permuted = concat.feat({"slots": slots, "goal": goal[:, [1, 0, 2, 3]]})
    assert not torch.allclose(permuted, concat.feat({"slots": slots, "goal": goal}))


def test_the_reward_loss_trains_the_goal_pooling_scores():
    model = tiny_model(heads=True, goal_features=True)
    batch = _head_batch()
    batch["goal"] = batch["pixels"].flip(1)
    with torch.no_grad():  # the reward head's output starts at 0 and passes no gradient back
        model.reward_head[-1].weight.normal_()
    losses, _, _ = model.loss_and_states(batch)
    losses["loss/reward"].backward()
    grad = model.goal_attention.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="goal_pairing"):
        SlotSpec(goal_pairing="sorted")


def _head_batch(B: int = 2, T: int = 3) -> dict[str, torch.Tensor]:
    batch = _batch(B, T)
    batch["reward"] = torch.tensor([[0.0, 2.0, -3.0], [1.0, 0.0, 10.0]])[:B, :T]
    batch["is_terminal"] = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])[:B, :T]
    return batch


def test_heads_are_built_last_and_only_when_asked():
    """Without SlotSpec.heads there are no reward/continue parameters (today's models and
    checkpoints), and asking for a reward is a one-line error; with them the other
    parameters are exactly those of the model without heads."""
    plain, headed = tiny_model(), tiny_model(heads=True)
    assert plain.reward_head is None and plain.continue_head is None
    feat = torch.zeros(3, plain.feat_size)
    for method in (plain.reward, plain.continue_prob):
        with pytest.raises(ValueError, match="SlotSpec.heads=True"):
            method(feat)
    mine, theirs = plain.state_dict(), headed.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in mine.items())
    extra = sorted(set(theirs) - set(mine))
    assert extra and all(k.startswith(("reward_head.", "continue_head.")) for k in extra)
    # Same parameters: the same world-model losses, plus the two head losses.
    with torch.no_grad():
        base, _ = plain.loss(_batch())
        with_heads, _ = headed.loss(_head_batch())
    assert set(with_heads) == set(base) | {"loss/reward", "loss/continue"}
    assert all(torch.equal(with_heads[k], base[k]) for k in base)
    with pytest.raises(ValueError, match="lacks \\['reward', 'is_terminal'\\]"):
        headed.loss(_batch())


def test_head_losses_and_predictions_by_hand():
    model = tiny_model(heads=True)
    batch = _head_batch()
    losses, metrics, post = model.loss_and_states(batch)
    assert set(post) == {"slots"} and post["slots"].shape == (2, 3, 4, model.state_dim)
    feat = model.feat(post)
    with torch.no_grad():
        reward_out = model.reward_head(feat)[..., 0]
        logits = model.continue_head(feat)[..., 0]
    reward = batch["reward"]
    symlog = reward.sign() * (reward.abs() + 1).log()
    torch.testing.assert_close(losses["loss/reward"], (reward_out - symlog).square().mean())
    target = 1.0 - batch["is_terminal"]
    prob = 1.0 / (1.0 + (-logits).exp())
    bce = -(target * prob.log() + (1 - target) * (1 - prob).log()).mean()
    torch.testing.assert_close(losses["loss/continue"], bce)
    # reward() undoes the symlog; continue_prob() is the sigmoid; both [B, T].
    predicted = model.reward(feat)
    assert predicted.shape == (2, 3)
    torch.testing.assert_close(predicted, reward_out.sign() * (reward_out.abs().exp() - 1))
    torch.testing.assert_close(model.continue_prob(feat), prob)
    assert torch.isfinite(metrics["world_model/reward_error"])
    # The heads learn on the slots the perception gives them (detached by default).
    reached = _grads(model, losses["loss/reward"] + losses["loss/continue"])
    assert not any(reached.values())
    assert all(p.grad is not None for p in model.reward_head.parameters())
    assert all(p.grad is not None for p in model.continue_head.parameters())


def test_goal_features_infer_the_goal_frames_into_the_posterior():
    model = tiny_model(heads=True, goal_features=True)
    batch = {**_head_batch(), "goal": torch.rand(2, 3, 3, 32, 32) - 0.5}
    losses, _, post = model.loss_and_states(batch)
    assert set(post) == {"slots", "goal"} and post["goal"].shape == post["slots"].shape
    with torch.no_grad():
        expected = model.infer(batch["goal"].flatten(0, 1)).unflatten(0, (2, 3))
    torch.testing.assert_close(post["goal"], expected)
    assert not post["goal"].requires_grad  # a conditioning input: it trains no perception
    assert model.feat(post).shape == (2, 3, model.feat_size)
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="lacks \\['goal'\\]"):
        model.loss(_head_batch())


def _assert_canonical(slots: torch.Tensor, slot_dim: int) -> None:
    features, frames = slots[..., :slot_dim], slots[..., slot_dim:]
    rms = features.square().mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    torch.testing.assert_close(features.mean(-1), torch.zeros_like(rms), atol=1e-4, rtol=0)
    assert bool((frames[..., :2] >= 0).all() and (frames[..., :2] <= 1).all())
    assert bool((frames[..., 2:] >= MIN_SCALE).all() and (frames[..., 2:] <= 1).all())


@pytest.mark.parametrize("inference", ["fresh", "filter"])
def test_slot_states_stay_canonical_even_with_runaway_dynamics(inference):
    """The prior -> posterior -> dynamics-target loop once ran the slot magnitudes up to 1e7:
    every slot state (fresh, refined, predicted, imagined) is now normalised, so a dynamics
    whose output layer is blown up 1000x still yields unit-RMS features and frames inside
    the image, and the losses stay finite."""
    model = tiny_model(inference=inference)
    D = model.spec.slot_dim
    with torch.no_grad():
        for p in model.dynamics.update.parameters():
            p.mul_(1000.0)
    batch = _batch(2, 4)
    states = model.observe(batch["pixels"], batch["action"], batch["is_first"])
    for key in ("post", "prior"):
        _assert_canonical(states[key], D)
    rollout = model.rollout({"slots": states["post"][:, -1]}, torch.rand(2, 6, 4) * 2 - 1)
    _assert_canonical(rollout["slots"], D)
    with torch.no_grad():
        losses, metrics = model.loss(batch)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    # Features are unit-RMS, centres inside the image: the dynamics loss has a hard ceiling
    # (4 per feature dimension, 25 x 1 for the centres, 1 for the scales).
    assert float(losses["loss/dynamics"]) <= 4.0 + model.spec.position_loss_scale + 1.0
    assert 0.0 <= float(metrics["world_model/position_error"]) <= 2**0.5


# --------------------------------------------------------------------------------------
# ARI
# --------------------------------------------------------------------------------------


def test_adjusted_rand_index_on_hand_made_examples():
    truth = np.array([[0, 0, 1, 1, 2, 2]])
    assert adjusted_rand_index(truth, truth)[0] == 1.0
    assert adjusted_rand_index(truth, np.array([[5, 5, 9, 9, 7, 7]]))[0] == 1.0  # relabelled
    # A worked example: 3 of the 15 pairs agree as same-cluster in both partitions.
    pred = np.array([[0, 0, 0, 1, 1, 1]])
    rows, cols, index = 3.0, 6.0, 2.0
    expected = rows * cols / 15.0
    value = (index - expected) / (0.5 * (rows + cols) - expected)
    np.testing.assert_allclose(adjusted_rand_index(truth, pred)[0], value)
    # Unrelated random labelings score about 0.
    rng = np.random.default_rng(0)
    random = adjusted_rand_index(rng.integers(0, 4, (20, 500)), rng.integers(0, 4, (20, 500)))
    assert abs(random.mean()) < 0.02
    # Foreground ARI ignores how the background (label 0) is split.
    true_masks = np.zeros((1, 4, 4), dtype=int)
    true_masks[0, :2, :2], true_masks[0, 2:, 2:] = 1, 2
    pred_masks = np.arange(16).reshape(1, 4, 4) % 3 + 10  # background split at random
    pred_masks[0, :2, :2], pred_masks[0, 2:, 2:] = 7, 8
    assert foreground_ari(true_masks, pred_masks) == 1.0
    merged = np.where(true_masks > 0, 7, pred_masks)  # both objects in one slot
    assert foreground_ari(true_masks, merged) == 0.0


# --------------------------------------------------------------------------------------
# Agent
# --------------------------------------------------------------------------------------


def _spaces(goal: bool = True):
    image = gym.spaces.Box(0, 255, (3, 32, 32), np.uint8)
    obs = {"pixels": image, **({"goal": image} if goal else {})}
    return gym.spaces.Dict(obs), gym.spaces.Box(-1, 1, (4,), np.float32)


def _config(*extra: str):
    return build_config(["preset=debug", "agent=op3", "env=blocks:push-3", "env.size=32", *extra])


@pytest.mark.parametrize("background", [False, True])
def test_agent_acts_updates_and_restores(background):
    config = _config("op3.horizon=2", f"op3.background={str(background).lower()}")
    components = config.op3.slots + int(background)
    obs_space, action_space = _spaces()
    agent = OP3Agent(config, obs_space, action_space)
    rng = np.random.default_rng(0)
    obs = {
        "pixels": rng.integers(0, 255, (2, 3, 32, 32), dtype=np.uint8),
        "goal": rng.integers(0, 255, (2, 3, 32, 32), dtype=np.uint8),
        "is_first": np.array([True, True]),
    }
    action, state = agent.act(obs, agent.initial_state(2), explore=True)  # random phase
    assert action.shape == (2, 4) and action.dtype == np.float32
    batch = {
        "pixels": torch.randint(0, 255, (3, 4, 3, 32, 32), dtype=torch.uint8),
        "action": torch.rand(3, 4, 4) * 2 - 1,
        "is_first": torch.zeros(3, 4, dtype=torch.bool),
    }
    metrics = agent.update(batch)
    assert agent.updates == 1 and np.isfinite(metrics["loss/world_model"])
    for explore in (True, False):  # planned actions, with and without exploration noise
        action, state = agent.act({**obs, "is_first": np.array([False, True])}, state, explore)
        assert action.shape == (2, 4) and np.all(np.abs(action) <= 1)
        assert state["slots"].shape == (2, config.op3.slots, agent.wm.state_dim)
    masks = agent.segment(obs["pixels"])
    assert masks.shape == (2, components, 32, 32)
    np.testing.assert_allclose(masks.sum(1), 1.0, atol=1e-5)
    image = agent.report(batch)["world_model/slots"]
    assert image.dtype == np.uint8 and image.shape == (3 * 16, (components + 2) * 16, 3)

    restored = OP3Agent(config, obs_space, action_space)
    restored.load_state_dict(agent.state_dict())
    assert restored.updates == 1
    for key, value in agent.wm.state_dict().items():
        torch.testing.assert_close(restored.wm.state_dict()[key], value)
    # Same weights and the same planning noise: the same greedy action.
    fresh = {**obs, "is_first": np.array([True, True])}
    a1, _ = agent.act(fresh, agent.initial_state(2), explore=False)
    a2, _ = restored.act(fresh, restored.initial_state(2), explore=False)
    np.testing.assert_allclose(a1, a2)


@pytest.mark.parametrize("warm", [True, False])
def test_plan_warm_start_shifts_the_last_plan(warm, monkeypatch):
    """op3.cem_warm_start: the sampling mean starts from the last plan shifted by one action
    (TD-MPC2); off, or without a last plan, it starts from zeros."""
    config = _config("op3.horizon=3", f"op3.cem_warm_start={str(warm).lower()}")
    agent = OP3Agent(config, *_spaces())
    seen = []
    monkeypatch.setattr(planning, "cem", agent_cem_spy(seen))
    slots = torch.zeros(1, config.op3.slots, agent.wm.state_dim)
    previous = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4) / 12
    agent.plan(slots, slots, previous)
    agent.plan(slots, slots, None)
    shifted = torch.zeros(1, 3, 4)
    shifted[:, :2] = previous[:, 1:]
    torch.testing.assert_close(seen[0], shifted if warm else torch.zeros(1, 3, 4))
    torch.testing.assert_close(seen[1], torch.zeros(1, 3, 4))


def agent_cem_spy(seen):
    """A ``cem`` stand-in that records the starting mean and returns it as the plan."""

    def spy(cost_fn, mean, *args, **kwargs):
        seen.append(mean.clone())
        costs = cost_fn(mean[:, None].expand(-1, 2, -1, -1))
        assert costs.shape == (mean.shape[0], 2)
        return mean, costs[:, 0]

    return spy


def test_act_carries_the_plan_and_restarts_it_each_episode(monkeypatch):
    config = _config("op3.horizon=2")
    obs_space, action_space = _spaces()
    agent = OP3Agent(config, obs_space, action_space)
    agent.updates = 1  # past the random phase: plan
    rng = np.random.default_rng(0)
    obs = {
        "pixels": rng.integers(0, 255, (2, 3, 32, 32), dtype=np.uint8),
        "goal": rng.integers(0, 255, (2, 3, 32, 32), dtype=np.uint8),
        "is_first": np.array([True, True]),
    }
    state = agent.initial_state(2)
    assert state["plan"].shape == (2, 2, 4) and not state["plan"].any()
    action, state = agent.act(obs, state, explore=False)
    # The greedy action is the plan's first action; the plan is kept for the next step.
    np.testing.assert_allclose(action, state["plan"][:, 0].numpy(), atol=1e-6)
    seen = []
    monkeypatch.setattr(planning, "cem", agent_cem_spy(seen))
    plan = state["plan"].clone()
    agent.act({**obs, "is_first": np.array([False, True])}, state, explore=False)
    torch.testing.assert_close(seen[0][0, 0], plan[0, 1])  # env 0 continues: shifted
    torch.testing.assert_close(seen[0][1], torch.zeros(2, 4))  # env 1 restarted


def test_keep_cost_charges_moving_placed_slots_only():
    """op3.keep_scale: a slot whose centre sits within op3.keep_radius of its matched goal
    slot is "placed"; a candidate pays keep_scale x the predicted motion of placed centres."""
    config = _config("op3.keep_scale=2.0", "op3.keep_radius=0.07")
    obs_space, action_space = _spaces()
    agent = OP3Agent(config, obs_space, action_space)
    K, S, D = config.op3.slots, agent.wm.state_dim, agent.wm.spec.slot_dim
    torch.manual_seed(0)
    goal = torch.randn(1, K, S)
    slots = goal.clone()
    slots[0, 1:, D : D + 2] += 0.5  # only slot 0 is at its goal
    order = torch.randperm(K)
    placed = agent.placed_slots(slots[:, order], goal)
    assert placed.shape == (1, K)
    torch.testing.assert_close(placed[0], (order == 0).float())  # found in any slot order
    actions = torch.rand(1, 3, 1, 4) * 2 - 1
    start = {"slots": slots, "goal": goal}
    with_keep = agent.planner.sequence_cost(start, actions)
    final = agent.wm.rollout({"slots": slots.expand(3, K, S)}, actions[0])["slots"][:, -1]
    states = {"slots": final[None, :, None]}  # [N, P, H, K, S]
    without = GoalCost(D, config.op3.position_weight)(agent.wm, start, states, actions)
    motion = (final[:, 0, D : D + 2] - slots[:, 0, D : D + 2]).norm(dim=-1)
    torch.testing.assert_close(with_keep, without + 2.0 * motion[None])
    # Without the keep term: the matched distance of the last predicted slots to the goal.
    matched = matched_slot_distance(final, goal, D, config.op3.position_weight)
    torch.testing.assert_close(without, matched[None])


def test_load_weights_starts_from_trained_weights_with_fresh_counters():
    """``train.py init=``: the weights come over; the optimizer, update count (so the random
    phase runs again) and noise streams start fresh; another architecture is refused."""
    config = _config()
    obs_space, action_space = _spaces()
    trained = OP3Agent(config, obs_space, action_space)
    batch = {
        "pixels": torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8),
        "action": torch.rand(2, 3, 4) * 2 - 1,
        "is_first": torch.zeros(2, 3, dtype=torch.bool),
    }
    trained.update(batch)
    started = OP3Agent(config, obs_space, action_space)
    started.load_weights(trained.state_dict()["weights"])
    assert started.updates == 0 and not started.opt.state
    for key, value in trained.wm.state_dict().items():
        torch.testing.assert_close(started.wm.state_dict()[key], value)
    other = OP3Agent(_config("op3.slot_dim=8"), obs_space, action_space)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_weights(trained.state_dict()["weights"])


def test_freeze_perception_trains_only_the_dynamics():
    """``op3.freeze_perception``: an update changes the dynamics' weights and nothing else."""
    obs_space, action_space = _spaces()
    agent = OP3Agent(_config("op3.freeze_perception=true"), obs_space, action_space)
    before = {k: v.clone() for k, v in agent.wm.state_dict().items()}
    batch = {
        "pixels": torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8),
        "action": torch.rand(2, 3, 4) * 2 - 1,
        "is_first": torch.zeros(2, 3, dtype=torch.bool),
    }
    for _ in range(2):
        metrics = agent.update(batch)
    assert np.isfinite(metrics["loss/world_model"])
    after = agent.wm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("dynamics.") for k in changed), sorted(changed)
    assert any(k.startswith("dynamics.") for k in changed)
    # A frozen perception with no loss left for the dynamics is refused up front.
    with pytest.raises(ValueError, match="freeze_perception"):
        OP3Agent(
            _config("op3.freeze_perception=true", "op3.dynamics_scale=0", "op3.prediction_scale=0"),
            obs_space,
            action_space,
        )


def test_agent_with_heads_trains_them_on_a_frozen_perception():
    """``op3.heads=true``: the replayed reward and is_terminal reach loss/reward and
    loss/continue, and with ``op3.freeze_perception`` the heads train beside the dynamics."""
    obs_space, action_space = _spaces()
    config = _config("op3.heads=true", "op3.freeze_perception=true", "op3.reward_scale=0.5")
    agent = OP3Agent(config, obs_space, action_space)
    before = {k: v.clone() for k, v in agent.wm.state_dict().items()}
    batch = {
        "pixels": torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8),
        "action": torch.rand(2, 3, 4) * 2 - 1,
        "is_first": torch.zeros(2, 3, dtype=torch.bool),
        "reward": torch.rand(2, 3),
        "is_terminal": torch.tensor([[False, False, True], [False, False, False]]),
    }
    for _ in range(2):
        metrics = agent.update(batch)
    assert all(np.isfinite(float(metrics[k])) for k in ("loss/reward", "loss/continue"))
    scaled = sum(
        agent.scales[k] * metrics[k]
        for k in metrics
        if k.startswith("loss/") and k != "loss/world_model"
    )
    torch.testing.assert_close(metrics["loss/world_model"], scaled)
    after = agent.wm.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"dynamics", "reward_head", "continue_head"}


def test_agent_and_config_need_pixels_and_goal():
    obs_space, action_space = _spaces(goal=False)
    with pytest.raises(ValueError, match="env.goal_obs=true"):
        OP3Agent(_config(), obs_space, action_space)
    with pytest.raises(ConfigError, match="env.goal_obs=true"):
        _config("env.goal_obs=false")
    with pytest.raises(ConfigError, match="env.obs=pixels"):
        _config("env.obs=state")
    with pytest.raises(ConfigError, match="op3.cem_elites"):
        _config("op3.cem_elites=100")
    with pytest.raises(ConfigError, match="op3.interaction_topk"):
        _config("op3.interaction_topk=4")
    # Sparse slot world models (tests/test_sparse_op3.py), on a frozen perception too.
    assert _config("sparse.enabled=true").sparse.enabled
    assert _config("sparse.enabled=true", "op3.freeze_perception=true").op3.freeze_perception
    # agent=op3 alone picks its preset and the env settings it needs.
    config = build_config(["agent=op3"])
    assert config.preset == ["op3"] and config.env.id == "blocks:push-3"
    assert config.env.goal_obs and config.env.obs == "pixels" and config.env.action_repeat == 1


def test_debug_preset_trains_checkpoints_and_evaluates(tmp_path):
    from test_scripts import run_script

    run_dir = tmp_path / "op3"
    run_script(
        "train.py",
        "preset=debug",
        "agent=op3",
        "env=blocks:push-3",
        "run.steps=60",
        "run.learning_starts=30",
        "run.eval_every=60",
        "run.checkpoint_every=60",
        "run.eval_episodes=1",
        "run.log_every=20",
        "replay.batch_length=4",
        "logging.wandb=false",
        "logging.console=false",
        f"run.dir={run_dir}",
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row for row in rows if "loss/reconstruction" in row]
    assert losses and all(np.isfinite(row["loss/prediction"]) for row in losses)
    assert any("eval/success_rate" in row for row in rows)
    assert (run_dir / "checkpoints" / "step_60" / "manifest.json").exists()

    out = tmp_path / "eval.json"
    run_script("evaluate.py", f"checkpoint={run_dir}", "episodes=2", f"json={out}")
    result = json.loads(out.read_text())
    assert result["agent"] == "op3" and result["step"] == 60 and len(result["returns"]) == 2
    assert 0.0 <= result["success_rate"] <= 1.0
    assert -1.0 <= result["ari"] <= 1.0 and result["ari_frames"] > 0


@pytest.mark.slow
def test_compiled_planning_cost_plans_as_eager():
    """agent.compile=true compiles the planning cost (rollout, distances, on-device matching)
    into one graph; with the same weights and noise it returns the eager plans."""
    obs_space, action_space = _spaces()
    frames = torch.randint(0, 255, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    plans = {}
    for compile_ in ("false", "true"):
        config = _config(f"agent.compile={compile_}", "op3.keep_scale=1", "op3.horizon=2")
        agent = OP3Agent(config, obs_space, action_space)
        assert agent.accelerator.compiling == (compile_ == "true")
        with torch.inference_mode():
            current, goal = agent.wm.infer(agent._pixels(frames.to(torch.uint8))).split(1)
            first = agent.plan(current, goal)
            plans[compile_] = (first, agent.plan(current, goal, first))
    for eager, compiled in zip(plans["false"], plans["true"]):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


TINY_OP3 = (
    "env.size=32",
    "op3.slot_dim=8",
    "op3.cnn_depth=8",
    "op3.decoder_depth=8",
    "op3.hidden=16",
    "op3.resolution=16",
    "op3.cem_population=8",
    "op3.cem_iterations=2",
    "op3.cem_elites=2",
)


def test_op3_checks_planning_and_sweep(tmp_path):
    """check=planning runs the chosen planners on the same episodes and reports both success
    rates; check=sweep evaluates every grid cell; bad planners/grids are one-line errors."""
    from test_scripts import run_script

    run = tmp_path / "run"
    run_script(
        "dev/op3_checks.py",
        "check=ari",
        "updates=2",
        "episodes=4",
        "test_scenes=2",
        "eval_every=2",
        f"save={run}",
        *TINY_OP3,
    )
    out = tmp_path / "plan.json"
    run_script(
        "dev/op3_checks.py",
        "check=planning",
        f"checkpoint={run}",
        "planning_episodes=2",
        "planners=random,learned",
        f"json={out}",
        *TINY_OP3,
    )
    report = json.loads(out.read_text())
    assert "oracle" not in report
    for name in ("random", "learned"):
        result = report[name]
        assert 0.0 <= result["success_rate"] <= result["reached_rate"] <= 1.0
        assert len(result["successes"]) == 2 and result["seconds_per_step"] > 0
    out = tmp_path / "sweep.json"
    run_script(
        "dev/op3_checks.py",
        "check=sweep",
        f"checkpoint={run}",
        "planning_episodes=1",
        "grid=op3.keep_scale=0,2;env.terminate_on_success=false,true",
        f"json={out}",
        *TINY_OP3,
    )
    rows = json.loads(out.read_text())["rows"]
    assert sorted(tuple(row["overrides"]) for row in rows) == [
        (f"op3.keep_scale={k}", f"env.terminate_on_success={t}")
        for k in (0, 2)
        for t in ("false", "true")
    ]
    ranked = [(-row["success_rate"], row["final_goal_distance"]) for row in rows]
    assert ranked == sorted(ranked)
    for bad, message in [
        (["check=sweep", f"checkpoint={run}", "grid=agent.lr=1"], "only op3.* and env.*"),
        (["check=sweep", f"checkpoint={run}", "grid=op3.keep_scale"], "expected 'key=v1,v2"),
        (["check=sweep", "grid=op3.keep_scale=0,1"], "pass checkpoint="),
        (["check=planning", "planners=orcle"], "planners: expected some of"),
    ]:
        result = run_script("dev/op3_checks.py", *bad, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
