"""OP3-like object-centric agent: a slot world model and model-predictive control toward a goal.

``update`` trains the slot world model (``worldmodels.slots.SlotWorldModel``) on replayed
sequences. ``act`` infers the slots of each frame (``op3.inference=fresh``: from the frame
alone; ``filter``: the dynamics' prediction from the last slots and action, refined by slot
attention on the new frame) and plans with the cross-entropy
method (CEM) over action sequences of ``op3.horizon`` steps, replanning every step: a candidate
costs the distance between the slots it is predicted to reach and the slots of the goal image
after Hungarian matching (``matched_slot_distance``). The env must provide the goal image
(observation key ``goal``, ``env.goal_obs=true``).

Exploration (``explore=True``): uniformly random actions until the first update (the random
interactions the model first learns from), then the plan plus Gaussian noise, or with
probability ``op3.epsilon`` a random action. Evaluation (``explore=False``) executes the plan.

Dynamic-sparse slot world model (``sparse.enabled=true``), as the Dreamer's: after the model
is built, its linear/conv layers (all built by the ``LayerFactory``, named ``op3.*``; minus
``sparse.skip``, by default ``op3_config.SPARSE_SKIP_DEFAULT``) get masks from the ``sparse``
library; the ``Sparsifier`` follows the optimizer's steps (topology updates every
``sparse.update_every`` updates, ``total_steps`` = ``agents.dreamer.planned_updates``), its
metrics come with ``log_metrics()`` and its state is saved under ``state_dict()["sparse"]``.

Contrastive slot dynamics (``op3.representation=reconstruction+cpc|cpc``; see
``worldmodels/slots.py``): ``loss/cpc`` weighted by ``op3.cpc_scale``; ``ranking_metrics``
gives C-SWM's Hits@1 and MRR of predicted slots (``scripts/dev/op3_checks.py check=hits``).

Config: ``op3.*`` (``agents.op3_config.OP3Config``); presets ``op3`` (CPU sizes) and ``debug``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from imagine_rl import sparse
from imagine_rl.agents import op3_config
from imagine_rl.agents.base import Agent, State
from imagine_rl.agents.dreamer import planned_updates, sparse_skip
from imagine_rl.agents.sparsity import cached_masks, sparsify_model
from imagine_rl.runtime.accelerator import make_accelerator
from imagine_rl.runtime.config import Config
from imagine_rl.runtime.registry import AgentEntry, register_agent
from imagine_rl.worldmodels.layers import LayerFactory
from imagine_rl.worldmodels.slots import SlotSpec, SlotWorldModel, hungarian_order

# ------------------------------------------------------------------------------------------
# Planning pieces (used by the agent and by scripts/dev/op3_checks.py)
# ------------------------------------------------------------------------------------------


def slot_distances(
    pred: torch.Tensor,
    goal: torch.Tensor,
    slot_dim: int | None = None,
    position_weight: float = 0.0,
) -> torch.Tensor:
    """Pairwise distances ``[..., K, K]`` between slots ``pred [..., K, S]`` and ``goal [...,
    K, S]`` (broadcast over the leading dims). Plain Euclidean without ``slot_dim``; with it,
    ``|features| / sqrt(slot_dim) + position_weight * |position|`` where a slot is
    ``slot_dim`` features followed by its ``(y, x, ...)`` frame."""
    pred, goal = torch.broadcast_tensors(pred, goal)
    if slot_dim is None:
        return torch.cdist(pred.float(), goal.float())
    features = torch.cdist(pred[..., :slot_dim].float(), goal[..., :slot_dim].float())
    position = torch.cdist(
        pred[..., slot_dim : slot_dim + 2].float(), goal[..., slot_dim : slot_dim + 2].float()
    )
    return features / slot_dim**0.5 + position_weight * position


def hungarian_cost(costs: torch.Tensor) -> torch.Tensor:
    """Minimum total cost of a one-to-one matching for each ``[K, K]`` matrix of ``costs
    [..., K, K]`` (``worldmodels.slots.hungarian_order``): ``[...]``."""
    order = hungarian_order(costs)
    return costs.detach().float().gather(-1, order[..., None])[..., 0].sum(-1)


def matched_slot_distance(
    pred: torch.Tensor,
    goal: torch.Tensor,
    slot_dim: int | None = None,
    position_weight: float = 0.0,
) -> torch.Tensor:
    """Distance between two sets of slots, ``pred [..., K, S]`` and ``goal [..., K, S]``: the
    sum of ``slot_distances`` over the Hungarian matching of the slots. Invariant to the order
    of the slots in either set. Shapes: -> ``[...]``."""
    return hungarian_cost(slot_distances(pred, goal, slot_dim, position_weight))


def squared_slot_distances(pred: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``[..., K, K]`` between whole slot states ``pred
    [..., K, S]`` and ``goal [..., K, S]``: summed over a matching, C-SWM's latent distance."""
    pred, goal = torch.broadcast_tensors(pred, goal)
    return torch.cdist(pred.float(), goal.float()).square()


def ranking_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    distances: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = squared_slot_distances,
    chunk: int = 256,
) -> dict[str, Any]:
    """C-SWM's ranking measures (Kipf et al. 2020) of predictions ``pred [N, K, S]`` against
    the encoded true states ``target [N, K, S]``: prediction ``i`` is ranked against every
    ``target[j]`` by the Hungarian-matched sum of ``distances`` (``[..., K, K]`` per slot pair;
    by default squared Euclidean over the whole slot state), and its rank is 1 + the number of
    other targets strictly closer than ``target[i]`` (ties count for the prediction). Returns
    ``hits_at_1`` (share of rank 1), ``mrr`` (mean reciprocal rank) and ``ranks`` ``[N]``."""
    assert pred.dim() == 3 and pred.shape == target.shape, (
        f"ranking_metrics: pred {tuple(pred.shape)} and target {tuple(target.shape)} must be "
        "[N, K, S]"
    )
    N = len(pred)
    rows = []
    for i in range(0, N, chunk):  # [n, N] matched distances, n Hungarian problems per target
        block = distances(pred[i : i + chunk, None], target[None])
        rows.append(hungarian_cost(block))
    dist = torch.cat(rows, 0)  # [N, N]
    own = dist.diagonal()
    ranks = 1 + (dist < own[:, None]).sum(1)
    return {
        "hits_at_1": float((ranks == 1).float().mean()),
        "mrr": float((1.0 / ranks.float()).mean()),
        "ranks": ranks,
    }


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
    the ``elites`` best. Returns the best sequence ever sampled and its cost (the elite mean
    can fall between two good modes, e.g. two blocks a pick could take; the best sample
    cannot).

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
        better = costs[rows, order[:, 0]] < best_cost
        best[better] = samples[rows, order[:, 0]][better]
        best_cost = torch.where(better, costs[rows, order[:, 0]], best_cost)
        mean = top.mean(1)
        std = top.std(1, unbiased=False).clamp(min=min_std) if elites > 1 else std
    return best, best_cost


def slot_spec(config: Config) -> SlotSpec:
    """The slot world model described by ``config.op3`` (whose architecture keys are
    ``SlotSpec``'s fields)."""
    return SlotSpec(**{f.name: getattr(config.op3, f.name) for f in dataclasses.fields(SlotSpec)})


# ------------------------------------------------------------------------------------------
# The agent
# ------------------------------------------------------------------------------------------


class OP3Agent(Agent):
    """Slot world model + CEM planning to the goal image; ``Box`` actions in ``[-1, 1]``."""

    def __init__(self, config: Config, obs_space: gym.spaces.Dict, action_space: gym.Space) -> None:
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
        self.config = config
        self.action_space = action_space
        self.action_shape = tuple(action_space.shape)
        self.action_dim = int(np.prod(self.action_shape))
        self.image_shape = tuple(spaces["pixels"].shape)
        self.accelerator = make_accelerator(config)
        self.device = self.accelerator.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.factory = LayerFactory(norm="layer", act="relu")
            self.wm = SlotWorldModel(
                self.image_shape, self.action_dim, slot_spec(config), self.factory
            )
        self.accelerator.place(self.wm)
        # Masks go on before the optimizer exists (they keep the same Parameter objects).
        self.sparsifier: sparse.Sparsifier | None = None
        if config.sparse.enabled:
            self.sparsifier = self._sparsify()
            # RigL's dense gradients, like the masked ones, are averaged over ranks (torchrun).
            self.sparsifier.grad_reduce = self.accelerator.average
        if o.freeze_perception:
            # Frozen weights build no autograd graph: inference and decoding of the posterior
            # run forward only, and Adam skips them (their gradients stay None).
            for name, parameter in self.wm.named_parameters():
                if not name.startswith(("dynamics.", "cpc.")):
                    parameter.requires_grad_(False)
        self.opt = torch.optim.Adam(self.wm.parameters(), lr=o.lr)
        if self.sparsifier is not None:
            self.sparsifier.attach(self.opt)  # re-mask after every step
        self.accelerator.prepare({"world_model": self.wm}, {"world_model": self.opt})
        self.scales = {
            "loss/reconstruction": o.reconstruction_scale,
            "loss/prediction": o.prediction_scale,
            "loss/dynamics": o.dynamics_scale,
            "loss/cpc": o.cpc_scale,  # with op3.representation=reconstruction+cpc or cpc
        }
        self.updates = 0
        # Exploration and planning noise: the agent's own streams, saved in checkpoints.
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed + 1)
        # The planning cost (a batched open-loop rollout, distances and the on-device slot
        # matching: no host sync) is one compiled graph under agent.compile (auto: on cuda);
        # sparse masks (parametrizations) stay eager, as in the Dreamer.
        compiling = self.accelerator.compiling and self.sparsifier is None
        self._plan_cost = self.accelerator.compile(self.plan_cost) if compiling else self.plan_cost

    def _sparsify(self) -> sparse.Sparsifier:
        """Masks on the slot world model's layers (``sparse.*``; ``sparse.skip=null``: the
        agent's ``op3_config.SPARSE_SKIP_DEFAULT``); FLOPs counted per replayed step (one
        no-grad loss forward on a dummy ``[1, replay.batch_length]`` batch)."""
        cfg = self.config
        patterns = op3_config.SPARSE_SKIP_DEFAULT if cfg.sparse.skip is None else cfg.sparse.skip
        lib_config = cfg.sparse.library_config(
            total_steps=planned_updates(cfg),
            seed=cfg.seed,
            fast_path_batch=cfg.replay.steps_per_batch,
            skip=sparse_skip(self.wm, list(patterns)),
        )
        T = cfg.replay.batch_length
        batch = {
            "pixels": torch.zeros(1, T, *self.image_shape, dtype=torch.uint8),
            "action": torch.zeros(1, T, self.action_dim),
            "is_first": torch.zeros(1, T),
        }
        batch["is_first"][:, 0] = 1
        example = self.preprocess(batch)
        predict = cfg.op3.prediction_scale > 0
        return sparsify_model(
            self.wm,
            lambda data: self.wm.loss_and_states(data, predict_pixels=predict),
            lib_config,
            example,
            T,
            self.device,
        )

    def _cached(self):
        """Masked weights computed once per block (``agents.sparsity.cached_masks``)."""
        return cached_masks(self.sparsifier)

    # ---------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------
    def _pixels(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 frames ``[..., 3, H, W]`` -> floats in ``[-0.5, 0.5]`` on the device."""
        tensor = torch.as_tensor(np.asarray(pixels) if not torch.is_tensor(pixels) else pixels)
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.float() / 255.0 - 0.5 if not tensor.is_floating_point() else tensor

    def preprocess(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Replay batch ``[B, T, ...]`` -> the world model's inputs."""
        B, T = batch["is_first"].shape[:2]
        return {
            "pixels": self._pixels(batch["pixels"]),
            "action": batch["action"].to(self.device).float().reshape(B, T, self.action_dim),
            "is_first": batch["is_first"].to(self.device).float(),
        }

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        o = self.config.op3
        lr = o.lr * min(1.0, (self.updates + 1) / max(1, o.warmup))
        for group in self.opt.param_groups:
            group["lr"] = lr
        with self.accelerator.train_step(batch):
            data = self.preprocess(batch)
            self.opt.zero_grad(set_to_none=True)
            with self.accelerator.autocast(), self._cached():
                losses, metrics, _ = self.wm.loss_and_states(
                    data, predict_pixels=o.prediction_scale > 0
                )
            total = sum(self.scales[k] * v for k, v in losses.items())
            norm = self.accelerator.backward(total, self.opt, clip=o.grad_clip)
            self.accelerator.step(self.opt)
            if self.sparsifier is not None:
                self.sparsifier.step(self.opt)  # re-mask, scheduled drop/regrow, RigL arming
            self.opt.zero_grad(set_to_none=True)
        self.updates += 1
        out = {**losses, **metrics, "loss/world_model": total, "train/grad_norm_world_model": norm}
        # Device tensors, read by the loop once per log interval (agents.base).
        result: dict[str, torch.Tensor | float] = {k: v.detach() for k, v in out.items()}
        result["train/lr"] = lr
        return result

    def log_metrics(self) -> dict[str, float]:
        """Once per log interval: the sparse masks' statistics (``sparse/*``) and the
        accelerator's measured (cuda) or estimated (ipu-sim) scalars."""
        out = dict(self.sparsifier.metrics()) if self.sparsifier is not None else {}
        out.update(self.accelerator.metrics())
        return out

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
        previous = state["plan"] * (1.0 - fresh)[:, None, None]  # no warm start across episodes
        plan = self.plan(slots, goal, previous)  # [n, H, A]
        action = plan[:, 0].cpu().numpy().astype(np.float32)
        if explore:
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

    def plan_cost(
        self,
        slots: torch.Tensor,
        goal: torch.Tensor,
        actions: torch.Tensor,
        placed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cost ``[N, P]`` of action sequences ``actions [N, P, H, A]`` from slots ``[N, K,
        S]``: matched distance between the final predicted slots and the goal slots ``[N, K,
        S]``, plus ``op3.keep_scale`` x the predicted motion of the centres of the slots
        ``placed [N, K]`` (1 where a slot already sits at its goal, ``placed_slots``)."""
        N, P = actions.shape[:2]
        start = slots[:, None].expand(N, P, *slots.shape[1:]).flatten(0, 1)
        final = self.wm.imagine(start, actions.flatten(0, 1))[:, -1].unflatten(0, (N, P))
        o = self.config.op3
        D = self.wm.spec.slot_dim
        cost = matched_slot_distance(final, goal[:, None], D, o.position_weight)
        if placed is not None and o.keep_scale > 0:
            # The dynamics keeps slot k in row k, so row k's motion is slot k's.
            motion = (final[..., D : D + 2] - slots[:, None, :, D : D + 2]).norm(dim=-1)
            cost = cost + o.keep_scale * (motion * placed[:, None]).sum(-1)
        return cost

    def placed_slots(self, slots: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """``[N, K]``: 1 where slot k of ``slots [N, K, S]`` has its centre within
        ``op3.keep_radius`` of the goal slot it is matched to (the planning cost's matching,
        ``slot_distances``), else 0."""
        o = self.config.op3
        D = self.wm.spec.slot_dim
        order = hungarian_order(slot_distances(slots, goal, D, o.position_weight))
        matched = goal.gather(1, order[..., None].expand_as(goal))
        gap = (slots[..., D : D + 2] - matched[..., D : D + 2]).norm(dim=-1)
        return (gap <= o.keep_radius).float()

    def plan(
        self, slots: torch.Tensor, goal: torch.Tensor, previous: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The CEM plan ``[N, H, A]`` from slots ``[N, K, S]`` toward goal slots ``[N, K, S]``.

        With ``op3.cem_warm_start`` and the last step's plan ``previous [N, H, A]`` (zeros
        where there is none), the sampling mean starts from it shifted by one action, the new
        last action 0 (TD-MPC2's warm start). Every sample, score and refit stays on the
        device: nothing is read back until the caller takes the action."""
        o = self.config.op3
        mean = torch.zeros(slots.shape[0], o.horizon, self.action_dim, device=self.device)
        if previous is not None and o.cem_warm_start and o.horizon > 1:
            mean[:, :-1] = previous[:, 1:]
        placed = self.placed_slots(slots, goal) if o.keep_scale > 0 else None
        best, _ = cem(
            lambda actions: self._plan_cost(slots, goal, actions, placed),
            mean,
            o.cem_std,
            o.cem_population,
            o.cem_elites,
            o.cem_iterations,
            generator=self.generator,
        )
        return best

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
        with self._cached():
            out = [
                self.wm.segment(self._pixels(pixels[i : i + chunk])).float().cpu().numpy()
                for i in range(0, len(pixels), chunk)
            ]
        return np.concatenate(out, 0)

    # ---------------------------------------------------------------------------------
    # Checkpoints and reports
    # ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        weights = {
            f"world_model.{k}": v.detach().cpu().clone() for k, v in self.wm.state_dict().items()
        }
        state = {
            "weights": weights,
            "optimizers": {"world_model": self.opt.state_dict()},
            "updates": self.updates,
            "rng": self.rng.bit_generator.state,
            "generator": self.generator.get_state(),
        }
        if self.sparsifier is not None:
            # Masks (bool), schedule position, RNG; the weights hold the masked layers as
            # `<layer>.parametrizations.weight.original` and `...weight.0.mask`.
            state["sparse"] = self.sparsifier.state_dict()
        return state

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        prefix = "world_model."
        own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        saved_sparse = any(".parametrizations." in k for k in own)
        if saved_sparse != (self.sparsifier is not None):
            saved, now = ("true", "false") if saved_sparse else ("false", "true")
            raise ValueError(
                f"weights were saved with sparse.enabled={saved}, this agent has "
                f"sparse.enabled={now}: load them with the sparse settings they were trained with"
            )
        # The loss/cpc projections exist only with op3.representation=...cpc: weights from a
        # model without them (e.g. a reconstruction perception, `init=`) keep this model's
        # fresh ones, and theirs are dropped where this model has none.
        mine = self.wm.state_dict()
        own = {k: v for k, v in own.items() if k in mine or not k.startswith("cpc.")}
        own.update({k: v for k, v in mine.items() if k.startswith("cpc.") and k not in own})
        self.wm.load_state_dict(own, strict=True)
        if self.sparsifier is not None:
            # The masks came with the weights (buffers): check their counts against this
            # run's budget and re-mask, keeping this agent's schedule position and RNG.
            self.sparsifier.load_state_dict(self.sparsifier.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if ("sparse" in state) != (self.sparsifier is not None):
            saved, now = ("true", "false") if "sparse" in state else ("false", "true")
            raise ValueError(
                f"checkpoint was saved with sparse.enabled={saved}, this agent has "
                f"sparse.enabled={now}: load it with the sparse settings it was trained with"
            )
        self.load_weights(state["weights"])
        if self.sparsifier is not None:
            self.sparsifier.load_state_dict(state["sparse"])  # checks the masks, re-arms RigL
        self.opt.load_state_dict(state["optimizers"]["world_model"])
        self.updates = int(state["updates"])
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])

    @torch.no_grad()
    def report(self, batch: dict[str, torch.Tensor], rows: int = 4) -> dict[str, np.ndarray]:
        """``world_model/slots``: for ``rows`` replayed frames, the frame, its reconstruction
        and each mixture component's masked RGB (background first, then the slots) side by
        side, as a uint8 image ``[rows * h, (C + 2) * w, 3]`` at the model's resolution."""
        pixels = self._pixels(batch["pixels"][:rows, 0])
        with self._cached():
            decoded = self.wm.decode(self.wm.infer(pixels))
        truth = self.wm.resize(pixels)
        parts = [truth, decoded["image"]] + [
            decoded["masks"][:, k] * decoded["rgb"][:, k] for k in range(self.wm.num_components)
        ]
        image = torch.cat(parts, -1)  # [rows, 3, h, (K + 2) w]
        image = ((image + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return {"world_model/slots": image.permute(0, 2, 3, 1).flatten(0, 1).cpu().numpy()}

    def num_parameters(self) -> dict[str, int]:
        count = sum(p.numel() for p in self.wm.parameters())
        return {"world_model": count, "total": count}


__all__ = [
    "OP3Agent",
    "cem",
    "hungarian_cost",
    "matched_slot_distance",
    "ranking_metrics",
    "slot_distances",
    "slot_spec",
    "squared_slot_distances",
]


ENTRY = register_agent(
    AgentEntry(
        name=op3_config.NAME,
        make=OP3Agent,
        sections={"op3": op3_config.OP3Config},
        presets=("op3",),
        preset_dir=op3_config.PRESET_DIR,
        env_settings=op3_config.env_settings,
        validate=op3_config.validate,
        check_new_run=op3_config.check_new_run,
    )
)
