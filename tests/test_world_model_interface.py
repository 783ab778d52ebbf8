"""One suite for every world model behind ``worldmodels.interface.WorldModelInterface``.

Each model (the RSSM on states, with factored dynamics, on pixels; the slot model with reward
and continue heads, with and without goal features) is checked the same way: its losses on a
tiny replayed batch, its posterior States, closed-loop ``imagine`` and open-loop ``rollout``
(which must agree on the same actions when nothing is sampled), ``feat``, ``reward`` and
``continue_prob`` shapes, and that the losses train the model's parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from imagine_rl.worldmodels import RSSMConfig, WorldModel, WorldModelSpec
from imagine_rl.worldmodels.factored import FactoredSpec
from imagine_rl.worldmodels.interface import WorldModelInterface, check_states
from imagine_rl.worldmodels.slots import SlotSpec, SlotWorldModel

torch.set_num_threads(1)

B, T, N, H, A = 2, 3, 4, 3, 2


@dataclass
class Case:
    """A model, a replayed batch for it, and the options that make its predictions
    deterministic (the RSSM samples its stochastic state unless ``sample=False``)."""

    model: nn.Module
    batch: dict[str, torch.Tensor]
    deterministic: dict[str, Any] = field(default_factory=dict)


def _flags(g: torch.Generator) -> dict[str, torch.Tensor]:
    is_first = torch.zeros(B, T)
    is_first[:, 0] = 1
    is_terminal = torch.zeros(B, T)
    is_terminal[1, -1] = 1
    return {
        "action": torch.rand(B, T, A, generator=g) * 2 - 1,
        "reward": torch.randn(B, T, generator=g),
        "is_first": is_first,
        "is_terminal": is_terminal,
    }


def _rssm(obs_shapes: dict[str, tuple[int, ...]], **rssm: Any) -> Case:
    torch.manual_seed(0)
    spec = WorldModelSpec(
        rssm=RSSMConfig(deter=16, hidden=16, stoch=4, classes=4, blocks=2, **rssm),
        units=16,
        mlp_layers=1,
        head_layers=1,
        cnn_depth=4,
    )
    model = WorldModel(obs_shapes, A, spec)
    g = torch.Generator().manual_seed(1)
    batch = _flags(g)
    for key, shape in obs_shapes.items():
        batch[key] = (
            torch.rand(B, T, *shape, generator=g) - 0.5
            if len(shape) == 3
            else torch.randn(B, T, *shape, generator=g)
        )
    return Case(model, batch, {"sample": False})


def _slots(goal_features: bool = False) -> Case:
    torch.manual_seed(0)
    spec = SlotSpec(
        slots=3,
        slot_dim=8,
        iterations=1,
        cnn_depth=8,
        decoder_depth=8,
        hidden=16,
        resolution=16,
        heads=True,
        goal_features=goal_features,
    )
    model = SlotWorldModel((3, 16, 16), A, spec)
    g = torch.Generator().manual_seed(1)
    batch = {**_flags(g), "pixels": torch.rand(B, T, 3, 16, 16, generator=g) - 0.5}
    if goal_features:
        batch["goal"] = torch.rand(B, T, 3, 16, 16, generator=g) - 0.5
    return Case(model, batch)


CASES: dict[str, Callable[[], Case]] = {
    "rssm-states": lambda: _rssm({"state": (5,)}),
    "rssm-factored": lambda: _rssm(
        {"state": (5,)}, factored=FactoredSpec(groups=4, graph="fixed", in_degree=2, seed=3)
    ),
    "rssm-pixels": lambda: _rssm({"pixels": (3, 32, 32)}),
    "slots-heads": lambda: _slots(),
    "slots-heads-goal": lambda: _slots(goal_features=True),
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]()


def _starts(post: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``N`` start States ``[N, ...]`` from the posterior ``[B, T, ...]`` (the last step of
    each sample, repeated), detached as a planner or behaviour would take them."""
    last = {key: value[:, -1].detach() for key, value in post.items()}
    return {key: value.repeat_interleave(N // B, 0) for key, value in last.items()}


def test_losses_posterior_and_gradients(case):
    model = case.model
    assert isinstance(model, WorldModelInterface)
    losses, metrics, post = model.loss_and_states(case.batch)
    assert losses and all(key.startswith("loss/") for key in losses)
    for key, value in {**losses, **metrics}.items():
        assert value.dim() == 0 and bool(torch.isfinite(value)), key
    assert {"loss/reward", "loss/continue"} <= set(losses)
    check_states(post, (B, T), "loss_and_states")
    # The losses train the model: every parameter is on a loss's path, and some move.
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    missed = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missed, missed
    assert any(bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_imagine_rollout_feat_and_heads(case):
    model = case.model
    with torch.no_grad():
        _, _, post = model.loss_and_states(case.batch)
        feat = model.feat(post)
        assert feat.shape == (B, T, model.feat_size)
        assert model.reward(feat).shape == (B, T)
        cont = model.continue_prob(feat)
        assert cont.shape == (B, T) and bool(((cont >= 0) & (cont <= 1)).all())

        start = _starts(post)
        g = torch.Generator().manual_seed(2)

        def policy(state):  # random actions, one per start
            check_states(state, (N,), "policy input")
            return torch.rand(N, A, generator=g) * 2 - 1

        imagined = model.imagine(policy, start, H, **case.deterministic)
        actions = imagined["action"]
        assert actions.shape == (N, H, A)
        check_states({k: v for k, v in imagined.items() if k != "action"}, (N, H + 1), "imagine")
        assert model.feat(imagined).shape == (N, H + 1, model.feat_size)
        torch.testing.assert_close(model.feat(imagined)[:, 0], model.feat(start))

        rolled = model.rollout(start, actions, **case.deterministic)
        check_states(rolled, (N, H), "rollout")
        assert model.feat(rolled).shape == (N, H, model.feat_size)
        # The same actions open loop: the same states after each of them.
        torch.testing.assert_close(model.feat(rolled), model.feat(imagined)[:, 1:])
        assert model.reward(model.feat(rolled)).shape == (N, H)
        assert model.continue_prob(model.feat(rolled)).shape == (N, H)


def test_rssm_rollout_samples_by_default():
    """With sampling (the RSSM's default) rollout still gives ``[N, H, ...]`` States."""
    case = CASES["rssm-states"]()
    with torch.no_grad():
        _, _, post = case.model.loss_and_states(case.batch)
        rolled = case.model.rollout(_starts(post), torch.rand(N, H, A) * 2 - 1)
    check_states(rolled, (N, H), "rollout")
