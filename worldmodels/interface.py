"""The interface every world model implements, so behaviours and planners plug into any of them.

A world model learns latent dynamics from replayed sequences and predicts forward from latent
states. Its states are a ``State``: a dict of tensors that share their leading dimensions
(``[B, T]`` over a replayed batch, ``[N]`` for a set of starts, ``[N, H]`` along a rollout);
each model names its own keys (the RSSM: ``deter``, ``stoch``; the slot model: ``slots``,
and ``goal`` where it plans toward one). Whatever consumes states only reads them through the
model (``feat``, ``reward``, ``continue_prob``), flattens or indexes their leading dimensions,
and hands them back.

Shapes (``B`` batch, ``T`` time, ``N`` starts, ``H`` horizon, ``A`` actions, ``F`` features):

- ``loss_and_states(data, start)``: ``data`` is the model's preprocessed replay batch (its
  observation keys ``[B, T, ...]``, ``action`` ``[B, T, A]``, ``is_first`` ``[B, T]``, and
  ``reward``/``is_terminal`` ``[B, T]`` where the model predicts them); ``start`` a ``State``
  ``[B, ...]`` to continue from, or None (the model's initial state). Returns ``(losses,
  metrics, post)``: 0-d named losses (``loss/<name>``, unscaled: the objective weighs them),
  0-d metrics, and the posterior ``State`` ``[B, T, ...]``.
- ``imagine(policy, start, horizon)``: ``start`` ``[N, ...]``; ``policy(state [N, ...]) ->
  action [N, A]``. Returns the states ``[N, H + 1, ...]`` (index 0 is ``start``) and
  ``action`` ``[N, H, A]``.
- ``rollout(start, actions)``: open loop, ``start`` ``[N, ...]``, ``actions`` ``[N, H, A]``
  -> the states after each action ``[N, H, ...]`` (the start not included).
- ``feat(state)``: ``[..., F]`` with ``F = feat_size``, the input of heads, actor and critic.
- ``reward(feat)`` and ``continue_prob(feat)``: ``[...]`` predictions at each state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

State = dict[str, torch.Tensor]
Policy = Callable[[State], torch.Tensor]


@runtime_checkable
class WorldModelInterface(Protocol):
    """What a behaviour (actor-critic, planner) and an objective may ask of a world model.

    See the module docstring for the shapes. Implemented by ``WorldModel`` (the RSSM, with or
    without factored dynamics) and ``SlotWorldModel``.
    """

    action_dim: int

    @property
    def feat_size(self) -> int: ...

    def loss_and_states(
        self, data: dict[str, torch.Tensor], start: State | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], State]: ...

    def imagine(self, policy: Policy, start: State, horizon: int) -> State: ...

    def rollout(self, start: State, actions: torch.Tensor) -> State: ...

    def feat(self, state: State) -> torch.Tensor: ...

    def reward(self, feat: torch.Tensor) -> torch.Tensor: ...

    def continue_prob(self, feat: torch.Tensor) -> torch.Tensor: ...


def flatten_states(states: State) -> State:
    """``[B, T, ...]`` -> ``[B * T, ...]``: every replayed state as one start of imagination."""
    return {key: value.flatten(0, 1) for key, value in states.items()}


def check_states(states: State, lead: tuple[int, ...], where: str) -> None:
    """Assert that every tensor of ``states`` has the leading dimensions ``lead``."""
    for key, value in states.items():
        assert tuple(value.shape[: len(lead)]) == lead, (
            f"{where}: state {key!r} has shape {tuple(value.shape)}, expected leading {lead}"
        )


__all__ = ["Policy", "State", "WorldModelInterface", "check_states", "flatten_states"]
