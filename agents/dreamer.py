"""DreamerV3: an RSSM world model learned from replay, an actor-critic learned in its imagination.

A composition of parts: the world model (``worldmodels.WorldModel``, built from
``world_model.*`` by ``dreamer_config.world_model_spec``), the actor-critic
(``worldmodels.actor_critic.ActorCritic``, from ``agent.*``), one optimizer policy
(``runtime.optimizers.OptimizerPolicy``: ``agent.optimizer=adam|laprop``, Greedy InfoMax's
module optimizers) and what every model agent shares (``agents.base.ModelAgent``: accelerator,
sparse masks, checkpoints, the act wrapper).

Each ``update`` does one world-model step on the replayed batch, then one actor and one critic
step on rollouts of ``agent.horizon`` imagined steps from every posterior state (the world
model's weights frozen while the behaviour losses are built). With ``agent.optimizer=laprop``
or ``agent.replay_critic_grad_wm`` the update takes one gradient of all losses and then the
steps (current DreamerV3; the replay value loss may then reach the world model).

Replay context: ``agents.context``; dynamic-sparse masks (``sparse.enabled=true``) follow
each world-model step; representations and Greedy InfoMax: ``worldmodels.dreamer_wm``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from imagine_rl.agents import dreamer_config
from imagine_rl.agents.base import ModelAgent, State
from imagine_rl.agents.context import ReplayContext
from imagine_rl.agents.dreamer_config import SPARSE_SKIP_DEFAULT
from imagine_rl.runtime.config import Config
from imagine_rl.runtime.optimizers import OptimizerPolicy, Part
from imagine_rl.sparse import Sparsifier
from imagine_rl.worldmodels import LayerFactory, WorldModel, one_hot, preprocess_obs
from imagine_rl.worldmodels.actor_critic import ActorCritic, frozen
from imagine_rl.worldmodels.planning import CEMPlanner, ReturnCost

_FLAGS = ("is_first", "is_last", "is_terminal")


class DreamerAgent(ModelAgent):
    """DreamerV3 agent for ``Box`` (in ``[-1, 1]``) or ``Discrete`` actions."""

    def __init__(
        self,
        config: Config,
        obs_space: gym.spaces.Dict,
        action_space: gym.Space,
        planned_updates: int | None = None,
    ) -> None:
        super().__init__(config, planned_updates)
        a, w = config.agent, config.world_model
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
        self.planning = dreamer_config.composition(config)[1] == "planner"
        if self.planning and self.discrete:
            raise ValueError(
                "agent.behaviour=planner plans continuous actions (CEM); this env's actions are "
                f"{action_space}: use agent.behaviour=actor_critic"
            )
        if config.sparse.enabled and w.greedy_infomax.modules:
            raise ValueError(
                "sparse.enabled=true and world_model.greedy_infomax.modules>0 cannot be combined "
                "(the sparse masks follow the world-model optimizer only); turn one off"
            )
        # Build every module with a fixed seed, without disturbing the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.factory = LayerFactory(norm=w.norm, act=w.act)
            spec = dreamer_config.world_model_spec(config, self.planned_updates)
            self.wm = WorldModel(self.obs_shapes, self.action_dim, spec, self.factory)
            self.behaviour: ActorCritic | None = None
            if not self.planning:
                self.behaviour = self.build_actor_critic(
                    self.wm.feat_size, self.action_dim, self.discrete
                )
        self.planner = self._planner() if self.planning else None
        self.context: ReplayContext | None = None
        if getattr(config.replay, "context", 0) > 0:
            self.context = ReplayContext.for_rssm(self.wm.rssm, self.action_dim)
        self.place()
        if config.sparse.enabled:
            self.sparsify(self.wm, self.wm.loss_and_states, self._example(), SPARSE_SKIP_DEFAULT)
        self.sparsify_behaviour()
        self.optimizer_policy = policy = self._optimizer_policy()
        if self.sparsifier is not None:
            self.sparsifier.attach(policy.optimizer_of("world_model"))  # re-mask after a step
        self.attach_behaviour_sparsity()
        # ipu-sim: placement, block-sparse limits and the memory budget are checked here.
        modules = {k: m for k, m in self.modules().items() if k != "return_norm"}
        self.accelerator.prepare(modules, policy.optimizers)
        self.joint = (a.optimizer == "laprop" or a.replay_critic_grad_wm) and not self.planning
        self.loss_scales = dreamer_config.loss_scales(config)
        # agent.compile: the world-model step and the behaviour step each become one graph
        # (forward unrolled over replay.batch_length and agent.horizon, and its backward).
        # Greedy InfoMax (its own optimizer steps inside the encoder's pass) stays eager.
        # Sparse masks compile: masks and the compressed kernel's indices are buffers that a
        # topology step rewrites in place, so no graph is rebuilt; the kernel is one op in the
        # graph (``sparse.kernels``); an update armed for RigL's dense gradient runs eagerly
        # (``_eager_step``).
        self.compiled = self.accelerator.compiling and self.wm.greedy is None
        if self.accelerator.compiling and not self.compiled and a.compile is True:
            raise ValueError(
                "agent.compile=true cannot compile world_model.greedy_infomax.modules>0; set "
                "agent.compile=false (or auto)"
            )
        compile_fn = self.accelerator.compile if self.compiled else (lambda fn, **_: fn)
        self._world_model_losses = compile_fn(self._world_model_losses_impl, fullgraph=True)
        self._behaviour_losses = compile_fn(self._behaviour_losses_impl, fullgraph=True)

    # The actor-critic's modules keep their checkpoint prefixes (actor., critic., ...).
    actor = property(lambda self: self.behaviour.actor)
    critic = property(lambda self: self.behaviour.critic)
    slow_critic = property(lambda self: self.behaviour.slow_critic)

    def _planner(self) -> CEMPlanner:
        """CEM on predicted return (PlaNet-like; ``planner.*``), on mean predictions, sampling
        from the agent's generator (saved in checkpoints)."""
        p = self.config.planner
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.config.seed + 1)
        cost = ReturnCost(discount=self.config.agent.discount, use_continue=True)
        return CEMPlanner(
            self.wm,
            cost,
            p.horizon,
            p.population,
            p.elites,
            p.iterations,
            p.std,
            p.min_std,
            warm_start=p.warm_start,
            generator=self.generator,
            rollout_kwargs={"sample": False},
        )

    def _optimizer_policy(self) -> OptimizerPolicy:
        """adam: one Adam per part (world model, actor, critic); laprop: one LaProp over all
        of them; Greedy InfoMax: one Adam per encoder module, the world model's own optimizer
        getting every other parameter."""
        a, w = self.config.agent, self.config.world_model
        greedy, greedy_ids = [], set()
        if self.wm.greedy is not None:
            lr = w.greedy_infomax.lr if w.greedy_infomax.lr is not None else w.lr
            for i in range(self.wm.greedy.num_modules):
                params = self.wm.greedy.module_parameters(i)
                greedy_ids |= {id(p) for p in params}
                greedy.append(Part(params, lr, w.eps, w.grad_clip))
        wm_params = [p for p in self.wm.parameters() if id(p) not in greedy_ids]
        parts = {"world_model": Part(wm_params, w.lr, w.eps, w.grad_clip)}
        parts.update(self.actor_critic_parts())
        laprop = dict(lr=a.lr, agc=a.agc, beta1=a.beta1, beta2=a.beta2, eps=a.opt_eps)
        laprop["warmup"] = a.warmup
        return OptimizerPolicy(self.accelerator, parts, a.optimizer, laprop, greedy)

    def _example(self) -> dict[str, torch.Tensor]:
        """A zero ``[1, replay.batch_length]`` batch, preprocessed (the sparse FLOP count)."""
        T = self.config.replay.batch_length
        batch = {k: torch.zeros(1, T, *shape) for k, shape in self.obs_shapes.items()}
        if self.discrete:
            batch["action"] = torch.full((1, T), self.action_start, dtype=torch.long)
        else:
            batch["action"] = torch.zeros(1, T, *self.action_space.shape)
        batch["reward"] = torch.zeros(1, T)
        batch.update({flag: torch.zeros(1, T) for flag in _FLAGS})
        batch["is_first"][:, 0] = 1
        return self.preprocess(batch)

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
        """Replay batch ``[B, T, ...]`` -> device tensors the world model consumes (with
        ``replay.context`` also ``context_valid`` ``[B]`` and ``context/<key>`` ``[B, ...]``).
        ``replay_index`` and other extra keys never reach the model."""
        dev = self.device
        data = preprocess_obs(
            {k: batch[k].to(dev, non_blocking=True) for k in self.obs_shapes}, self.wm.image_keys
        )
        data["action"] = self._encode_action(batch["action"].to(dev, non_blocking=True))
        for key in _FLAGS + ("reward",):
            data[key] = batch[key].to(dev, non_blocking=True).float()
        if self.context is not None:
            data.update(self.context.inputs(batch, dev))
        return data

    # ---------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------
    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One world-model and one behaviour step; metrics as 0-d device tensors (no host
        sync: the loop reads them once per log interval, see ``agents.base``)."""
        if self.compiled and self.device.type == "cuda":
            # A new iteration of the CUDA-graph replays: the last update's outputs may be reused.
            torch.compiler.cudagraph_mark_step_begin()
        if self.context is not None:  # the same inputs every update, stored states or not yet
            batch = self.context.complete(batch)
        # One accelerator step (ipu-sim: static-signature check, cost estimate, limits).
        with self.accelerator.train_step(batch):
            data = self.preprocess(batch)
            if self.joint:  # one gradient of all losses, the behaviour on the unstepped model
                total, metrics, post = self._world_model_forward(data)
                behaviour, behaviour_metrics = self._behaviour_forward(post, data)
                parts = ["world_model", "actor", "critic"]
                after = self._after_world_model_step
                metrics.update(self.optimizer_policy.step(total + behaviour, parts, after))
                self.step_behaviour_sparsity()
                self.behaviour.update_slow_critic(self.updates)
                metrics.update(behaviour_metrics)
            else:
                post, metrics = self.train_world_model(data)
                if self.behaviour is not None:  # a planner learns nothing beside the model
                    metrics.update(self.train_behaviour(post, data))
        self.updates += 1  # (the loop reports train/updates itself)
        # One stacked copy: CUDA-graph replays overwrite their outputs, the loop keeps these.
        keys = list(metrics)
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys])
        return dict(zip(keys, values.unbind(0)))

    def train_world_model(self, data: dict[str, torch.Tensor]) -> tuple[State, dict]:
        """One world-model step (adam, separate steps): ``(detached posteriors, metrics)``."""
        if self.joint:
            raise RuntimeError("agent.optimizer=laprop or replay_critic_grad_wm: use update")
        total, metrics, post = self._world_model_forward(data)
        after = self._after_world_model_step
        metrics.update(self.optimizer_policy.step(total, ["world_model"], after))
        return post, metrics

    def train_behaviour(self, post: State, data: dict[str, torch.Tensor]) -> dict:
        """One actor and one critic step on imagination from every posterior state."""
        loss, metrics = self._behaviour_forward(post, data)
        metrics.update(self.optimizer_policy.step(loss, ["actor", "critic"]))
        self.step_behaviour_sparsity()
        self.behaviour.update_slow_critic(self.updates)
        return metrics

    def _after_world_model_step(self) -> None:
        """Sparse masks and the factored graph follow each step of the world model."""
        opt = self.optimizer_policy.optimizer_of("world_model")
        if self.sparsifier is not None:
            self.sparsifier.step(opt)  # re-mask, scheduled drop/regrow, RigL arming
        graph = self.wm.rssm.graph
        if graph is not None:  # factored dynamics: absent edges stay zero, scheduled rewiring
            graph.step(opt)

    def _world_model_forward(
        self, data: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], State]:
        """Greedy InfoMax's module steps (if any), then the world-model losses with the parts'
        gradients cleared: ``(total loss, metrics, post)``; ``post`` holds ``deter``/``stoch``
        ``[B, T, ...]``, detached unless ``agent.replay_critic_grad_wm``."""
        embed, greedy_metrics = None, {}
        if self.wm.greedy is not None:
            with self.accelerator.autocast():
                embed, greedy_metrics = self.wm.greedy.train_step(
                    self.wm.obs(data),
                    data["action"],
                    data["is_first"],
                    [opt for opt, _ in self.optimizer_policy.greedy],
                    update=self.optimizer_policy.greedy_step,
                )
        self.optimizer_policy.zero_grad()
        if embed is None and not self._eager_step(self.sparsifier):
            total, losses, metrics, post = self._world_model_losses(data)
        else:
            total, losses, metrics, post = self._world_model_losses_impl(data, embed)
        metrics = {**metrics, **{k: v.detach() for k, v in losses.items()}}
        metrics.update({f"world_model/{k}": v for k, v in greedy_metrics.items()})
        metrics["loss/world_model"] = total.detach()
        if self.context is not None:  # CUDA-graph outputs get reused: keep copies there
            clone = self.compiled and self.device.type == "cuda"
            self.context.keep(post, data["action"], clone=clone)
        return total, metrics, post

    def replay_latents(self) -> dict[str, torch.Tensor] | None:
        """The last update's ``deter``, ``stoch`` and ``action``, each float32 ``[B, T, ...]``
        (``replay.context``; see ``agents.base``), else None."""
        return self.context.latents if self.context is not None else None

    def _world_model_losses_impl(
        self, data: dict[str, torch.Tensor], embed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict, dict, State]:
        """The world-model forward over the batch: ``(total, losses, metrics, post)``, observed
        from the replay context's start states. One graph under ``agent.compile``."""
        with self.accelerator.autocast(), self.cached():
            start = self.context.start_state(data) if self.context is not None else None
            losses, metrics, post = self.wm.loss_and_states(data, start, embed=embed)
        total = sum(self.loss_scales[k] * losses[k] for k in losses)
        post = {k: post[k] for k in ("deter", "stoch")}
        if not self.config.agent.replay_critic_grad_wm:
            post = {k: v.detach() for k, v in post.items()}
        return total, losses, metrics, post

    def _behaviour_forward(
        self, post: State, data: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed actor-critic loss terms and their metrics. The world model's weights get
        no gradient from the imagination (frozen while the graph is built); only the replay
        value loss reaches them, through ``post``, with ``agent.replay_critic_grad_wm``."""
        pick = None
        starts = data["is_terminal"].numel()
        if 0 < self.config.agent.imagine_starts < starts:
            pick = torch.randperm(starts, device=self.device)[: self.config.agent.imagine_starts]
        eager = self._eager_step(self.behaviour_sparsifier)
        losses = self._behaviour_losses_impl if eager else self._behaviour_losses
        with frozen(self.wm):  # its masks' arming is not read (no weight needs a gradient)
            return losses(post, data, pick)

    def _eager_step(self, sparsifier: Sparsifier | None) -> bool:
        """Whether a compiled step runs eagerly this time: its masks are armed for RigL's
        dense-gradient capture (one step in ``sparse.update_every``)."""
        return self.compiled and sparsifier is not None and sparsifier.armed

    def _behaviour_losses_impl(
        self, post: State, data: dict[str, torch.Tensor], pick: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One graph under ``agent.compile``: the actor-critic's terms, summed."""
        with self.accelerator.autocast(), self.cached():
            terms, metrics = self.behaviour.loss(self.wm, post, data, pick)
        return sum(terms.values()), metrics

    # ---------------------------------------------------------------------------------
    # Acting
    # ---------------------------------------------------------------------------------
    def initial_state(self, batch_size: int) -> State:
        with torch.inference_mode():
            state = self.wm.rssm.initial(batch_size, self.device)
            state = {k: v.clone() for k, v in state.items()}
        state["action"] = torch.zeros(batch_size, self.action_dim, device=self.device)
        if self.planning:  # the last plan (the next step's warm start); zeros where none
            horizon = self.config.planner.horizon
            state["plan"] = torch.zeros(batch_size, horizon, self.action_dim, device=self.device)
        return state

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
        new_state = {"deter": deter, "stoch": stoch}
        if self.planner is not None:
            plan = self.planner.plan(new_state, state["plan"] * keep[:, None, None])
            action = plan[:, 0]
            if explore:
                noise = torch.randn(action.shape, generator=self.generator, device=dev)
                action = (action + self.config.planner.explore_noise * noise).clamp(-1.0, 1.0)
            new_state["plan"] = plan
        else:
            action = self.behaviour.act(rssm.feat(new_state), explore)
        new_state["action"] = action
        if self.discrete:
            out = (action.argmax(-1) + self.action_start).cpu().numpy().astype(np.int64)
        else:
            out = action.cpu().numpy().astype(np.float32).reshape(n, *self.action_space.shape)
        return out, new_state

    # ---------------------------------------------------------------------------------
    # Reports
    # ---------------------------------------------------------------------------------
    @torch.no_grad()
    def report(self, batch: dict[str, torch.Tensor], context: int = 5, rows: int = 4) -> dict:
        """Open-loop videos per image key and the factored graph (``WorldModel.videos``)."""
        data = self.preprocess({k: v[:rows] for k, v in batch.items()})
        with self.cached():
            return self.wm.videos(data, context)


__all__ = ["DreamerAgent"]
