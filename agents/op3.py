"""OP3-like object-centric agent: a slot world model and model-predictive control toward a goal.

``update`` trains the slot world model (``worldmodels.slots.SlotWorldModel``) on replayed
sequences. ``act`` infers the slots of each frame (``op3.inference=fresh``: from the frame
alone; ``filter``: the dynamics' prediction from the last slots and action, refined by slot
attention on the new frame) and plans with the cross-entropy
method (CEM, ``worldmodels.planning.CEMPlanner``) over action sequences of ``op3.horizon``
steps, replanning every step: a candidate costs the distance between the slots it is predicted
to reach and the slots of the goal image after Hungarian matching (``planning.GoalCost``,
``worldmodels.slot_metrics.matched_slot_distance``). The env must provide the goal image
(observation key ``goal``, ``env.goal_obs=true``).

Exploration (``explore=True``): uniformly random actions until the first update (the random
interactions the model first learns from), then the plan plus Gaussian noise, or with
probability ``op3.epsilon`` a random action. Evaluation (``explore=False``) executes the plan.

Dynamic-sparse slot world model (``sparse.enabled=true``), as the Dreamer's: after the model
is built, its linear/conv layers (all built by the ``LayerFactory``, named ``op3.*``; minus
``sparse.skip``, by default ``op3_config.SPARSE_SKIP_DEFAULT``) get masks from the ``sparse``
library; the ``Sparsifier`` follows the optimizer's steps (topology updates every
``sparse.update_every`` updates, ``total_steps`` = ``runtime.loop.planned_updates``), its
metrics come with ``log_metrics()`` and its state is saved under ``state_dict()["sparse"]``.

Contrastive slot dynamics (``op3.representation=reconstruction+cpc|cpc``; see
``worldmodels/slots.py``): ``loss/cpc`` weighted by ``op3.cpc_scale``;
``worldmodels.slot_metrics.ranking_metrics`` gives C-SWM's Hits@1 and MRR of predicted slots
(``scripts/dev/op3_checks.py check=hits``).

Config: ``op3.*`` (``agents.op3_config.OP3Config``); presets ``op3`` (CPU sizes) and ``debug``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from imagine_rl.agents import op3_config
from imagine_rl.agents.base import ModelAgent, State
from imagine_rl.agents.dreamer_config import composition
from imagine_rl.runtime.config import Config
from imagine_rl.runtime.optimizers import OptimizerPolicy, Part
from imagine_rl.worldmodels.actor_critic import ActorCritic, frozen
from imagine_rl.worldmodels.layers import LayerFactory
from imagine_rl.worldmodels.planning import CEMPlanner, GoalCost
from imagine_rl.worldmodels.slots import SlotSpec, SlotWorldModel

# World-model parts built only under some settings: the loss/cpc projections
# (op3.representation=...cpc), and the reward and continue heads and the goal pairs' pooling
# (agent.behaviour=actor_critic). A run started from weights without them (init=) builds them
# fresh.
OPTIONAL_PARTS = ("cpc.", "reward_head.", "continue_head.", "goal_attention.")


def slot_spec(config: Config) -> SlotSpec:
    """The slot world model described by ``config.op3`` (whose architecture keys are
    ``SlotSpec``'s fields); an actor-critic on it (``agent.behaviour=actor_critic``) needs the
    reward and continue heads and the goal's slots in the features."""
    spec = SlotSpec(**{f.name: getattr(config.op3, f.name) for f in dataclasses.fields(SlotSpec)})
    if composition(config)[1] == "actor_critic":
        spec = dataclasses.replace(spec, heads=True, goal_features=True)
    return spec


# ------------------------------------------------------------------------------------------
# The agent
# ------------------------------------------------------------------------------------------


class OP3Agent(ModelAgent):
    """Slot world model + CEM planning to the goal image; ``Box`` actions in ``[-1, 1]``."""

    def __init__(
        self,
        config: Config,
        obs_space: gym.spaces.Dict,
        action_space: gym.Space,
        planned_updates: int | None = None,
    ) -> None:
        if not isinstance(action_space, gym.spaces.Box):
            raise TypeError(f"agent=op3 needs continuous (Box) actions, got {action_space}")
        spaces = obs_space.spaces
        if "pixels" not in spaces:
            raise ValueError(
                f"agent=op3 plans from pixels but the env observes {sorted(spaces)}: set "
                "env.obs=pixels"
            )
        if "goal" not in spaces:
            raise ValueError(
                "agent=op3 plans toward the goal image but the env has no 'goal' observation: "
                "set env.goal_obs=true (blocks: tasks)"
            )
        if spaces["goal"].shape != spaces["pixels"].shape:
            raise ValueError(
                f"agent=op3: goal image {spaces['goal'].shape} and pixels "
                f"{spaces['pixels'].shape} must have the same shape"
            )
        o = config.op3
        dynamics_losses = o.dynamics_scale > 0
        dynamics_losses |= o.prediction_scale > 0 and o.representation != "cpc"
        dynamics_losses |= o.cpc_scale > 0 and o.representation != "reconstruction"
        if o.freeze_perception and not dynamics_losses:
            raise ValueError(
                "agent=op3: op3.freeze_perception=true trains only the dynamics, but "
                "op3.dynamics_scale and op3.prediction_scale are both 0 (and there is no "
                "loss/cpc with a weight above 0): set one of them > 0"
            )
        # agent.compile=auto compiles the planning cost on cuda only (not by run length).
        super().__init__(config, planned_updates, compile_by_length=False)
        # The actor-critic learns in imagination: with no loss on the dynamics (the perception
        # stage, preset op3_perception) the rollouts it would learn from are untrained, so it
        # waits (a later stage starts it from its initial weights, not from noise fitted there).
        self.dynamics_trained = dynamics_losses
        self.action_space = action_space
        self.action_shape = tuple(action_space.shape)
        self.action_dim = int(np.prod(self.action_shape))
        self.image_shape = tuple(spaces["pixels"].shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.factory = LayerFactory(norm="layer", act="relu")
            self.wm = SlotWorldModel(
                self.image_shape, self.action_dim, slot_spec(config), self.factory
            )
            # SOLD-like: Dreamer's actor-critic on the slots and the goal's slots.
            self.behaviour: ActorCritic | None = None
            if composition(config)[1] == "actor_critic":
                self.behaviour = self.build_actor_critic(self.wm.feat_size, self.action_dim, False)
        self.place()
        if config.sparse.enabled:
            predict = o.prediction_scale > 0
            self.sparsify(
                self.wm,
                lambda data: self.wm.loss_and_states(data, predict_pixels=predict),
                self._example(),
                op3_config.SPARSE_SKIP_DEFAULT,
            )
        self.sparsify_behaviour()
        if o.freeze_perception:
            # Frozen weights build no autograd graph: inference and decoding of the posterior
            # run forward only, and Adam skips them (their gradients stay None).
            # The reward and continue heads (op3.heads, with the goal pairs' pooling scores)
            # predict from the slots, as the dynamics does: they train on the frozen
            # perception too.
            trained = ("dynamics.", *OPTIONAL_PARTS)
            for name, parameter in self.wm.named_parameters():
                if not name.startswith(trained):
                    parameter.requires_grad_(False)
        parts = {"world_model": Part(list(self.wm.parameters()), o.lr, 1e-8, o.grad_clip)}
        parts.update(self.actor_critic_parts())
        self.optimizer_policy = OptimizerPolicy(self.accelerator, parts)
        self.opt = self.optimizer_policy.optimizer_of("world_model")
        if self.sparsifier is not None:
            self.sparsifier.attach(self.opt)  # re-mask after every step
        self.attach_behaviour_sparsity()
        modules = {k: m for k, m in self.modules().items() if k != "return_norm"}
        self.accelerator.prepare(modules, self.optimizer_policy.optimizers)
        self.scales = {
            "loss/reconstruction": o.reconstruction_scale,
            "loss/prediction": o.prediction_scale,
            "loss/dynamics": o.dynamics_scale,
            "loss/cpc": o.cpc_scale,  # with op3.representation=reconstruction+cpc or cpc
            "loss/reward": o.reward_scale,  # with op3.heads
            "loss/continue": o.continue_scale,  # with op3.heads
        }
        # Exploration and planning noise: the agent's own streams, saved in checkpoints.
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed + 1)
        # CEM toward the goal image's slots (worldmodels.planning). The planning cost (a
        # batched open-loop rollout, distances and the on-device slot matching: no host sync)
        # is one compiled graph under agent.compile (auto: on cuda); sparse masks
        # (parametrizations) stay eager, as in the Dreamer.
        compiling = self.accelerator.compiling and self.sparsifier is None
        self.goal_cost = GoalCost(
            slot_dim=self.wm.spec.slot_dim,
            position_weight=o.position_weight,
            keep_scale=o.keep_scale,
            keep_radius=o.keep_radius,
        )
        self.planner = CEMPlanner(
            self.wm,
            self.goal_cost,
            horizon=o.horizon,
            population=o.cem_population,
            elites=o.cem_elites,
            iterations=o.cem_iterations,
            std=o.cem_std,
            warm_start=o.cem_warm_start,
            generator=self.generator,
            compile=self.accelerator.compile if compiling else None,
        )

    def _example(self) -> dict[str, torch.Tensor]:
        """A zero ``[1, replay.batch_length]`` batch, preprocessed (the sparse FLOP count)."""
        T = self.config.replay.batch_length
        batch = {
            "pixels": torch.zeros(1, T, *self.image_shape, dtype=torch.uint8),
            "action": torch.zeros(1, T, self.action_dim),
            "is_first": torch.zeros(1, T),
            "reward": torch.zeros(1, T),
            "is_terminal": torch.zeros(1, T),
            "is_last": torch.zeros(1, T),
            "goal": torch.zeros(1, T, *self.image_shape, dtype=torch.uint8),
        }
        batch["is_first"][:, 0] = 1
        return self.preprocess(batch)

    # ---------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------
    def _pixels(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 frames ``[..., 3, H, W]`` -> floats in ``[-0.5, 0.5]`` on the device."""
        tensor = torch.as_tensor(np.asarray(pixels) if not torch.is_tensor(pixels) else pixels)
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.float() / 255.0 - 0.5 if not tensor.is_floating_point() else tensor

    def preprocess(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Replay batch ``[B, T, ...]`` -> the world model's inputs (with ``op3.heads`` also
        ``reward`` and ``is_terminal``, with ``op3.goal_features`` the ``goal`` frames)."""
        B, T = batch["is_first"].shape[:2]
        data = {
            "pixels": self._pixels(batch["pixels"]),
            "action": batch["action"].to(self.device).float().reshape(B, T, self.action_dim),
            "is_first": batch["is_first"].to(self.device).float(),
        }
        spec = self.wm.spec
        if spec.heads:
            # is_last: the actor-critic's replay value loss weighs it out (agent.behaviour).
            flags = ("is_last",) if self.behaviour is not None else ()
            for key in ("reward", "is_terminal", *flags):
                data[key] = batch[key].to(self.device).float().reshape(B, T)
        if spec.goal_features:
            data["goal"] = self._pixels(batch["goal"])
        return data

    def _after_step(self) -> None:
        if self.sparsifier is not None:
            self.sparsifier.step(self.opt)  # re-mask, scheduled drop/regrow, RigL arming

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        o = self.config.op3
        lr = o.lr * min(1.0, (self.updates + 1) / max(1, o.warmup))
        for group in self.opt.param_groups:
            group["lr"] = lr
        with self.accelerator.train_step(batch):
            data = self.preprocess(batch)
            self.optimizer_policy.zero_grad()
            with self.accelerator.autocast(), self.cached():
                losses, metrics, post = self.wm.loss_and_states(
                    data, predict_pixels=o.prediction_scale > 0
                )
            total = sum(self.scales[k] * v for k, v in losses.items())
            step = self.optimizer_policy.step(total, ["world_model"], self._after_step)
            if self.behaviour is not None and self.dynamics_trained:
                # Imagination from every posterior (slots, goal).
                post = {k: v.detach() for k, v in post.items()}
                with frozen(self.wm), self.accelerator.autocast(), self.cached():
                    terms, behaviour_metrics = self.behaviour.loss(self.wm, post, data)
                step.update(self.optimizer_policy.step(sum(terms.values()), ["actor", "critic"]))
                self.step_behaviour_sparsity()
                self.behaviour.update_slow_critic(self.updates)
                metrics = {**metrics, **behaviour_metrics}
        self.updates += 1
        out = {**losses, **metrics, "loss/world_model": total, **step}
        # Device tensors, read by the loop once per log interval (agents.base).
        result: dict[str, torch.Tensor | float] = {k: v.detach() for k, v in out.items()}
        result["train/lr"] = lr
        return result

    # ---------------------------------------------------------------------------------
    # Acting
    # ---------------------------------------------------------------------------------
    def initial_state(self, batch_size: int) -> State:
        K, S = self.wm.num_slots, self.wm.state_dim
        return {
            "slots": torch.zeros(batch_size, K, S, device=self.device),
            "goal": torch.zeros(batch_size, K, S, device=self.device),
            "action": torch.zeros(batch_size, self.action_dim, device=self.device),
            # The last CEM plan (the next step's warm start); zeros where there is none.
            "plan": torch.zeros(
                batch_size, self.config.op3.horizon, self.action_dim, device=self.device
            ),
            # 0 until the slots were inferred (random actions skip inference).
            "valid": torch.zeros(batch_size, device=self.device),
        }

    def _random_actions(self, n: int) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, size=(n, self.action_dim)).astype(np.float32)

    def _act(
        self, obs: dict[str, np.ndarray], state: State, explore: bool, n: int
    ) -> tuple[np.ndarray, State]:
        first = torch.as_tensor(np.asarray(obs["is_first"]), device=self.device).float()
        if explore and (self.updates == 0 or self.config.op3.epsilon >= 1):
            # Random interactions until the model has learned anything, or throughout with
            # epsilon = 1 (perception pretraining, preset op3_perception): no inference needed.
            action = self._random_actions(n)
            valid = torch.zeros(n, device=self.device)
            return self._out(action), {**state, "valid": valid}
        fresh = torch.maximum(first, 1.0 - state["valid"])  # no usable slots to predict from
        slots = self.filter(obs["pixels"], state["slots"], state["action"], fresh)
        goal = state["goal"]
        if bool(fresh.any()):  # the goal image is constant within an episode: infer it once
            inferred = self.wm.infer(self._pixels(obs["goal"]))
            goal = torch.where(fresh[:, None, None] > 0, inferred, goal)
        plan = state["plan"]
        if self.behaviour is not None:  # the actor on the slots and the goal's slots
            feat = self.wm.feat({"slots": slots, "goal": goal})
            action = self.behaviour.act(feat, explore).cpu().numpy().astype(np.float32)
        else:
            previous = plan * (1.0 - fresh)[:, None, None]  # no warm start across episodes
            plan = self.plan(slots, goal, previous)  # [n, H, A]
            action = plan[:, 0].cpu().numpy().astype(np.float32)
        if explore and self.behaviour is None:
            o = self.config.op3
            action = np.clip(action + o.explore_noise * self.rng.normal(size=action.shape), -1, 1)
            random = self.rng.random(n) < o.epsilon
            action[random] = self._random_actions(int(random.sum()))
            action = action.astype(np.float32)
        new_state = {
            "slots": slots,
            "goal": goal,
            "action": torch.as_tensor(action, device=self.device),
            "plan": plan,
            "valid": torch.ones(n, device=self.device),
        }
        return self._out(action), new_state

    def _out(self, action: np.ndarray) -> np.ndarray:
        return action.reshape(len(action), *self.action_shape)

    def filter(
        self,
        pixels: np.ndarray | torch.Tensor,
        slots: torch.Tensor,
        action: torch.Tensor,
        fresh: torch.Tensor,
    ) -> torch.Tensor:
        """Posterior slots ``[N, K, S]`` of frames ``[N, 3, H, W]``: with ``inference=fresh``
        from the frame alone; with ``filter`` refined from the dynamics' prediction (last slots
        and the action taken since), or from fresh starting slots where ``fresh [N]`` is 1 (a
        new episode)."""
        if self.wm.spec.inference == "fresh":
            return self.wm.infer(self._pixels(pixels))
        tokens, colours = self.wm.encode(self._pixels(pixels))
        predicted = self.wm.transition(slots, action)
        keep = (1.0 - fresh)[:, None, None]
        init = keep * predicted + (1.0 - keep) * self.wm.initial(tokens, colours)
        return self.wm.refine(tokens, init)[0]

    def placed_slots(self, slots: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """``[N, K]``: 1 where slot k of ``slots [N, K, S]`` has its centre within
        ``op3.keep_radius`` of the goal slot it is matched to (``GoalCost.placed_slots``)."""
        return self.goal_cost.placed_slots(slots, goal)

    def plan(
        self, slots: torch.Tensor, goal: torch.Tensor, previous: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The CEM plan ``[N, H, A]`` from slots ``[N, K, S]`` toward goal slots ``[N, K, S]``
        (``worldmodels.planning.CEMPlanner`` with ``GoalCost``).

        With ``op3.cem_warm_start`` and the last step's plan ``previous [N, H, A]`` (zeros
        where there is none), the sampling mean starts from it shifted by one action, the new
        last action 0 (TD-MPC2's warm start). Every sample, score and refit stays on the
        device: nothing is read back until the caller takes the action."""
        return self.planner.plan({"slots": slots, "goal": goal}, previous)

    # ---------------------------------------------------------------------------------
    # Segmentation (evaluation)
    # ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def segment(self, pixels: np.ndarray, chunk: int = 64) -> np.ndarray:
        """Masks of single frames: uint8 ``[N, 3, H, W]`` -> float32 ``[N, C, H, W]`` over the
        ``C = wm.num_components`` mixture components (background layer first, then the slots;
        they sum to one; ``argmax`` over C segments the frame)."""
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != self.image_shape:
            raise ValueError(
                f"segment: expected frames [N, {', '.join(map(str, self.image_shape))}], got "
                f"{pixels.shape}"
            )
        with self.cached():
            out = [
                self.wm.segment(self._pixels(pixels[i : i + chunk])).float().cpu().numpy()
                for i in range(0, len(pixels), chunk)
            ]
        return np.concatenate(out, 0)

    # ---------------------------------------------------------------------------------
    # Checkpoints and reports
    # ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The exploration stream (the planning generator is saved by ModelAgent).
        state = super().state_dict()
        state["rng"] = self.rng.bit_generator.state
        return state

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        prefix = "world_model."
        own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        self.check_sparse(any(".parametrizations." in k for k in own), "weights were")
        # Some parts exist only under some settings (OPTIONAL_PARTS): weights from a model
        # without them (e.g. a reconstruction perception of the planner composition, `init=`)
        # keep this model's fresh ones, and theirs are dropped where this model has none.
        mine = self.wm.state_dict()
        own = {k: v for k, v in own.items() if k in mine or not k.startswith(OPTIONAL_PARTS)}
        own.update({k: v for k, v in mine.items() if k.startswith(OPTIONAL_PARTS) and k not in own})
        self.wm.load_state_dict(own, strict=True)
        if self.sparsifier is not None:
            # The masks came with the weights (buffers): check their counts against this
            # run's budget and re-mask, keeping this agent's schedule position and RNG.
            self.sparsifier.load_state_dict(self.sparsifier.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_sparse("sparse" in state)
        self.check_behaviour_sparsity(state)
        self.load_weights(state["weights"])
        self.load_modules(state["weights"], skip=("world_model",))  # the actor-critic's
        if self.sparsifier is not None:
            self.sparsifier.load_state_dict(state["sparse"])  # checks the masks, re-arms RigL
        self.load_behaviour_sparsity(state)
        self.optimizer_policy.load_state_dict(state["optimizers"])
        self.updates = int(state["updates"])
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])

    @torch.no_grad()
    def report(self, batch: dict[str, torch.Tensor], rows: int = 4) -> dict[str, np.ndarray]:
        """``world_model/slots``: for ``rows`` replayed frames, the frame, its reconstruction
        and each mixture component's masked RGB (background first, then the slots) side by
        side, as a uint8 image ``[rows * h, (C + 2) * w, 3]`` at the model's resolution."""
        pixels = self._pixels(batch["pixels"][:rows, 0])
        with self.cached():
            decoded = self.wm.decode(self.wm.infer(pixels))
        truth = self.wm.resize(pixels)
        parts = [truth, decoded["image"]] + [
            decoded["masks"][:, k] * decoded["rgb"][:, k] for k in range(self.wm.num_components)
        ]
        image = torch.cat(parts, -1)  # [rows, 3, h, (K + 2) w]
        image = ((image + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return {"world_model/slots": image.permute(0, 2, 3, 1).flatten(0, 1).cpu().numpy()}


__all__ = ["OP3Agent", "slot_spec"]
