"""Replay context (``replay.context=1``): windows observed from the stored latent before them.

The replay hands each window's preceding latent back as ``context/<key>`` ``[B, ...]`` where
``context_valid`` ``[B]`` is 1 (see ``agents.base``: ``replay_latents``); the agent observes
the window from it instead of the initial state (``is_first`` at the window's first step
still resets inside ``observe``) and keeps the update's latents for the write-back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

State = dict[str, torch.Tensor]


class ReplayContext:
    """Context inputs, start states and write-back latents for one agent.

    ``shapes``: per-step shapes of the latents written back (``{"deter": (D,), "stoch": (S,
    C), "action": (A,)}`` for the RSSM); ``initial(B, device)``: the state a window without a
    stored latent starts from, with the same keys.
    """

    def __init__(
        self, shapes: dict[str, tuple[int, ...]], initial: Callable[[int, torch.device], State]
    ) -> None:
        self.shapes = shapes
        self.initial = initial
        self.latents: State | None = None

    @classmethod
    def for_rssm(cls, rssm: torch.nn.Module, action_dim: int) -> ReplayContext:
        """The RSSM's state (``deter``, ``stoch``) and the model action taken at each step (the
        next step's input); windows without a stored latent start from the RSSM's initial
        state and a zero action."""
        c = rssm.config

        def initial(batch_size: int, device: torch.device) -> State:
            init = rssm.initial(batch_size, device)
            return {**init, "action": torch.zeros(batch_size, action_dim, device=device)}

        shapes = {"deter": (c.deter,), "stoch": tuple(c.stoch_shape), "action": (action_dim,)}
        return cls(shapes, initial)

    def complete(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` with ``context_valid`` and every ``context/<key>`` present: zeros (on the
        batch's device) where the replay has none yet (before its first write-back), so every
        update sees the same inputs (no recompile, a static ipu-sim signature).

        Shapes: ``context_valid`` ``[B]``, ``context/<key>`` ``[B, *shapes[key]]``.
        """
        ref = batch["is_first"]
        B = ref.shape[0]
        out = dict(batch)
        if "context_valid" not in out:
            out["context_valid"] = torch.zeros(B, device=ref.device)
        for key, shape in self.shapes.items():
            name = f"context/{key}"
            if name not in out:
                out[name] = torch.zeros(B, *shape, device=ref.device)
        return out

    def inputs(self, batch: dict[str, torch.Tensor], device: torch.device) -> State:
        """The context keys of ``batch`` as float tensors on ``device`` (for ``preprocess``)."""
        return {
            key: value.to(device, non_blocking=True).float()
            for key, value in self.complete(batch).items()
            if key == "context_valid" or key.startswith("context/")
        }

    def start_state(self, data: dict[str, torch.Tensor]) -> State:
        """The stored context where ``context_valid``, else ``initial``.

        Shapes: ``data["context_valid"]`` ``[B]`` -> every key ``[B, *shapes[key]]``.
        """
        B = data["is_first"].shape[0]
        init = self.initial(B, data["is_first"].device)
        valid = data["context_valid"] > 0.5  # [B]
        state = {}
        for key, base in init.items():
            stored = data[f"context/{key}"].to(base.dtype)
            mask = valid.reshape(B, *([1] * (base.dim() - 1)))
            state[key] = torch.where(mask, stored, base)
        return state

    def keep(self, post: State, action: torch.Tensor, clone: bool = False) -> None:
        """Keep the update's latents for ``replay_latents``: the posterior states and the
        model action taken at each step, detached float32 ``[B, T, ...]`` (``clone``: copies,
        where CUDA-graph replays reuse their outputs)."""
        latents = {k: post[k].detach().float() for k in self.shapes if k != "action"}
        latents["action"] = action.detach().float()
        if clone:
            latents = {k: v.clone() for k, v in latents.items()}
        self.latents = latents


__all__ = ["ReplayContext"]
