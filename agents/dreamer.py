"""DreamerV3: a world model learned from replay, an actor-critic learned in its imagination.

Each ``update`` does one world-model step on the replayed batch, then one actor and one critic
step on rollouts of ``agent.horizon`` imagined steps started from every posterior state of the
batch. The actor's loss never updates world-model weights: the world model's parameters are
frozen while the behaviour losses are built, and each part has its own Adam optimizer.

``agent.optimizer=laprop`` (current DreamerV3): one ``runtime.optimizers.LaProp`` over world
model, actor and critic, and one step per update on the gradient of all losses together, the
behaviour losses computed on the world model before its step (``_train_joint``; per-tensor
adaptive gradient clipping instead of the global-norm clips). ``agent.replay_critic_grad_wm``
lets the replay value loss reach the world model through the posterior (DreamerV3's
``repval_grad``); with Adam it also takes that one joint gradient, then steps each part.

Replay context (``replay.context``): the world model observes each window from the stored
posterior of the step before it (``context/<key>`` where ``context_valid``; the initial state
elsewhere, and ``is_first`` still resets), and ``replay_latents()`` hands the update's
posteriors back for the replay to store.

Config mapping: ``world_model.*`` -> ``worldmodels.WorldModelSpec``/``RSSMConfig``,
``agent.*`` -> the actor, critic, returns and optimizers here. See ``runtime/presets/{xs,s,m,
dreamer_debug}.yaml`` for sizes.

Dynamic-sparse world model (``sparse.enabled=true``): after the modules are built, the world
model's linear/conv layers (minus ``sparse.skip``) get masks from the ``sparse`` library; the
sparsifier is attached to the world-model optimizer and stepped after each of its steps
(topology updates every ``sparse.update_every`` updates), its metrics (``sparse/density``,
``sparse/flops_ratio``, ...) join the update metrics, and its state is saved under
``state_dict()["sparse"]``. The schedule's ``total_steps`` is ``planned_updates(config)``.

Representation (``world_model.representation``): ``reconstruction``, ``reconstruction+cpc``
(``loss/cpc`` weighted by ``world_model.cpc_scale``) or decoder-free ``cpc``. Greedy InfoMax
(``world_model.greedy_infomax.modules=M``): the encoder's ``M`` modules each have their own
optimizer (``greedy_<i>`` in checkpoints) and are stepped, one after the other, before the
world-model step, which consumes their detached output and no longer updates the encoder.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import math
import re
from fractions import Fraction
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from imagine_rl import sparse
from imagine_rl.agents import dreamer_config
from imagine_rl.agents.base import Agent, State
from imagine_rl.agents.dreamer_config import SPARSE_SKIP_DEFAULT
from imagine_rl.agents.sparsity import cached_masks, sparsify_model
from imagine_rl.runtime import distributed
from imagine_rl.runtime.accelerator import make_accelerator
from imagine_rl.runtime.config import Config
from imagine_rl.runtime.optimizers import LaProp
from imagine_rl.runtime.registry import AgentEntry, register_agent
from imagine_rl.worldmodels import (
    Actor,
    Critic,
    LayerFactory,
    ReturnNormalizer,
    RSSMConfig,
    WorldModel,
    WorldModelSpec,
    lambda_return,
    one_hot,
    preprocess_obs,
    replay_lambda_return,
)
from imagine_rl.worldmodels.cpc import CPCSpec
from imagine_rl.worldmodels.factored import FactoredSpec
from imagine_rl.worldmodels.rssm import RSSMSettings

_FLAGS = ("is_first", "is_last", "is_terminal")


def world_model_spec(config: Config) -> WorldModelSpec:
    """The world-model architecture described by ``config.world_model``."""
    w = config.world_model
    rssm = RSSMConfig(
        # The section's RSSM keys are RSSMSettings' fields; the spec adds the factored schedule.
        **{f.name: getattr(w, f.name) for f in dataclasses.fields(RSSMSettings)},
        factored=FactoredSpec(
            **dataclasses.asdict(w.factored),
            total_steps=planned_updates(config) if w.factored.groups else 1,
            seed=config.seed,
        ),
    )
    return WorldModelSpec(
        rssm=rssm,
        units=w.units,
        mlp_layers=w.mlp_layers,
        head_layers=w.head_layers,
        cnn_depth=w.cnn_depth,
        reward_bins=w.reward_bins,
        free_nats=w.free_nats,
        norm=w.norm,
        act=w.act,
        representation=w.representation,
        cpc=CPCSpec(
            horizons=w.cpc_horizons,
            dim=w.cpc_dim,
            temperature=w.cpc_temperature,
            actions=w.cpc_actions,
        ),
        greedy_modules=w.greedy_infomax.modules,
    )


def planned_updates(config: Config, world_size: int | None = None) -> int:
    """World-model updates a run of ``config`` will do: the sparse schedule's ``total_steps``.

    Mirrors ``runtime.loop``: vector steps of ``num_envs * action_repeat`` env steps until
    ``run.steps``; once more than ``run.learning_starts`` env steps are collected each vector
    step adds ``num_envs`` policy steps, and ``replay_ratio`` replayed steps per policy step in
    batches of ``batch_size * batch_length`` make ``floor(policy steps * replay_ratio /
    (batch_size * batch_length))`` updates, i.e. about ``(run.steps - run.learning_starts) /
    action_repeat * replay_ratio / (batch_size * batch_length)`` (policy steps are summed over
    the envs, so ``num_envs`` only enters through the rounding). At least 1.

    Under ``torchrun`` (``world_size`` ranks; default: this process's launch) the counters are
    global: a vector step counts the steps of every rank and an update replays one batch per
    rank, so a run does about ``1 / world_size`` of the updates, each on ``world_size`` batches.
    """
    world = distributed.context().world_size if world_size is None else world_size
    per_vector_step = config.env.num_envs * config.env.action_repeat * world
    vector_steps = -(-config.run.steps // per_vector_step)
    before = min(vector_steps, config.run.learning_starts // per_vector_step)
    policy_steps = config.env.num_envs * world * (vector_steps - before)
    ratio = Fraction(config.run.replay_ratio).limit_denominator(10_000)
    return max(1, math.floor(policy_steps * ratio / (config.replay.steps_per_batch * world)))


def _grad_norm(params, device: torch.device) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (0-d, on the device; no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _matches(patterns: list[str], names: list[str]) -> bool:
    """fnmatch or full-match regex, as ``sparse`` matches ``skip``/``include``."""
    for pattern in patterns:
        for name in names:
            if fnmatch.fnmatchcase(name, pattern):
                return True
            with contextlib.suppress(re.error):
                if re.fullmatch(pattern, name):
                    return True
    return False


def sparse_skip(wm: nn.Module, patterns: list[str]) -> list[str]:
    """``patterns`` plus the module path of every world-model layer whose ``LayerFactory``
    name matches one (the pixel decoder's last transposed conv also answers to
    ``wm.decoder.cnn.out``), so ``sparse.skip`` accepts factory names and module paths."""
    names = {
        path: [module.layer_name]
        for path, module in wm.named_modules()
        if isinstance(getattr(module, "layer_name", None), str)
    }
    convs = [p for p, n in names.items() if re.fullmatch(r"wm\.decoder\.cnn\.\d+", n[0])]
    if convs:
        names[convs[-1]].append("wm.decoder.cnn.out")
    extra = [path for path, n in names.items() if _matches(patterns, n)]
    return list(dict.fromkeys([*patterns, *extra]))


class DreamerAgent(Agent):
    """DreamerV3 agent for ``Box`` (in ``[-1, 1]``) or ``Discrete`` actions."""

    def __init__(self, config: Config, obs_space: gym.spaces.Dict, action_space: gym.Space) -> None:
        self.config = config
        a, w = config.agent, config.world_model
        # Device, precision policy, backward/clip/step: the accelerator decides (cpu, cuda,
        # ipu-sim); this agent never names a device itself.
        self.accelerator = make_accelerator(config, planned_updates(config))
        self.device = self.accelerator.device
        if isinstance(action_space, gym.spaces.Discrete):
            self.discrete, self.action_dim = True, int(action_space.n)
            self.action_start = int(action_space.start)
        elif isinstance(action_space, gym.spaces.Box):
            self.discrete, self.action_dim = False, int(np.prod(action_space.shape))
            self.action_start = 0
        else:
            raise TypeError(f"DreamerAgent supports Box and Discrete actions, got {action_space}")
        self.action_space = action_space
        self.obs_shapes = {
            key: tuple(space.shape)
            for key, space in obs_space.spaces.items()
            if key not in _FLAGS and not key.startswith("log_")
        }
        if config.sparse.enabled and w.greedy_infomax.modules:
            raise ValueError(
                "sparse.enabled=true and world_model.greedy_infomax.modules>0 cannot be combined "
                "(the sparse masks follow the world-model optimizer only); turn one off"
            )
        # replay.context: the world model's observe starts from the stored posterior of the
        # step before each window (batch["context/<key>"] where batch["context_valid"]); the
        # update's posteriors are kept for the write-back (replay_latents).
        self.context = getattr(config.replay, "context", 0) > 0
        self._latents: dict[str, torch.Tensor] | None = None
        if a.actor_grad == "auto":
            self.dynamics_grad = not self.discrete
        else:
            self.dynamics_grad = a.actor_grad == "dynamics"
        if self.dynamics_grad and self.discrete:
            raise ValueError("agent.actor_grad=dynamics needs continuous actions; use reinforce")

        # Build every module with a fixed seed, without disturbing the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.factory = LayerFactory(norm=w.norm, act=w.act)
            self.wm = WorldModel(
                self.obs_shapes, self.action_dim, world_model_spec(config), self.factory
            )
            feat = self.wm.feat_size
            self.actor = Actor(
                feat,
                self.action_dim,
                self.discrete,
                a.units,
                a.layers,
                self.factory,
                a.actor_unimix,
                a.actor_min_std,
                a.actor_max_std,
            )
            self.critic = Critic(feat, a.units, a.layers, self.factory, a.critic_bins)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        # Under torchrun the percentiles come from every rank's returns (identical buffers).
        self.retnorm = ReturnNormalizer(
            a.return_norm_decay,
            a.return_norm_limit,
            a.return_norm_low,
            a.return_norm_high,
            gather=self.accelerator.gather,
        )
        for module in self._modules().values():
            self.accelerator.place(module)
        # Masks go on before the optimizers exist (they keep the same Parameter objects anyway).
        self.sparsifier: sparse.Sparsifier | None = None
        if config.sparse.enabled:
            self.sparsifier = self._sparsify()
            # RigL's dense gradients, like the masked ones, are averaged over ranks (torchrun).
            self.sparsifier.grad_reduce = self.accelerator.average

        def adam(params, lr, eps):
            return self.accelerator.optimizer(params, lr=lr, eps=eps)

        # Greedy InfoMax: one optimizer per encoder module; the world model's own optimizer
        # gets every other parameter.
        self.greedy_opts: list[torch.optim.Optimizer] = []
        greedy_ids: set[int] = set()
        if self.wm.greedy is not None:
            lr = w.greedy_infomax.lr if w.greedy_infomax.lr is not None else w.lr
            for i in range(self.wm.greedy.num_modules):
                params = self.wm.greedy.module_parameters(i)
                greedy_ids |= {id(p) for p in params}
                self.greedy_opts.append(adam(params, lr, w.eps))
        wm_params = [p for p in self.wm.parameters() if id(p) not in greedy_ids]
        # agent.optimizer=laprop: one optimizer over world model, actor and critic (current
        # DreamerV3); adam: one per part. `joint`: one gradient of all losses, then the steps.
        self.laprop = a.optimizer == "laprop"
        self.joint = self.laprop or a.replay_critic_grad_wm
        self.opt: LaProp | None = None
        self.wm_opt: torch.optim.Optimizer | None = None
        self.actor_opt: torch.optim.Optimizer | None = None
        self.critic_opt: torch.optim.Optimizer | None = None
        if self.laprop:
            if self.greedy_opts:
                raise ValueError(
                    "agent.optimizer=laprop cannot train world_model.greedy_infomax.modules>0 "
                    "(their optimizers step inside the forward pass); use agent.optimizer=adam"
                )
            self.opt = LaProp(
                [*wm_params, *self.actor.parameters(), *self.critic.parameters()],
                lr=a.lr,
                agc=a.agc,
                beta1=a.beta1,
                beta2=a.beta2,
                eps=a.opt_eps,
                warmup=a.warmup,
            )
        else:
            self.wm_opt = adam(wm_params, w.lr, w.eps)
            self.actor_opt = adam(self.actor.parameters(), a.actor_lr, a.actor_eps)
            self.critic_opt = adam(self.critic.parameters(), a.critic_lr, a.critic_eps)
        if self.sparsifier is not None:
            self.sparsifier.attach(self._wm_optimizer())  # re-mask after every step
        # ipu-sim: placement, block-sparse limits and the memory budget are checked here.
        self.accelerator.prepare(
            {k: m for k, m in self._modules().items() if k != "return_norm"}, self._optimizers()
        )
        self.updates = 0
        self.loss_scales = {
            "loss/reconstruction": w.rec_scale,
            "loss/reward": w.reward_scale,
            "loss/continue": w.continue_scale,
            "loss/dynamics": w.dyn_scale,
            "loss/representation": w.rep_scale,
            "loss/cpc": w.cpc_scale,
            "loss/graph": 1.0,  # factored l1 graph: already scaled by factored.l1_scale
        }
        self.autocast_enabled = self.accelerator.autocast_dtype is not None
        # agent.compile: the world-model step and the behaviour step each become one graph
        # (forward unrolled over replay.batch_length and agent.horizon, and its backward), with
        # no graph break. Greedy InfoMax (its own optimizer steps inside the encoder's pass)
        # and sparse masks (parametrizations and scheduled topology changes) stay eager.
        self.compiled = (
            self.accelerator.compiling and self.sparsifier is None and self.wm.greedy is None
        )
        if self.accelerator.compiling and not self.compiled and config.agent.compile is True:
            raise ValueError(
                "agent.compile=true cannot compile sparse.enabled=true or "
                "world_model.greedy_infomax.modules>0; set agent.compile=false (or auto)"
            )
        compile_fn = self.accelerator.compile if self.compiled else (lambda fn, **_: fn)
        self._world_model_losses = compile_fn(self._world_model_losses_impl, fullgraph=True)
        self._behaviour_losses = compile_fn(self._behaviour_losses_impl, fullgraph=True)

    # ---------------------------------------------------------------------------------
    # Helpers
    # ---------------------------------------------------------------------------------
    def _modules(self) -> dict[str, torch.nn.Module]:
        return {
            "world_model": self.wm,
            "actor": self.actor,
            "critic": self.critic,
            "slow_critic": self.slow_critic,
            "return_norm": self.retnorm,
        }

    def _sparsify(self) -> sparse.Sparsifier:
        """Masks on the world model's layers; FLOPs counted per replayed step (one no-grad
        world-model loss forward on a dummy ``[1, replay.batch_length]`` batch)."""
        cfg = self.config
        lib_config = cfg.sparse.library_config(
            total_steps=planned_updates(cfg),
            seed=cfg.seed,
            fast_path_batch=cfg.replay.steps_per_batch,
            skip=sparse_skip(
                self.wm, SPARSE_SKIP_DEFAULT if cfg.sparse.skip is None else cfg.sparse.skip
            ),
        )
        T = cfg.replay.batch_length
        batch = {k: torch.zeros(1, T, *shape) for k, shape in self.obs_shapes.items()}
        if self.discrete:
            batch["action"] = torch.full((1, T), self.action_start, dtype=torch.long)
        else:
            batch["action"] = torch.zeros(1, T, *self.action_space.shape)
        batch["reward"] = torch.zeros(1, T)
        batch.update({flag: torch.zeros(1, T) for flag in _FLAGS})
        batch["is_first"][:, 0] = 1
        example = self.preprocess(batch)
        return sparsify_model(self.wm, self.wm.loss_and_states, lib_config, example, T, self.device)

    def _cached(self):
        """Masked weights computed once per block (``agents.sparsity.cached_masks``)."""
        return cached_masks(self.sparsifier)

    def _main_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers of world model, actor and critic: ``all`` (laprop) or one each."""
        if self.opt is not None:
            return {"all": self.opt}
        assert self.wm_opt is not None and self.actor_opt is not None
        assert self.critic_opt is not None
        return {"world_model": self.wm_opt, "actor": self.actor_opt, "critic": self.critic_opt}

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = self._main_optimizers()
        opts.update({f"greedy_{i}": opt for i, opt in enumerate(self.greedy_opts)})
        return opts

    def _wm_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that steps the world model (sparse masks and factored graphs
        follow its steps and fix up its state)."""
        opt = self.opt if self.opt is not None else self.wm_opt
        assert opt is not None
        return opt

    def _autocast(self):
        return self.accelerator.autocast()

    def _encode_action(self, action: torch.Tensor) -> torch.Tensor:
        """Env actions ``[..., (A)]`` -> model actions ``[..., A]`` (one-hot if discrete)."""
        if self.discrete:
            index = action.long()
            if index.dim() == 3 and index.shape[-1] == 1:  # stored as [B, T, 1]
                index = index[..., 0]
            return one_hot(index - self.action_start, self.action_dim)
        lead = action.shape[: action.dim() - len(self.action_space.shape)]
        return action.float().reshape(*lead, self.action_dim)

    def preprocess(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Replay batch ``[B, T, ...]`` -> device tensors the world model consumes.

        With ``replay.context`` also ``context_valid`` ``[B]`` and ``context/<key>``
        ``[B, ...]`` for every ``_context_shapes`` key (zeros where the batch has none yet).
        ``replay_index`` and other extra keys never reach the model."""
        dev = self.device
        data = preprocess_obs(
            {k: batch[k].to(dev, non_blocking=True) for k in self.obs_shapes}, self.wm.image_keys
        )
        data["action"] = self._encode_action(batch["action"].to(dev, non_blocking=True))
        for key in _FLAGS + ("reward",):
            data[key] = batch[key].to(dev, non_blocking=True).float()
        if self.context:
            for key, value in self._with_context(batch).items():
                if key == "context_valid" or key.startswith("context/"):
                    data[key] = value.to(dev, non_blocking=True).float()
        return data

    def _context_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-step shapes of the latents written back to the replay (``replay_latents``):
        the RSSM state and the model action taken at the step (the next step's input)."""
        c = self.wm.rssm.config
        return {"deter": (c.deter,), "stoch": tuple(c.stoch_shape), "action": (self.action_dim,)}

    def _with_context(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` with ``context_valid`` and every ``context/<key>`` present: zeros (on the
        batch's device) where the replay has none yet (before its first write-back), so every
        update sees the same inputs (no recompile, a static ipu-sim signature).

        Shapes: ``context_valid`` ``[B]``, ``context/<key>`` ``[B, *_context_shapes()[key]]``.
        """
        ref = batch["is_first"]
        B = ref.shape[0]
        out = dict(batch)
        if "context_valid" not in out:
            out["context_valid"] = torch.zeros(B, device=ref.device)
        for key, shape in self._context_shapes().items():
            name = f"context/{key}"
            if name not in out:
                out[name] = torch.zeros(B, *shape, device=ref.device)
        return out

    def _start_state(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The observe's start state: the stored context where ``context_valid``, else the
        RSSM's initial state and a zero action (None without ``replay.context``: observe then
        starts from the initial state itself). ``is_first`` at the window's first step still
        resets inside observe.

        Shapes: ``deter`` ``[B, D]``, ``stoch`` ``[B, *stoch_shape]``, ``action`` ``[B, A]``.
        """
        if not self.context:
            return None
        B = data["is_first"].shape[0]
        init = self.wm.rssm.initial(B, data["is_first"].device)
        init = {**init, "action": torch.zeros(B, self.action_dim, device=init["deter"].device)}
        valid = data["context_valid"] > 0.5  # [B]
        state = {}
        for key, base in init.items():
            stored = data[f"context/{key}"].to(base.dtype)
            mask = valid.reshape(B, *([1] * (base.dim() - 1)))
            state[key] = torch.where(mask, stored, base)
        return state

    # ---------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------
    def train_world_model(
        self, data: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One world-model optimizer step; returns (detached posterior states, metrics).

        With Greedy InfoMax the encoder modules step first (each on its own loss); the world
        model then learns on their detached output. Separate Adam steps only: with
        ``agent.optimizer=laprop`` or ``agent.replay_critic_grad_wm`` the update takes one
        gradient of all losses (``_train_joint``)."""
        if self.joint:
            raise RuntimeError(
                "train_world_model steps the world model alone; with agent.optimizer=laprop or "
                "agent.replay_critic_grad_wm=true the update is one step of all losses (update)"
            )
        assert self.wm_opt is not None
        total, metrics, post = self._world_model_forward(data)
        norm = self.accelerator.backward(total, self.wm_opt, clip=self.config.world_model.grad_clip)
        self.accelerator.step(self.wm_opt)
        self._after_world_model_step()
        self.wm_opt.zero_grad(set_to_none=True)
        metrics["train/grad_norm_world_model"] = norm
        return post, metrics

    def _after_world_model_step(self) -> None:
        """Sparse masks and the factored graph follow each step of the world model."""
        opt = self._wm_optimizer()
        if self.sparsifier is not None:
            self.sparsifier.step(opt)  # re-mask, scheduled drop/regrow, RigL arming
        graph = self.wm.rssm.graph
        if graph is not None:  # factored dynamics: absent edges stay zero, scheduled rewiring
            graph.step(opt)

    def _world_model_forward(
        self, data: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Greedy InfoMax's module steps (if any), then the world-model losses with the main
        optimizers' gradients cleared: ``(total loss, metrics, post)``.

        ``post`` holds ``deter``/``stoch`` ``[B, T, ...]``, detached unless
        ``agent.replay_critic_grad_wm``. With ``replay.context`` the posteriors are kept for
        ``replay_latents``."""
        embed, greedy_metrics = None, {}
        if self.wm.greedy is not None:

            def greedy_update(loss: torch.Tensor, opt: torch.optim.Optimizer) -> torch.Tensor:
                norm = self.accelerator.backward(loss, opt, clip=self.config.world_model.grad_clip)
                self.accelerator.step(opt)
                return norm

            with self._autocast():
                embed, greedy_metrics = self.wm.greedy.train_step(
                    self.wm.obs(data),
                    data["action"],
                    data["is_first"],
                    self.greedy_opts,
                    update=greedy_update,
                )
        for opt in self._main_optimizers().values():
            opt.zero_grad(set_to_none=True)
        if embed is None:
            total, losses, metrics, post = self._world_model_losses(data)
        else:
            total, losses, metrics, post = self._world_model_losses_impl(data, embed)
        metrics = {**metrics, **{k: v.detach() for k, v in losses.items()}}
        metrics.update({f"world_model/{k}": v for k, v in greedy_metrics.items()})
        metrics["loss/world_model"] = total.detach()
        if self.context:
            latents = {k: post[k].detach().float() for k in ("deter", "stoch")}
            latents["action"] = data["action"].detach().float()
            if self.compiled and self.device.type == "cuda":  # CUDA-graph outputs get reused
                latents = {k: v.clone() for k, v in latents.items()}
            self._latents = latents
        return total, metrics, post

    def replay_latents(self) -> dict[str, torch.Tensor] | None:
        """The last update's latents for the replay's write-back (``replay.context``), else
        None: ``deter``, ``stoch`` (the posterior states) and ``action`` (the model action
        taken at each step), each float32 ``[B, T, ...]``, detached, on the agent's device.
        The replay hands the step before a window back as ``context/<key>`` ``[B, ...]``.

        Shapes: ``deter`` ``[B, T, D]``, ``stoch`` ``[B, T, *stoch_shape]``, ``action``
        ``[B, T, A]``.
        """
        return self._latents if self.context else None

    def _world_model_losses_impl(
        self, data: dict[str, torch.Tensor], embed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict, dict, dict]:
        """The world-model forward over the batch: ``(total, losses, metrics, post)`` with
        ``post`` the posterior ``deter``/``stoch`` ``[B, T, ...]`` (detached unless
        ``agent.replay_critic_grad_wm``), observed from ``_start_state`` (the replay context).
        One graph under ``agent.compile`` (its backward is compiled with it)."""
        with self._autocast(), self._cached():
            state = self._start_state(data)
            losses, metrics, post = self.wm.loss_and_states(data, state, embed=embed)
        total = sum(self.loss_scales[k] * losses[k] for k in losses)
        if self.config.agent.replay_critic_grad_wm:
            post = {k: post[k] for k in ("deter", "stoch")}
        else:
            post = {k: post[k].detach() for k in ("deter", "stoch")}
        return total, losses, metrics, post

    def _behaviour_losses_impl(
        self,
        post: dict[str, torch.Tensor],
        data: dict[str, torch.Tensor],
        pick: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(actor_loss + critic_loss, metrics)`` from imagination started at every posterior
        state (or those at ``pick``). One graph under ``agent.compile``.

        Each term of the summed loss reaches only its own part's parameters, so one backward
        pass fills the actor's and the critic's gradients with what two separate passes would:
        the world model's parameters are frozen by the caller, the critic's loss sees the
        features detached, and the returns that the actor differentiates (dynamics backprop)
        read the critic through detached parameters.

        Shapes: ``post`` ``[B, T, ...]``, ``data`` ``[B, T]`` flags, ``pick`` ``[N]`` or None.
        """
        a = self.config.agent
        # Imagination starts from the posterior as constants (no path into the world model);
        # only the replay value loss may read it with gradient (agent.replay_critic_grad_wm).
        start = {
            "deter": post["deter"].detach().reshape(-1, post["deter"].shape[-1]),
            "stoch": post["stoch"].detach().flatten(0, 1),
        }
        start_continue = 1.0 - data["is_terminal"].reshape(-1)
        if pick is not None:
            start = {k: v[pick] for k, v in start.items()}
            start_continue = start_continue[pick]
        with self._autocast(), self._cached():
            traj, actor_raw = self._imagine(start)
            actor_loss, critic_loss, metrics = self._ac_losses(traj, actor_raw, start_continue)
            boot = metrics.pop("bootstrap")
            if a.replay_critic_scale > 0:
                replay_loss, replay_metrics = self._replay_critic_loss(post, data, boot)
                critic_loss = critic_loss + a.critic_scale * a.replay_critic_scale * replay_loss
                metrics.update(replay_metrics)
        return actor_loss + critic_loss, metrics

    def _imagine(
        self, start: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """An imagined rollout of ``agent.horizon`` steps from ``start`` (``[N, ...]``) and the
        policy's raw outputs at each of its first ``horizon`` states (``[N, H, ...]``).

        The policy runs once per imagined state; for REINFORCE the rollout itself is not
        differentiated (the policy sees detached features, its samples are detached)."""
        dynamics = self.dynamics_grad
        raws, samples = [], []

        def policy(state):
            feat = self.wm.feat(state)
            with torch.enable_grad():
                raw = self.actor.net(feat if dynamics else feat.detach())
            raws.append(raw)
            sample, action = self.actor.sample(self.actor.dist(raw))
            samples.append(sample.detach())
            return action if dynamics else action.detach()

        with contextlib.nullcontext() if dynamics else torch.no_grad():
            traj = self.wm.imagine(policy, start, self.config.agent.horizon)
        # The raw samples, for REINFORCE's score function (``traj["action"]`` is clipped).
        traj["policy_sample"] = torch.stack(samples, 1)
        return traj, torch.stack(raws, 1)

    def _ac_losses(
        self, traj: dict[str, torch.Tensor], actor_raw: torch.Tensor, start_continue: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Losses from an imagined trajectory (``[N, H+1, ...]`` states, ``[N, H, ...]``
        actions and policy outputs)."""
        a = self.config.agent
        H = a.horizon
        # Heads run on all H+1 states at once (contiguous; the reward and continue predictions
        # at s_0 go unused: the start's own continue flag is known).
        feat = self.wm.feat(traj)  # [N, H+1, F]; only differentiable for dynamics backprop
        reward = self.wm.reward(feat)
        cont = self._imagined_continue(feat, start_continue)
        discount = a.discount * cont
        # The critic's own loss sees the features detached (it must not train the actor), and
        # its logits serve the returns too unless the actor differentiates them.
        logits = self.critic(feat.detach())  # [N, H+1, bins]
        if self.dynamics_grad:
            # Gradient into the features (and through the dynamics into the actor), none into
            # the critic's parameters: the critic read with detached copies of its weights.
            frozen = {k: v.detach() for k, v in self.critic.named_parameters()}
            value = self.critic.twohot.decode(torch.func.functional_call(self.critic, frozen, feat))
        else:
            value = self.critic.twohot.decode(logits).detach()
        ret = lambda_return(reward, discount, value, a.return_lambda)  # [N, H]
        # Weight of each state: the (discounted) probability that the episode reaches it.
        weight = (torch.cumprod(discount[:, :H], 1) / a.discount).detach()

        self.retnorm.update(ret)
        scale = self.retnorm.scale()
        base = value[:, :H].detach()
        dist = self.actor.dist(actor_raw)
        entropy = self.actor.entropy(dist)  # [N, H]
        if self.dynamics_grad:
            objective = (ret - base) / scale
        else:
            adv = ((ret - base) / scale).detach()
            objective = self.actor.log_prob(dist, traj["policy_sample"]) * adv
        actor_loss = -(weight * (objective + a.actor_entropy * entropy)).mean()

        target = ret.detach()
        with torch.no_grad():
            slow = self.slow_critic.value(feat.detach())[:, :H]
        critic_nll = -self.critic.twohot.log_prob(logits[:, :H], target)
        critic_reg = -self.critic.twohot.log_prob(logits[:, :H], slow)
        critic_loss = (weight * (critic_nll + a.slow_critic_reg * critic_reg)).mean()

        metrics = {
            "train/actor_entropy": entropy.mean().detach(),
            "train/return_scale": scale.detach(),
            "train/return_low": self.retnorm.low.detach().clone(),
            "train/return_high": self.retnorm.high.detach().clone(),
            "train/imagined_return": ret.mean().detach(),
            "train/imagined_reward": reward[:, 1:].mean().detach(),
            "train/imagined_continue": cont[:, 1:].mean().detach(),
            "train/value": base.mean().detach(),
            "train/advantage": ((ret - base) / scale).mean().detach(),
            "train/critic_nll": critic_nll.mean().detach(),
            "loss/actor": actor_loss.detach(),
            "loss/critic": critic_loss.detach(),
        }
        metrics["bootstrap"] = ret[:, 0].detach()  # R_0 of every start, for the replay loss
        return a.actor_scale * actor_loss, a.critic_scale * critic_loss, metrics

    def _imagined_continue(self, feat: torch.Tensor, start_continue: torch.Tensor) -> torch.Tensor:
        """Continue probabilities of the imagined states, no gradient (the discount is not a
        path for the actor's gradient): the continue head's at steps ``1..H``; at step 0 the
        replayed step's own flag ``start_continue``, or the head's prediction there with
        ``agent.imagine_start_continue`` (current DreamerV3: its weight of step 0 is the
        predicted continue of the start state).

        Shapes: ``feat`` ``[N, H+1, F]``, ``start_continue`` ``[N]`` -> ``[N, H+1]``.
        """
        with torch.no_grad():
            cont = self.wm.continue_prob(feat)
        if self.config.agent.imagine_start_continue:
            return cont
        return torch.cat([start_continue[:, None], cont[:, 1:]], 1)

    def _replay_critic_loss(
        self, post: dict[str, torch.Tensor], data: dict[str, torch.Tensor], boot: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Critic loss on the replayed sequences (DreamerV3's replay value loss).

        Targets are lambda-returns along the real sequence: real rewards and continues, and at
        every step the imagined return ``R_0`` started from that state as the bootstrap
        (``boot``, or the critic's own value when imagination started from a subset). A step
        whose successor begins a new episode falls back to its bootstrap.

        With ``agent.replay_critic_grad_wm`` the loss also backpropagates into the world model
        through ``post`` (when ``post`` carries its graph), as DreamerV3's ``repval_grad``: the
        targets (returns and the slow critic) stay constants either way.

        Shapes: ``post`` ``[B, T, ...]``, ``data`` ``[B, T]`` flags, ``boot`` ``[B * T]`` or
        empty; returns a 0-d loss.
        """
        a = self.config.agent
        B, T = data["reward"].shape
        feat = self.wm.feat(post)
        if not a.replay_critic_grad_wm:
            feat = feat.detach()
        logits = self.critic(feat)  # [B, T, bins]
        if boot.numel() == B * T:
            boot = boot.reshape(B, T)
        else:
            boot = self.critic.twohot.decode(logits).detach()
        discount = a.discount * (1.0 - data["is_terminal"])
        target = replay_lambda_return(
            data["reward"], discount, boot, data["is_first"], a.return_lambda
        )  # [B, T - 1]
        with torch.no_grad():
            slow = self.slow_critic.value(feat.detach())[:, :-1]
        nll = -self.critic.twohot.log_prob(logits[:, :-1], target)
        reg = -self.critic.twohot.log_prob(logits[:, :-1], slow)
        # An episode's last step has no return of its own to learn (its target would be its own
        # bootstrap): weight 1 - is_last, as DreamerV3's repval loss.
        weight = 1.0 - data["is_last"][:, :-1]
        loss = (weight * (nll + a.slow_critic_reg * reg)).mean()
        return loss, {
            "train/replay_critic_nll": nll.mean().detach(),
            "train/replay_return": target.mean().detach(),
        }

    def _behaviour_forward(
        self, post: dict[str, torch.Tensor], data: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed actor and critic losses from imagination (and the replay value loss):
        ``(loss, metrics)``. The world model's weights get no gradient from the imagination
        (their .grad stays untouched): frozen while the graph is built, so no pass computes
        them. Only the replay value loss reaches them, through ``post``, when ``post`` carries
        the world model's graph (``agent.replay_critic_grad_wm``).

        Shapes: ``post`` ``[B, T, ...]``, ``data`` ``[B, T]`` flags.
        """
        a = self.config.agent
        pick = None
        starts = data["is_terminal"].numel()
        if 0 < a.imagine_starts < starts:
            pick = torch.randperm(starts, device=self.device)[: a.imagine_starts]
        frozen = [p for p in self.wm.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            return self._behaviour_losses(post, data, pick)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def train_behaviour(self, post: dict[str, torch.Tensor], data: dict[str, torch.Tensor]):
        """One actor and one critic step on imagination from every posterior state (separate
        Adam steps; see ``train_world_model``)."""
        a = self.config.agent
        assert self.actor_opt is not None and self.critic_opt is not None
        loss, metrics = self._behaviour_forward(post, data)
        actor_norm, critic_norm = self.accelerator.backward_groups(
            loss, [(self.actor_opt, a.actor_grad_clip), (self.critic_opt, a.critic_grad_clip)]
        )
        metrics["train/grad_norm_actor"] = actor_norm
        metrics["train/grad_norm_critic"] = critic_norm
        for opt in (self.actor_opt, self.critic_opt):
            self.accelerator.step(opt)
            opt.zero_grad(set_to_none=True)
        if self.updates % a.slow_critic_every == 0:
            self._update_slow_critic(a.slow_critic_fraction)
        return metrics

    def _train_joint(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One gradient of the world-model and the behaviour losses, then the steps (current
        DreamerV3): the behaviour losses see the same, not yet stepped, world model.

        ``agent.optimizer=laprop``: one backward pass of the summed losses and one step of the
        single optimizer over all parameters (its per-tensor AGC replaces the global-norm
        clips). ``adam`` (with ``agent.replay_critic_grad_wm``): the same pass, then each part's
        gradients clipped to its own norm and its Adam stepped. One backward pass rather than
        one per loss: the accelerator then averages (torchrun) and unscales (fp16) each
        gradient once, and the replay value loss can reach the world model's graph.

        Shapes: ``data`` ``[B, T, ...]`` (see ``preprocess``); returns 0-d metrics.
        """
        a, w = self.config.agent, self.config.world_model
        total, metrics, post = self._world_model_forward(data)
        behaviour, behaviour_metrics = self._behaviour_forward(post, data)
        loss = total + behaviour
        opts = list(self._main_optimizers().values())
        if self.opt is not None:
            (norm,) = self.accelerator.backward_groups(loss, [(self.opt, None)])
            metrics["train/grad_norm"] = norm
            parts = {"world_model": self.wm, "actor": self.actor, "critic": self.critic}
            for name, module in parts.items():
                metrics[f"train/grad_norm_{name}"] = _grad_norm(module.parameters(), self.device)
        else:
            assert self.wm_opt is not None and self.actor_opt is not None
            assert self.critic_opt is not None
            norms = self.accelerator.backward_groups(
                loss,
                [
                    (self.wm_opt, w.grad_clip),
                    (self.actor_opt, a.actor_grad_clip),
                    (self.critic_opt, a.critic_grad_clip),
                ],
            )
            for name, norm in zip(("world_model", "actor", "critic"), norms):
                metrics[f"train/grad_norm_{name}"] = norm
        for opt in opts:
            self.accelerator.step(opt)
        self._after_world_model_step()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if self.opt is not None:
            metrics["train/lr"] = self.opt.scheduled_lr()
        if self.updates % a.slow_critic_every == 0:
            self._update_slow_critic(a.slow_critic_fraction)
        metrics.update(behaviour_metrics)
        return metrics

    @torch.no_grad()
    def _update_slow_critic(self, fraction: float) -> None:
        # Pair parameters by name, ignoring parametrizations (e.g. sparse masks put ``weight``
        # under ``parametrizations.weight.original``), so the order of the lists cannot drift.
        def canonical(name: str) -> str:
            return name.replace("parametrizations.", "").replace(".original", "")

        fast = {canonical(n): p for n, p in self.critic.named_parameters()}
        slow = {canonical(n): p for n, p in self.slow_critic.named_parameters()}
        names = sorted(slow)
        torch._foreach_lerp_([slow[n] for n in names], [fast[n] for n in names], fraction)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One world-model and one behaviour step; metrics as 0-d device tensors (no host
        sync: the loop reads them once per log interval, see ``agents.base``)."""
        if self.compiled and self.device.type == "cuda":
            # A new iteration of the CUDA-graph replays: the last update's outputs may be reused.
            torch.compiler.cudagraph_mark_step_begin()
        # One accelerator step (ipu-sim: static-signature check, cost estimate, limits).
        if self.context:  # the same inputs every update, stored states or not yet
            batch = self._with_context(batch)
        with self.accelerator.train_step(batch):
            data = self.preprocess(batch)
            if self.joint:
                metrics = self._train_joint(data)
            else:
                post, metrics = self.train_world_model(data)
                metrics.update(self.train_behaviour(post, data))
        self.updates += 1  # (the loop reports train/updates itself)
        # One stacked copy: CUDA-graph replays overwrite their outputs, the loop keeps these.
        keys = list(metrics)
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys])
        return dict(zip(keys, values.unbind(0)))

    def log_metrics(self) -> dict[str, float]:
        """Once per log interval: the sparse masks' statistics and the accelerator's
        ``perf/cuda/*`` (measured) or ``perf/ipu_sim/*`` (estimated) scalars."""
        out = dict(self.sparsifier.metrics()) if self.sparsifier is not None else {}
        out.update(self.accelerator.metrics())
        return out

    # ---------------------------------------------------------------------------------
    # Acting
    # ---------------------------------------------------------------------------------
    def initial_state(self, batch_size: int) -> State:
        with torch.inference_mode():
            state = self.wm.rssm.initial(batch_size, self.device)
            state = {k: v.clone() for k, v in state.items()}
        state["action"] = torch.zeros(batch_size, self.action_dim, device=self.device)
        return state

    @torch.inference_mode()
    def act(
        self, obs: dict[str, np.ndarray], state: State, explore: bool
    ) -> tuple[np.ndarray, State]:
        n = len(obs["is_first"])
        if state is None:
            state = self.initial_state(n)
        with self._cached():
            return self._act(obs, state, explore, n)

    def _act(
        self, obs: dict[str, np.ndarray], state: State, explore: bool, n: int
    ) -> tuple[np.ndarray, State]:
        dev = self.device
        tensors = {k: torch.as_tensor(np.asarray(obs[k]), device=dev) for k in self.obs_shapes}
        embed = self.wm.encoder(preprocess_obs(tensors, self.wm.image_keys))
        keep = 1.0 - torch.as_tensor(np.asarray(obs["is_first"]), device=dev).float()
        rssm = self.wm.rssm
        init = rssm.initial(n, dev)
        action_feat = rssm.action_features(state["action"] * keep[:, None])
        deter, stoch, _ = rssm.obs_step(
            state["deter"], state["stoch"], action_feat, embed, keep, init["deter"], init["stoch"]
        )
        dist = self.actor(rssm.feat({"deter": deter, "stoch": stoch}))
        action = self.actor.action(dist, sample=explore)
        if not self.discrete:
            action = action.clamp(-1.0, 1.0)
        new_state = {"deter": deter, "stoch": stoch, "action": action}
        if self.discrete:
            out = (action.argmax(-1) + self.action_start).cpu().numpy().astype(np.int64)
        else:
            out = action.cpu().numpy().astype(np.float32).reshape(n, *self.action_space.shape)
        return out, new_state

    # ---------------------------------------------------------------------------------
    # Checkpoints and reports
    # ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        weights = {}
        for prefix, module in self._modules().items():
            for key, value in module.state_dict().items():
                weights[f"{prefix}.{key}"] = value.detach().cpu().clone()
        optimizers = {name: opt.state_dict() for name, opt in self._optimizers().items()}
        state = {"weights": weights, "optimizers": optimizers, "updates": self.updates}
        if self.sparsifier is not None:
            # Masks (bool), schedule position, RNG; the weights hold the masked world-model
            # layers as `<layer>.parametrizations.weight.original` and `...weight.0.mask`.
            state["sparse"] = self.sparsifier.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if ("sparse" in state) != (self.sparsifier is not None):
            saved, now = ("true", "false") if "sparse" in state else ("false", "true")
            raise ValueError(
                f"checkpoint was saved with sparse.enabled={saved}, this agent has "
                f"sparse.enabled={now}: load it with the sparse settings it was trained with"
            )
        weights = state["weights"]
        for prefix, module in self._modules().items():
            own = {
                key[len(prefix) + 1 :]: value
                for key, value in weights.items()
                if key.startswith(prefix + ".")
            }
            module.load_state_dict(own, strict=True)
        if self.sparsifier is not None:
            self.sparsifier.load_state_dict(state["sparse"])  # checks the masks, re-arms RigL
        saved = set(state["optimizers"])
        if saved != set(self._optimizers()):
            was = "laprop" if "all" in saved else "adam"
            raise ValueError(
                f"checkpoint was saved with agent.optimizer={was} (optimizers {sorted(saved)}), "
                f"this agent has {sorted(self._optimizers())}: load it with agent.optimizer={was}"
            )
        for name, opt in self._optimizers().items():
            opt.load_state_dict(state["optimizers"][name])
        self.updates = int(state["updates"])

    @torch.no_grad()
    def report(self, batch: dict[str, torch.Tensor], context: int = 5, rows: int = 4) -> dict:
        """Open-loop video per image key: truth | model | error, up to ``rows`` sequences
        stacked vertically, as uint8 ``[T, rows * H, 3 * W, 3]``. ``{}`` without images.

        Factored dynamics add ``world_model/graph``, the ``G x G`` adjacency as a uint8
        ``[H, W, 3]`` image (``FactorGraphLinear.image``)."""
        videos = {}
        if self.wm.rssm.graph is not None:
            videos["world_model/graph"] = self.wm.rssm.graph.image()
        if not self.wm.image_keys or self.wm.decoder is None:
            return videos  # no pixels, or nothing to draw them with (representation=cpc)
        small = {k: v[:rows] for k, v in batch.items()}
        data = self.preprocess(small)
        if data["is_first"].shape[1] <= context:
            return videos
        with self._cached():
            pred = self.wm.open_loop(data, context)
        for key in self.wm.image_keys:
            truth = (data[key] + 0.5).clamp(0, 1)
            model = (pred[key].float() + 0.5).clamp(0, 1)
            error = ((model - truth) + 1.0) / 2.0
            video = torch.cat([truth, model, error], -1)  # [B, T, C, H, 3W]
            B, T, C, H, W3 = video.shape
            video = video.permute(1, 0, 3, 4, 2).reshape(T, B * H, W3, C)
            if C == 1:
                video = video.expand(-1, -1, -1, 3)
            videos[f"world_model/openloop_{key}"] = (
                (video[..., :3] * 255).round().to(torch.uint8).cpu().numpy()
            )
        return videos

    def num_parameters(self) -> dict[str, int]:
        """Trainable parameter counts per part (slow critic excluded)."""
        counts = {
            name: sum(p.numel() for p in module.parameters())
            for name, module in (
                ("world_model", self.wm),
                ("actor", self.actor),
                ("critic", self.critic),
            )
        }
        counts["total"] = sum(counts.values())
        return counts


ENTRY = register_agent(
    AgentEntry(
        name="dreamer",
        make=DreamerAgent,
        agent_fields=dreamer_config.DreamerAgentConfig,
        sections={"world_model": dreamer_config.WorldModelConfig},
        # The main job: a small Dreamer on a short Pendulum run that fits a CPU in minutes.
        presets=("dreamer_tiny", "quickstart"),
        preset_dir=dreamer_config.PRESET_DIR,
        validate=dreamer_config.validate,
        default=True,
    )
)

__all__ = ["DreamerAgent", "planned_updates", "sparse_skip", "world_model_spec"]
