"""The agent contract every agent implements and the training loop relies on.

An agent acts in a batch of parallel environments and learns from replayed sequences.

``initial_state(batch_size) -> state``
    The recurrent state for ``batch_size`` env streams (any pytree of tensors, or ``None`` for
    memoryless agents). The loop keeps it between ``act`` calls.

``act(obs, state, explore) -> (action, state)``
    ``obs`` is a dict of numpy arrays with a leading env dimension ``N``: the observation keys of
    the env (``state``: float32 ``[N, D]``, ``pixels``: uint8 ``[N, 3, H, W]``) plus
    ``is_first``: bool ``[N]``. Where ``is_first`` is true the agent resets that stream's
    recurrent state before using it (the env was just reset). ``explore=True`` samples from
    the policy; ``explore=False`` acts greedily (the mode), as in evaluation. ``action`` is a
    numpy array the vector env accepts: float32 ``[N, A]`` in ``[-1, 1]`` for continuous
    actions, int64 ``[N]`` for discrete ones.

``update(batch) -> metrics``
    One gradient update from a replayed batch, a dict of tensors ``[B, T, ...]``: the
    observation keys, ``action`` (the action taken *at* that step, i.e. after observing it),
    ``reward`` (received on arriving at that step; 0 where ``is_first``), ``is_first``,
    ``is_last``, ``is_terminal`` (float32 0/1). Returns scalar metrics named with the logger's
    namespaces (``loss/...``, ``world_model/...``, ``train/...``) as 0-d tensors on the agent's
    device (plain numbers are accepted too). An update reads nothing back to the host (no
    ``.item()``, ``float(t)``, ``bool(t)``, ``.cpu()``): the loop keeps the tensors and fetches
    all of them in one transfer per ``run.log_every``, when it also checks every ``loss/*``
    term and stops the run on a non-finite one, naming the last good checkpoint (it checks
    before writing each checkpoint too, so that one is never written after a bad update).

``replay_latents() -> dict[str, Tensor] | None`` (optional)
    With ``replay.context=1`` the replay's batches also hold ``replay_index`` (int64 ``[B, 2]``:
    stream and start of each window), ``context_valid`` (float32 ``[B]``: 1 where the step
    before the window has a stored latent) and, once latents were stored, ``context/<key>``
    (float32 ``[B, ...]``: the stored latent of that step). An agent that uses them starts each
    window from the stored latent where valid (``is_first`` at the window's first step still
    resets) and, after ``update(batch)``, returns from ``replay_latents()`` the latents of every
    step of that batch, ``{key: Tensor [B, T, ...]}`` detached float32, which the loop hands to
    ``replay.update_latents(batch["replay_index"], ...)``; every call must bring the same keys
    and shapes. None (the default) when the agent stores nothing. Extra batch keys never reach
    an agent's model as observations.

``log_metrics() -> dict[str, float]`` (optional)
    Scalars read once per log interval after some updates ran, where host syncs are allowed:
    statistics that are costly to read per update (sparse densities, measured step times).

``state_dict() / load_state_dict(state)``
    Everything needed to continue training exactly: ``state["weights"]`` is a flat
    ``dict[str, Tensor]`` of model parameters and buffers (saved as safetensors); every other
    key (optimizer states, counters, RNG) must hold only tensors, numbers, strings, lists and
    dicts so it loads with ``torch.load(..., weights_only=True)``.

``report(batch) -> dict`` (optional)
    Images/videos for evaluation-time logging (e.g. open-loop predictions), keyed by name.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import torch

State = Any


class Agent(abc.ABC):
    """Base class of agents; see the module docstring for the contract."""

    @abc.abstractmethod
    def initial_state(self, batch_size: int) -> State: ...

    @abc.abstractmethod
    def act(
        self, obs: dict[str, np.ndarray], state: State, explore: bool
    ) -> tuple[np.ndarray, State]: ...

    @abc.abstractmethod
    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]: ...

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def log_metrics(self) -> dict[str, float]:
        """Once-per-log-interval scalars (may sync the device); see the module docstring."""
        return {}

    def replay_latents(self) -> dict[str, torch.Tensor] | None:
        """The last update's per-step latents for the replay context (``[B, T, ...]`` float32,
        detached), or None; see the module docstring."""
        return None

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Start from another run's trained weights (``state_dict()["weights"]`` of the same
        architecture) with fresh optimizers and counters (``train.py init=...``)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot start from another run's weights (init=); "
            "continue that run with resume=<run dir> instead"
        )

    def report(self, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Media for logging at eval time: name -> uint8 video ``[T, H, W, 3]``. Default: none."""
        return {}
