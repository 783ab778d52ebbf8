"""The planner as a part (``worldmodels.planning``): CEM on any ``WorldModelInterface``.

A toy world model with known dynamics (``x' = x + a``, reward ``-|x - target|^2``) checks that
the planner finds the known optimal actions, that the warm start shifts the last plan, that
``ReturnCost`` is the discounted return computed by hand, and that planning makes no host sync
(on the toy model, the slot model with its goal cost, and the RSSM with the return cost).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import imagine_rl.worldmodels.planning as planning
from imagine_rl.runtime.profiling import count_dispatch
from imagine_rl.worldmodels import RSSMConfig, WorldModel, WorldModelSpec
from imagine_rl.worldmodels.interface import State, WorldModelInterface
from imagine_rl.worldmodels.planning import CEMPlanner, GoalCost, ReturnCost, cem, shifted_plan
from imagine_rl.worldmodels.slots import SlotSpec, SlotWorldModel

torch.set_num_threads(1)


class ShiftModel(nn.Module):
    """A world model with known dynamics: state ``x [..., 2]``, ``x' = x + a``; reward
    ``-|x - target|^2``; continue probability ``sigmoid(x_0)``; features = ``x``."""

    action_dim = 2

    def __init__(self, target: tuple[float, float]) -> None:
        super().__init__()
        self.register_buffer("target", torch.tensor(target))
        self.gain = nn.Parameter(torch.ones(()))  # something for a loss to train

    @property
    def feat_size(self) -> int:
        return 2

    def loss_and_states(self, data, start=None):
        post = {"x": data["x"] * self.gain}
        loss = (self.reward(post["x"]) - data["reward"]).square().mean()
        return {"loss/reward": loss}, {}, post

    def rollout(self, start: State, actions: torch.Tensor) -> State:
        return {"x": start["x"][:, None] + actions.cumsum(1)}

    def imagine(self, policy, start: State, horizon: int) -> State:
        x, xs, actions = start["x"], [start["x"]], []
        for _ in range(horizon):
            action = policy({"x": x})
            x = x + action
            xs.append(x)
            actions.append(action)
        return {"x": torch.stack(xs, 1), "action": torch.stack(actions, 1)}

    def feat(self, state: State) -> torch.Tensor:
        return state["x"]

    def reward(self, feat: torch.Tensor) -> torch.Tensor:
        return -(feat - self.target).square().sum(-1)

    def continue_prob(self, feat: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(feat[..., 0])


def toy_planner(model, horizon: int, seed: int = 0, **kwargs) -> CEMPlanner:
    options = dict(population=200, elites=20, iterations=8, std=1.0)
    options.update(kwargs)
    return CEMPlanner(
        model,
        ReturnCost(discount=1.0),
        horizon,
        generator=torch.Generator().manual_seed(seed),
        **options,
    )


def test_toy_model_is_a_world_model():
    assert isinstance(ShiftModel((0.0, 0.0)), WorldModelInterface)


def test_planner_finds_the_known_optimal_actions():
    model = ShiftModel((0.8, 0.5))
    start = {"x": torch.tensor([[0.3, -0.2], [0.5, 0.5]])}
    # One step: the action that lands on the target.
    best = toy_planner(model, 1).plan(start)
    assert best.shape == (2, 1, 2)
    torch.testing.assert_close(best[:, 0], model.target - start["x"], atol=0.05, rtol=0)
    # Three steps, undiscounted: land on the target at once, then stay (a_2 = a_3 = 0).
    best = toy_planner(model, 3, iterations=10).plan(start)
    expected = torch.zeros(2, 3, 2)
    expected[:, 0] = model.target - start["x"]
    torch.testing.assert_close(best, expected, atol=0.1, rtol=0)


def test_planner_respects_the_action_bounds_at_a_corner_optimum():
    """x = -1 to a target at 1: two full steps (clipped at the bound) are optimal."""
    model = ShiftModel((1.0, 0.0))
    start = {"x": torch.tensor([[-1.0, 0.0]])}
    best = toy_planner(model, 2).plan(start)
    assert float(best.abs().max()) <= 1.0
    torch.testing.assert_close(best[0, :, 0], torch.ones(2), atol=0.02, rtol=0)
    torch.testing.assert_close(best[0, :, 1], torch.zeros(2), atol=0.1, rtol=0)


def test_cem_minimises_a_cost_over_sequences():
    target = torch.tensor([[[0.3, -0.6], [0.0, 0.8]], [[-0.9, 0.2], [0.5, 0.5]]])  # [N, H, A]

    def cost(actions):  # [N, P, H, A] -> [N, P]
        return (actions - target[:, None]).square().sum((-2, -1))

    generator = torch.Generator().manual_seed(0)
    best, best_cost = cem(cost, torch.zeros(2, 2, 2), 1.0, 200, 20, 8, generator=generator)
    torch.testing.assert_close(best, target, atol=0.05, rtol=0)
    # The best cost is the cost of the returned sequence.
    torch.testing.assert_close(best_cost, cost(best[:, None])[:, 0])
    with pytest.raises(ValueError, match="elites <= population"):
        cem(cost, torch.zeros(2, 2, 2), 1.0, 4, 5, 1)


@pytest.mark.parametrize("warm", [True, False])
def test_warm_start_shifts_the_last_plan(warm, monkeypatch):
    model = ShiftModel((0.0, 0.0))
    start = {"x": torch.zeros(2, 2)}
    planner = toy_planner(model, 3, warm_start=warm)
    previous = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    shifted = torch.zeros(2, 3, 2)
    shifted[:, :2] = previous[:, 1:]  # one action on, the new last action 0
    torch.testing.assert_close(shifted_plan(previous, 2, 3, 2, torch.device("cpu")), shifted)
    seen = []

    def spy(cost_fn, mean, *args, **kwargs):
        seen.append(mean.clone())
        return mean, cost_fn(mean[:, None])[:, 0]

    monkeypatch.setattr(planning, "cem", spy)
    assert torch.equal(planner.plan(start, previous), shifted if warm else torch.zeros(2, 3, 2))
    assert torch.equal(planner.plan(start), torch.zeros(2, 3, 2))  # no last plan: zeros
    # A one-step plan has nothing left to shift.
    one = toy_planner(model, 1, warm_start=warm)
    assert torch.equal(one.plan(start, previous[:, :1]), torch.zeros(2, 1, 2))
    assert len(seen) == 3


def test_return_cost_is_the_discounted_return_by_hand():
    model = ShiftModel((0.5, -0.5))
    xs = torch.tensor(
        [[[[0.1, 0.2], [0.4, -0.3], [0.6, -0.6]], [[-1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]]]
    )
    states = {"x": xs}  # [N = 1, P = 2, H = 3, 2]
    actions = torch.zeros(1, 2, 3, 2)
    start = {"x": torch.zeros(1, 2)}

    def by_hand(p: int, discount: float, use_continue: bool, value) -> float:
        total, alive = 0.0, 1.0
        for t in range(3):
            x, y = xs[0, p, t].tolist()
            reward = -((x - 0.5) ** 2 + (y + 0.5) ** 2)
            total += discount**t * alive * reward
            if use_continue:
                alive *= 1.0 / (1.0 + math.exp(-x))
        if value is not None:
            total += discount**3 * alive * float(value(xs[0, p, 2]))
        return -total

    def value(feat):
        return feat.sum(-1) * 2.0

    for discount, use_continue, critic in [
        (1.0, False, None),
        (0.9, False, None),
        (0.9, True, None),
        (0.8, True, value),
    ]:
        cost = ReturnCost(discount, use_continue, critic)(model, start, states, actions)
        expected = torch.tensor([[by_hand(p, discount, use_continue, critic) for p in (0, 1)]])
        torch.testing.assert_close(cost, expected)


def tiny_slot_model() -> SlotWorldModel:
    torch.manual_seed(0)
    spec = SlotSpec(
        slots=3, slot_dim=8, iterations=1, cnn_depth=8, decoder_depth=8, hidden=16, resolution=16
    )
    return SlotWorldModel((3, 16, 16), 2, spec)


def tiny_rssm() -> WorldModel:
    torch.manual_seed(0)
    spec = WorldModelSpec(
        rssm=RSSMConfig(deter=16, hidden=16, stoch=4, classes=4, blocks=2),
        units=16,
        mlp_layers=1,
        head_layers=1,
        cnn_depth=4,
    )
    return WorldModel({"state": (5,)}, 2, spec)


def test_planning_makes_no_host_sync():
    """Sampling, rollouts, costs (the slot goal cost's matching included) and refits all
    stay on the device: no ``.item()``, ``bool(t)``, boolean masks or ``nonzero``."""
    model = ShiftModel((0.8, 0.5))
    start = {"x": torch.rand(3, 2)}
    planner = toy_planner(model, 3, population=32, elites=4, iterations=3)
    counted = count_dispatch(lambda: planner.plan(start, torch.rand(3, 3, 2)))
    assert counted.ops > 50 and counted.host_syncs == 0
    assert counted.result.shape == (3, 3, 2)

    slots = tiny_slot_model()
    K, S = slots.num_slots, slots.state_dim
    state = {"slots": torch.rand(2, K, S), "goal": torch.rand(2, K, S)}
    cost = GoalCost(slots.spec.slot_dim, position_weight=5.0, keep_scale=1.0, keep_radius=0.5)
    planner = CEMPlanner(slots, cost, 2, 16, 4, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        counted = count_dispatch(lambda: planner.plan(state))
    assert counted.ops > 100 and counted.host_syncs == 0

    rssm = tiny_rssm()
    planner = CEMPlanner(
        rssm,
        ReturnCost(0.99, use_continue=True),
        3,
        16,
        4,
        2,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        counted = count_dispatch(lambda: planner.plan(rssm.rssm.initial(2)))
    assert counted.ops > 100 and counted.host_syncs == 0


@pytest.mark.parametrize("sample", [True, False])
def test_return_cost_plans_on_the_rssm(sample):
    """CEM with ``ReturnCost`` on the Dreamer's world model: from posterior states of a
    replayed batch, plans ``[N, H, A]`` inside the action bounds; without sampling
    (``rollout_kwargs``) the same generator gives the same plan twice."""
    rssm = tiny_rssm()
    g = torch.Generator().manual_seed(1)
    batch = {
        "state": torch.randn(2, 4, 5, generator=g),
        "action": torch.rand(2, 4, 2, generator=g) * 2 - 1,
        "is_first": torch.tensor([[1.0, 0, 0, 0]] * 2),
    }
    with torch.no_grad():
        post, _ = rssm.observe(batch)
    start = {key: value[:, -1] for key, value in post.items() if key in ("deter", "stoch")}
    plans = []
    for _ in range(2):
        planner = CEMPlanner(
            rssm,
            ReturnCost(0.95, use_continue=True),
            horizon=4,
            population=16,
            elites=4,
            iterations=3,
            generator=torch.Generator().manual_seed(0),
            rollout_kwargs={"sample": sample},
        )
        with torch.no_grad():
            plans.append(planner.plan(start))
    plan = plans[0]
    assert plan.shape == (2, 4, 2) and torch.isfinite(plan).all()
    assert float(plan.abs().max()) <= 1.0
    if not sample:
        assert torch.equal(plans[0], plans[1])
    # The planner's sequence cost is ReturnCost of the rolled-out states: -return, [N, P].
    actions = torch.rand(2, 5, 4, 2) * 2 - 1
    with torch.no_grad():
        costs = planner.sequence_cost(start, actions)
    assert costs.shape == (2, 5) and torch.isfinite(costs).all()


def test_planner_rejects_bad_settings():
    model = ShiftModel((0.0, 0.0))
    with pytest.raises(ValueError, match="elites <= population"):
        CEMPlanner(model, ReturnCost(), 2, population=4, elites=8, iterations=1)
    with pytest.raises(ValueError, match="horizon and iterations >= 1"):
        CEMPlanner(model, ReturnCost(), 0, population=4, elites=2, iterations=1)
    with pytest.raises(ValueError, match="no 'goal' slots"):
        slots = tiny_slot_model()
        start = {"slots": torch.rand(1, slots.num_slots, slots.state_dim)}
        CEMPlanner(slots, GoalCost(8), 1, 4, 2, 1).plan(start)
