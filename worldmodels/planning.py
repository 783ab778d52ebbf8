"""Model-predictive control on any world model: the cross-entropy method over action sequences.

``CEMPlanner`` plans on any ``WorldModelInterface`` with a cost over the states it predicts:
each CEM iteration samples ``population`` action sequences of ``horizon`` actions per start
state, rolls all of them out at once (``world_model.rollout``, the starts repeated), scores the
predicted states with the cost (lower is better) and refits the sampling Gaussian to the
``elites`` best. Everything stays on the device: no ``.item()``, no ``bool(t)``, no
boolean-mask indexing, so a plan makes no host sync until the caller reads an action.

Costs (``PlanCost``: ``cost(world_model, start, states, actions) -> [N, P]``):

- ``GoalCost``: for slot world models, the Hungarian-matched distance between the last
  predicted slots and the goal slots the start state carries (``start["goal"]``), plus an
  optional charge for moving slots that already sit at their goal (the OP3 agent's cost).
- ``ReturnCost``: minus the predicted discounted return, ``-sum_t discount^t r_t`` over the
  rolled-out states (``world_model.reward(world_model.feat(state_t))``), optionally weighted by
  the predicted probability of still running (``continue_prob``) and bootstrapped by a value.

``cem`` is the optimiser alone, for any cost over action sequences (``scripts/dev/
op3_checks.py`` scores candidates in a copy of the true simulator with it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from imagine_rl.worldmodels.interface import State, WorldModelInterface
from imagine_rl.worldmodels.slot_metrics import matched_slot_distance, slot_distances
from imagine_rl.worldmodels.slots import hungarian_order


def cem(
    cost_fn: Callable[[torch.Tensor], torch.Tensor],
    mean: torch.Tensor,
    std: float | torch.Tensor,
    population: int,
    elites: int,
    iterations: int,
    low: float = -1.0,
    high: float = 1.0,
    min_std: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy method over action sequences for ``N`` problems at once.

    Each iteration samples ``population`` sequences from a Gaussian per problem (clipped to
    ``[low, high]``), scores them with ``cost_fn`` (lower is better) and refits the Gaussian to
    the ``elites`` best (its std floored at ``min_std``). Returns the best sequence ever
    sampled and its cost (the elite mean can fall between two good modes, e.g. two blocks a
    pick could take; the best sample cannot). No host sync: the best sample is kept by
    ``torch.where``, not by indexing with a boolean mask.

    Shapes: ``mean [N, H, A]``; ``cost_fn``: ``[N, P, H, A]`` -> ``[N, P]``; returns
    ``([N, H, A], [N])``.
    """
    if not 1 <= elites <= population:
        raise ValueError(f"cem: need 1 <= elites <= population, got {elites} and {population}")
    mean = mean.clone()
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device).expand_as(mean).clone()
    N = mean.shape[0]
    best = mean.clone()
    best_cost = torch.full((N,), float("inf"), device=mean.device)
    rows = torch.arange(N, device=mean.device)
    for _ in range(iterations):
        noise = torch.randn(
            (N, population, *mean.shape[1:]), generator=generator, device=mean.device
        )
        samples = (mean[:, None] + std[:, None] * noise).clamp(low, high)
        costs = cost_fn(samples)
        assert costs.shape == (N, population), (
            f"cem: cost_fn must return [N, P] = {(N, population)}, got {tuple(costs.shape)}"
        )
        order = costs.argsort(1)
        top = samples[rows[:, None], order[:, :elites]]  # [N, E, H, A]
        first_cost = costs[rows, order[:, 0]]
        better = first_cost < best_cost
        best = torch.where(better[:, None, None], samples[rows, order[:, 0]], best)
        best_cost = torch.where(better, first_cost, best_cost)
        mean = top.mean(1)
        std = top.std(1, unbiased=False).clamp(min=min_std) if elites > 1 else std
    return best, best_cost


def shifted_plan(
    previous: torch.Tensor | None, count: int, horizon: int, action_dim: int, device: torch.device
) -> torch.Tensor:
    """The warm start of a plan (TD-MPC2's): the last plan ``previous [N, H, A]`` shifted by
    one action, the new last action 0; zeros without one (or with ``horizon`` 1, which has
    nothing left to shift). Rows of ``previous`` that are zeros (no plan yet) stay zeros.

    Shapes: -> ``[count, horizon, action_dim]``.
    """
    mean = torch.zeros(count, horizon, action_dim, device=device)
    if previous is not None and horizon > 1:
        assert tuple(previous.shape) == (count, horizon, action_dim), (
            f"shifted_plan: previous plan {tuple(previous.shape)} must be "
            f"{(count, horizon, action_dim)}"
        )
        mean[:, :-1] = previous[:, 1:]
    return mean


class PlanCost(Protocol):
    """Cost of candidate action sequences from the states a world model predicts for them.

    Shapes: ``start`` ``[N, ...]`` (the states planned from), ``states`` ``[N, P, H, ...]``
    (``world_model.rollout`` of each of the ``P`` candidates: the states after each action),
    ``actions [N, P, H, A]`` -> cost ``[N, P]``, lower is better.
    """

    def __call__(
        self,
        world_model: WorldModelInterface,
        start: State,
        states: State,
        actions: torch.Tensor,
    ) -> torch.Tensor: ...


@dataclass
class GoalCost:
    """Slot world models: how far the last predicted slots are from the goal slots.

    The start state carries the goal: ``start["goal"] [N, K, S]`` beside ``start["slots"]``.
    A candidate costs the Hungarian-matched distance (``slot_metrics.matched_slot_distance``:
    ``|features| / sqrt(slot_dim) + position_weight * |centre|`` per matched pair) between its
    last predicted slots and the goal slots, plus ``keep_scale`` x the predicted motion of the
    centres of the slots already placed (``placed_slots``: within ``keep_radius`` of their
    matched goal slot), so that a plan does not undo a goal it has reached.
    """

    slot_dim: int
    position_weight: float = 0.0
    keep_scale: float = 0.0
    keep_radius: float = 0.07

    def placed_slots(self, slots: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """1 where slot k of ``slots`` has its centre within ``keep_radius`` of the goal slot
        it is matched to (the cost's matching, ``slot_distances``), else 0.

        Shapes: ``slots [N, K, S]``, ``goal [N, K, S]`` -> ``[N, K]``.
        """
        D = self.slot_dim
        order = hungarian_order(slot_distances(slots, goal, D, self.position_weight))
        matched = goal.gather(1, order[..., None].expand_as(goal))
        gap = (slots[..., D : D + 2] - matched[..., D : D + 2]).norm(dim=-1)
        return (gap <= self.keep_radius).float()

    def __call__(
        self,
        world_model: WorldModelInterface,
        start: State,
        states: State,
        actions: torch.Tensor,
    ) -> torch.Tensor:
        """Shapes: ``start`` ``slots``, ``goal`` ``[N, K, S]``; ``states`` ``slots [N, P, H,
        K, S]`` -> ``[N, P]``."""
        if "goal" not in start:
            raise ValueError("GoalCost: the start state carries no 'goal' slots to plan toward")
        slots, goal = start["slots"], start["goal"]
        assert goal.shape == slots.shape and slots.dim() == 3, (
            f"GoalCost: start slots {tuple(slots.shape)} and goal {tuple(goal.shape)} must both "
            "be [N, K, S]"
        )
        final = states["slots"][:, :, -1]  # [N, P, K, S]
        D = self.slot_dim
        cost = matched_slot_distance(final, goal[:, None], D, self.position_weight)
        if self.keep_scale > 0:
            placed = self.placed_slots(slots, goal)  # [N, K]
            # The dynamics keeps slot k in row k, so row k's motion is slot k's.
            motion = (final[..., D : D + 2] - slots[:, None, :, D : D + 2]).norm(dim=-1)
            cost = cost + self.keep_scale * (motion * placed[:, None]).sum(-1)
        return cost


@dataclass
class ReturnCost:
    """Minus the predicted return of the rolled-out states (world models with reward heads).

    With ``r_t = reward(feat(s_t))`` and ``c_t = continue_prob(feat(s_t))`` at the states
    ``s_0 .. s_{H-1}`` after each action, the return is ``sum_t discount^t w_t r_t`` with ``w_t
    = 1``, or with ``use_continue`` ``w_t = c_0 ... c_{t-1}`` (the predicted probability that the
    episode still runs when ``r_t`` is received), plus with a ``value`` (a critic on features
    ``[..., F]`` -> ``[...]``) ``discount^H w_H value(feat(s_{H-1}))``. The cost is minus it.
    """

    discount: float = 0.99
    use_continue: bool = False
    value: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(
        self,
        world_model: WorldModelInterface,
        start: State,
        states: State,
        actions: torch.Tensor,
    ) -> torch.Tensor:
        """Shapes: ``states`` ``[N, P, H, ...]`` -> ``[N, P]``."""
        feat = world_model.feat(states)  # [N, P, H, F]
        reward = world_model.reward(feat).float()  # [N, P, H]
        H = reward.shape[-1]
        assert tuple(reward.shape) == tuple(actions.shape[:3]), (
            f"ReturnCost: rewards {tuple(reward.shape)} must be [N, P, H] = "
            f"{tuple(actions.shape[:3])}"
        )
        discounts = self.discount ** torch.arange(H + 1, device=reward.device, dtype=reward.dtype)
        survival = torch.ones_like(reward[..., :1]).expand(*reward.shape[:-1], H + 1)
        if self.use_continue:
            cont = world_model.continue_prob(feat).float()  # [N, P, H]
            survival = torch.cat([survival[..., :1], cont.cumprod(-1)], -1)  # w_0 .. w_H
        weights = discounts * survival  # [N, P, H + 1]
        total = (weights[..., :H] * reward).sum(-1)
        if self.value is not None:
            total = total + weights[..., H] * self.value(feat[..., -1, :]).float()
        return -total


class CEMPlanner:
    """The cross-entropy method on a world model's predictions (see the module docstring).

    ``plan(start, previous)`` returns the best action sequence ``[N, H, A]`` found for each of
    the ``N`` start states. With ``warm_start`` and the last plan ``previous`` the sampling
    mean starts from it shifted by one action (``shifted_plan``), else from zeros; the std
    starts at ``std`` and is floored at ``min_std``; actions are clipped to ``[low, high]``.
    Samples are drawn from ``generator`` (the caller's stream, e.g. saved in its checkpoints).
    ``rollout_kwargs`` go to ``world_model.rollout`` (``{"sample": False}``: the RSSM's mean
    predictions instead of samples from the global RNG). ``compile``, if given, wraps
    ``sequence_cost`` (e.g. ``accelerator.compile``: the rollout and cost as one graph).
    """

    def __init__(
        self,
        world_model: WorldModelInterface,
        cost: PlanCost,
        horizon: int,
        population: int,
        elites: int,
        iterations: int,
        std: float = 1.0,
        min_std: float = 0.05,
        low: float = -1.0,
        high: float = 1.0,
        warm_start: bool = True,
        generator: torch.Generator | None = None,
        rollout_kwargs: Mapping[str, Any] | None = None,
        compile: Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]] | None = None,
    ) -> None:
        if horizon < 1 or iterations < 1:
            raise ValueError(
                f"CEMPlanner: need horizon and iterations >= 1, got {horizon}, {iterations}"
            )
        if not 1 <= elites <= population:
            raise ValueError(
                f"CEMPlanner: need 1 <= elites <= population, got {elites} and {population}"
            )
        self.world_model = world_model
        self.cost = cost
        self.horizon, self.population, self.elites = horizon, population, elites
        self.iterations, self.std, self.min_std = iterations, std, min_std
        self.low, self.high = low, high
        self.warm_start = warm_start
        self.generator = generator
        self.rollout_kwargs = dict(rollout_kwargs or {})
        self._score = compile(self.sequence_cost) if compile is not None else self.sequence_cost

    def sequence_cost(self, start: State, actions: torch.Tensor) -> torch.Tensor:
        """Cost of every candidate: each start repeated ``P`` times, rolled out under its
        candidates in one batch, scored by ``cost``.

        Shapes: ``start`` ``[N, ...]``, ``actions [N, P, H, A]`` -> ``[N, P]``.
        """
        N, P = actions.shape[:2]
        repeated = {
            k: v[:, None].expand(N, P, *v.shape[1:]).flatten(0, 1) for k, v in start.items()
        }
        rolled = self.world_model.rollout(repeated, actions.flatten(0, 1), **self.rollout_kwargs)
        states = {k: v.unflatten(0, (N, P)) for k, v in rolled.items()}
        return self.cost(self.world_model, start, states, actions)

    def initial_mean(self, start: State, previous: torch.Tensor | None = None) -> torch.Tensor:
        """The first sampling mean ``[N, H, A]``: ``previous`` shifted with ``warm_start``,
        else zeros."""
        first = next(iter(start.values()))
        return shifted_plan(
            previous if self.warm_start else None,
            first.shape[0],
            self.horizon,
            self.world_model.action_dim,
            first.device,
        )

    def plan(self, start: State, previous: torch.Tensor | None = None) -> torch.Tensor:
        """The best action sequence ``[N, H, A]`` from the start states ``[N, ...]``;
        ``previous [N, H, A]``: the last step's plan (zeros where there is none)."""
        best, _ = cem(
            lambda actions: self._score(start, actions),
            self.initial_mean(start, previous),
            self.std,
            self.population,
            self.elites,
            self.iterations,
            low=self.low,
            high=self.high,
            min_std=self.min_std,
            generator=self.generator,
        )
        return best


__all__ = [
    "CEMPlanner",
    "GoalCost",
    "PlanCost",
    "ReturnCost",
    "cem",
    "shifted_plan",
]
