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

from imagine_rl.agents.dreamer_config import actor_critic_spec
from imagine_rl.agents.sparsity import (
    cached_masks,
    sparsify_actor_critic,
    sparsify_world_model,
)
from imagine_rl.runtime.accelerator import make_accelerator
from imagine_rl.runtime.loop import planned_updates as loop_planned_updates
from imagine_rl.runtime.optimizers import Part
from imagine_rl.worldmodels.actor_critic import ActorCritic

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


class ModelAgent(Agent):
    """What every agent with a world model repeats, once: the accelerator (built for the run's
    planned updates, which the trainer tells the agent), the dynamic-sparse masks on its world
    model, the optimizer policy, checkpoint keys by module prefix, the act wrapper and the
    once-per-interval metrics.

    A subclass builds its modules, then calls ``place`` and (with ``sparse.enabled``)
    ``sparsify``, and sets ``optimizer_policy``; it names its checkpointed modules in
    ``modules()`` (their prefixes are the checkpoint's weight keys), its trained parts in
    ``trained()``, and implements ``_act`` (called inside ``inference_mode`` with the masks
    cached) and ``update``.
    """

    def __init__(
        self, config: Any, planned_updates: int | None = None, compile_by_length: bool = True
    ) -> None:
        self.config = config
        self.planned_updates = (
            loop_planned_updates(config) if planned_updates is None else planned_updates
        )
        # Device, precision policy, backward/clip/step: the accelerator decides (cpu, cuda,
        # ipu-sim); an agent never names a device itself. ``compile_by_length``: whether
        # ``agent.compile=auto`` on cpu turns on for long runs (else only on cuda).
        length = self.planned_updates if compile_by_length else None
        self.accelerator = make_accelerator(config, length)
        self.device = self.accelerator.device
        self.sparsifier: Any = None
        # sparse.behaviour: the actor's and the critic's masks (their own schedule).
        self.behaviour_sparsifier: Any = None
        self.optimizer_policy: Any = None
        # An agent's own random stream (planning samples), saved in checkpoints; None: none.
        self.generator: torch.Generator | None = None
        self.updates = 0

    def modules(self) -> dict[str, torch.nn.Module]:
        """Checkpointed modules by weight-key prefix: ``world_model`` (``self.wm``) and, with
        an actor-critic (``self.behaviour``), ``actor``, ``critic``, ``slow_critic`` and
        ``return_norm``. An agent with other modules overrides this."""
        parts: dict[str, torch.nn.Module] = {"world_model": self.wm}
        behaviour = getattr(self, "behaviour", None)
        if behaviour is not None:
            for name in ("actor", "critic", "slow_critic", "return_norm"):
                parts[name] = getattr(behaviour, name)
        return parts

    def trained(self) -> dict[str, torch.nn.Module]:
        """The trainable parts whose parameters ``num_parameters`` counts."""
        return {k: m for k, m in self.modules().items() if k in ("world_model", "actor", "critic")}

    def build_actor_critic(self, feat_size: int, action_dim: int, discrete: bool) -> ActorCritic:
        """The actor-critic of ``agent.*`` on a world model's features (return percentiles
        over every rank's returns under torchrun)."""
        spec = actor_critic_spec(self.config, discrete)
        factory = self.factory
        return ActorCritic(feat_size, action_dim, discrete, spec, factory, self.accelerator.gather)

    def actor_critic_parts(self) -> dict[str, Part]:
        """The actor's and the critic's optimizer parts (``agent.actor_*``/``critic_*``);
        none without an actor-critic."""
        behaviour, a = getattr(self, "behaviour", None), self.config.agent
        if behaviour is None:
            return {}
        actor, critic = behaviour.actor.parameters(), behaviour.critic.parameters()
        return {
            "actor": Part(list(actor), a.actor_lr, a.actor_eps, a.actor_grad_clip),
            "critic": Part(list(critic), a.critic_lr, a.critic_eps, a.critic_grad_clip),
        }

    def place(self) -> None:
        for module in self.modules().values():
            self.accelerator.place(module)

    def sparsify(
        self, world_model: torch.nn.Module, forward: Any, example: Any, skip_default: Any
    ) -> None:
        """Masks on ``world_model``'s layers (``sparse.*``), before the optimizers exist (they
        keep the same Parameter objects anyway); see ``agents.sparsity``."""
        self.sparsifier = sparsify_world_model(
            self.config,
            world_model,
            forward,
            example,
            skip_default,
            self.planned_updates,
            self.device,
        )
        # RigL's dense gradients, like the masked ones, are averaged over ranks (torchrun).
        self.sparsifier.grad_reduce = self.accelerator.average

    def sparsify_behaviour(self) -> None:
        """With ``sparse.behaviour``: masks on the actor's and the critic's layers too (see
        ``agents.sparsity.sparsify_actor_critic``); call after ``sparsify``, before the
        optimizers exist."""
        if not self.config.sparse.behaviour:
            return
        if self.sparsifier is None:
            raise ValueError(
                "sparse.behaviour=true sparsifies the actor-critic beside a sparse world "
                "model: set sparse.enabled=true too (or sparse.behaviour=false)"
            )
        behaviour = getattr(self, "behaviour", None)
        if behaviour is None:
            raise ValueError(
                "sparse.behaviour=true needs an actor-critic; agent.behaviour=planner has "
                "none: set sparse.behaviour=false"
            )
        self.behaviour_sparsifier = sparsify_actor_critic(
            self.config, behaviour, self.wm.feat_size, self.planned_updates, self.device
        )
        self.behaviour_sparsifier.grad_reduce = self.accelerator.average
        behaviour.sync_slow_critic()  # the EMA starts from the masked critic

    def attach_behaviour_sparsity(self) -> None:
        """Re-mask the actor and the critic after each step of their optimizers."""
        if self.behaviour_sparsifier is not None:
            for opt in self._behaviour_optimizers():
                self.behaviour_sparsifier.attach(opt)

    def _behaviour_optimizers(self) -> list[torch.optim.Optimizer]:
        found = [self.optimizer_policy.optimizer_of(part) for part in ("actor", "critic")]
        return list({id(opt): opt for opt in found}.values())  # joint: one optimizer

    def step_behaviour_sparsity(self) -> None:
        """After the actor's and the critic's step: re-mask, scheduled drop/regrow, arming."""
        if self.behaviour_sparsifier is not None:
            self.behaviour_sparsifier.step(self._behaviour_optimizers())

    def cached(self) -> Any:
        """Masked weights computed once per block (``agents.sparsity.cached_masks``)."""
        return cached_masks(self.sparsifier)

    @torch.inference_mode()
    def act(
        self, obs: dict[str, np.ndarray], state: State, explore: bool
    ) -> tuple[np.ndarray, State]:
        n = len(obs["is_first"])
        if state is None:
            state = self.initial_state(n)
        with self.cached():
            return self._act(obs, state, explore, n)

    @abc.abstractmethod
    def _act(
        self, obs: dict[str, np.ndarray], state: State, explore: bool, n: int
    ) -> tuple[np.ndarray, State]: ...

    def log_metrics(self) -> dict[str, float]:
        """Once per log interval: the sparse masks' statistics (``sparse/*``) and the
        accelerator's measured (cuda) or estimated (ipu-sim) scalars."""
        out = dict(self.sparsifier.metrics()) if self.sparsifier is not None else {}
        if self.behaviour_sparsifier is not None:
            for key, value in self.behaviour_sparsifier.metrics().items():
                out[key.replace("sparse/", "sparse/behaviour_", 1)] = value
        out.update(self.accelerator.metrics())
        return out

    def state_dict(self) -> dict[str, Any]:
        weights = {}
        for prefix, module in self.modules().items():
            for key, value in module.state_dict().items():
                weights[f"{prefix}.{key}"] = value.detach().cpu().clone()
        state = {
            "weights": weights,
            "optimizers": self.optimizer_policy.state_dict(),
            "updates": self.updates,
        }
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        if self.sparsifier is not None:
            # Masks (bool), schedule position, RNG; the weights hold the masked layers as
            # `<layer>.parametrizations.weight.original` and `...weight.0.mask`.
            state["sparse"] = self.sparsifier.state_dict()
        if self.behaviour_sparsifier is not None:
            state["sparse_behaviour"] = self.behaviour_sparsifier.state_dict()
        return state

    def load_modules(self, weights: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
        """Each module of ``modules()`` (but ``skip``) from the weights under its prefix."""
        for prefix, module in self.modules().items():
            if prefix in skip:
                continue
            own = {
                key[len(prefix) + 1 :]: value
                for key, value in weights.items()
                if key.startswith(prefix + ".")
            }
            module.load_state_dict(own, strict=True)

    def check_sparse(self, saved_sparse: bool, what: str = "checkpoint was") -> None:
        if saved_sparse != (self.sparsifier is not None):
            saved, now = ("true", "false") if saved_sparse else ("false", "true")
            raise ValueError(
                f"{what} saved with sparse.enabled={saved}, this agent has "
                f"sparse.enabled={now}: load it with the sparse settings it was trained with"
            )

    def check_behaviour_sparsity(self, state: dict[str, Any]) -> None:
        """Refuse, in one line and before any weight is loaded, a checkpoint that disagrees
        with this agent about ``sparse.behaviour``."""
        saved = "sparse_behaviour" in state
        if saved != (self.behaviour_sparsifier is not None):
            was, now = ("true", "false") if saved else ("false", "true")
            raise ValueError(
                f"checkpoint was saved with sparse.behaviour={was}, this agent has "
                f"sparse.behaviour={now}: load it with the sparse settings it was trained with"
            )

    def load_behaviour_sparsity(self, state: dict[str, Any]) -> None:
        """The actor-critic's masks from a checked ``state``; call after the weights."""
        if self.behaviour_sparsifier is not None:
            self.behaviour_sparsifier.load_state_dict(state["sparse_behaviour"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_sparse("sparse" in state)
        self.check_behaviour_sparsity(state)
        self.load_modules(state["weights"])
        if self.sparsifier is not None:
            self.sparsifier.load_state_dict(state["sparse"])  # checks the masks, re-arms RigL
        self.load_behaviour_sparsity(state)
        self.optimizer_policy.load_state_dict(state["optimizers"])
        self.updates = int(state["updates"])
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])

    def num_parameters(self) -> dict[str, int]:
        """Trainable parameter counts per part."""
        counts = {
            name: sum(p.numel() for p in module.parameters())
            for name, module in self.trained().items()
        }
        counts["total"] = sum(counts.values())
        return counts
