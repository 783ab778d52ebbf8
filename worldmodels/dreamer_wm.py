"""The DreamerV3 world model: encoder, RSSM, decoder, reward and continue heads.

Input batches (``[B, T, ...]`` tensors on the model's device) follow the replay convention:
observation keys (images as floats in ``[-0.5, 0.5]``, see ``preprocess_obs``; vectors as
floats), ``action [B, T, A]`` the action taken at each step (one-hot for discrete actions),
``reward`` received on arriving at the step, ``is_first`` and ``is_terminal`` as floats.

``loss(batch)`` returns ``(losses, metrics)``: unscaled loss terms ``loss/reconstruction``,
``loss/reward``, ``loss/continue``, ``loss/dynamics``, ``loss/representation`` (the caller
sums them with its scales) and ``world_model/...`` diagnostics, all 0-d tensors.

``spec.representation`` picks how the latent state learns about observations:
``reconstruction`` (the pixel/vector decoder), ``reconstruction+cpc`` (plus ``loss/cpc``, the
InfoNCE of ``worldmodels.cpc.SequenceCPC`` from the posterior state to future embeddings) or
``cpc`` (decoder-free: no decoder is built, ``loss/cpc`` replaces ``loss/reconstruction``).
Factored dynamics with the ``l1`` graph add ``loss/graph`` (already scaled by ``l1_scale``)
and every factored model logs ``world_model/graph_*``.
Each loss comes from an objective part (``worldmodels.objectives``, ``WorldModel.objectives``);
``_head_losses`` loops over them. With ``spec.greedy_modules = M > 0`` the encoder is trained
by Greedy InfoMax (``self.greedy``, its own losses and optimizers) and every loss here sees its
output detached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from imagine_rl.worldmodels.cpc import CPCSpec, GreedyInfoMax, SequenceCPC
from imagine_rl.worldmodels.layers import LayerFactory, TwoHot
from imagine_rl.worldmodels.networks import Decoder, Encoder, Head, Shapes, split_keys
from imagine_rl.worldmodels.objectives import Objective, ObjectiveInputs, objectives_for
from imagine_rl.worldmodels.rssm import RSSM, RSSMConfig, State

LOSS_KEYS = (
    "loss/reconstruction",
    "loss/reward",
    "loss/continue",
    "loss/dynamics",
    "loss/representation",
)
# `representation` modes; `loss/cpc` joins the losses with cpc, `cpc` drops reconstruction.
REPRESENTATIONS = ("reconstruction", "reconstruction+cpc", "cpc")


@dataclass
class WorldModelSpec:
    """Architecture of a ``WorldModel`` (plain values; agents map their config onto it)."""

    rssm: RSSMConfig = field(default_factory=RSSMConfig)
    units: int = 512
    mlp_layers: int = 2  # encoder and decoder MLPs (vector observations)
    head_layers: int = 1  # reward and continue heads
    cnn_depth: int = 32
    minres: int = 4
    reward_bins: int = 255
    free_nats: float = 1.0
    norm: str = "layer"
    act: str = "silu"
    representation: str = "reconstruction"  # one of REPRESENTATIONS
    cpc: CPCSpec = field(default_factory=CPCSpec)
    greedy_modules: int = 0  # Greedy InfoMax modules of the encoder; 0 = end-to-end


def preprocess_obs(obs: dict[str, torch.Tensor], image_keys: list[str]) -> dict[str, torch.Tensor]:
    """Images (uint8 ``0..255``) -> float ``[-0.5, 0.5]``; other keys -> float32."""
    out = {}
    for key, value in obs.items():
        if key in image_keys:
            out[key] = value.float() / 255.0 - 0.5 if not value.is_floating_point() else value
        else:
            out[key] = value.float()
    return out


def openloop_video(truth: torch.Tensor, model: torch.Tensor) -> np.ndarray:
    """truth | model | error side by side, sequences stacked vertically: frames in ``[0, 1]``
    ``[B, T, C, H, W]`` -> uint8 ``[T, B * H, 3 * W, 3]`` (grey frames repeated to RGB)."""
    error = ((model - truth) + 1.0) / 2.0
    video = torch.cat([truth, model, error], -1)  # [B, T, C, H, 3W]
    B, T, C, H, W3 = video.shape
    video = video.permute(1, 0, 3, 4, 2).reshape(T, B * H, W3, C)
    if C == 1:
        video = video.expand(-1, -1, -1, 3)
    return (video[..., :3] * 255).round().to(torch.uint8).cpu().numpy()


class WorldModel(nn.Module):
    """Encoder, RSSM and heads; ``loss``, ``observe`` and ``imagine``.

    ``obs_shapes`` maps observation keys to shapes (``[D]`` vectors, ``[C, H, W]`` images).
    ``factory`` (a ``LayerFactory``) builds every weight layer; by default a fresh one.
    """

    def __init__(
        self,
        obs_shapes: Shapes,
        action_dim: int,
        spec: WorldModelSpec | None = None,
        factory: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        self.spec = s = spec or WorldModelSpec()
        self.obs_shapes = {k: tuple(v) for k, v in obs_shapes.items()}
        self.image_keys, self.vector_keys = split_keys(self.obs_shapes)
        self.action_dim = action_dim
        factory = factory or LayerFactory(norm=s.norm, act=s.act)
        f = factory.scope("wm")
        self.encoder = Encoder(self.obs_shapes, s.units, s.mlp_layers, s.cnn_depth, f, s.minres)
        self.rssm = RSSM(s.rssm, action_dim, self.encoder.embed_dim, f)
        feat = s.rssm.feat_size
        if s.representation not in REPRESENTATIONS:
            raise ValueError(
                f"representation: expected one of {REPRESENTATIONS}, got {s.representation!r}"
            )
        self.decoder: Decoder | None = None
        if s.representation != "cpc":
            self.decoder = Decoder(
                self.obs_shapes, feat, s.units, s.mlp_layers, s.cnn_depth, f, s.minres
            )
        self.cpc: SequenceCPC | None = None
        if "cpc" in s.representation:
            self.cpc = SequenceCPC(
                feat, self.encoder.embed_dim, action_dim, s.cpc, f.scope("cpc"), "cpc_"
            )
        self.greedy: GreedyInfoMax | None = None
        if s.greedy_modules:
            self.greedy = GreedyInfoMax(
                self.encoder, s.greedy_modules, action_dim, s.cpc, f, s.minres
            )
        self.reward_head = Head(feat, s.reward_bins, s.units, s.head_layers, f, "reward", 0.0)
        self.continue_head = Head(feat, 1, s.units, s.head_layers, f, "continue")
        self.twohot = TwoHot(s.reward_bins)

    @property
    def feat_size(self) -> int:
        return self.spec.rssm.feat_size

    # ---------------------------------------------------------------------------------
    def obs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in self.obs_shapes}

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(self.obs(batch))

    def observe(
        self, batch: dict[str, torch.Tensor], state: State | None = None, sample: bool = True
    ) -> tuple[State, State]:
        """``(post, prior)`` over a batch (see ``RSSM.observe``)."""
        embed = self.encode(batch)
        return self.rssm.observe(embed, batch["action"], batch["is_first"], state, sample)

    def imagine(self, policy, start: State, horizon: int, sample: bool = True) -> State:
        """See ``RSSM.imagine``."""
        return self.rssm.imagine(policy, start, horizon, sample)

    def rollout(self, start: State, actions: torch.Tensor, sample: bool = True) -> State:
        """Open loop: the states after each of ``actions`` ``[N, H, A]`` from ``start``
        ``[N, ...]``: ``deter``/``stoch`` ``[N, H, ...]`` (see ``RSSM.rollout``)."""
        return self.rssm.rollout(start, actions, sample)

    def feat(self, state: State) -> torch.Tensor:
        return self.rssm.feat(state)

    def reward(self, feat: torch.Tensor) -> torch.Tensor:
        """Predicted reward ``[...]`` (the two-hot mean) at model features ``[..., F]``."""
        return self.twohot.decode(self.reward_head(feat))

    def continue_prob(self, feat: torch.Tensor) -> torch.Tensor:
        """Probability ``[...]`` that the episode continues after the step at ``feat``."""
        return torch.sigmoid(self.continue_head(feat).float().squeeze(-1))

    # ---------------------------------------------------------------------------------
    def loss(
        self, batch: dict[str, torch.Tensor], state: State | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        losses, metrics, _ = self.loss_and_states(batch, state)
        return losses, metrics

    def loss_and_states(
        self,
        batch: dict[str, torch.Tensor],
        start: State | None = None,
        embed: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], State]:
        """``(losses, metrics, post)``; ``post`` are the posterior states ``[B, T, ...]``
        observed from ``start`` (``deter``/``stoch``/``action`` ``[B, ...]``; None: the initial
        state). ``embed`` ``[B, T, E]``: the observation embedding when already computed
        (Greedy InfoMax's ``train_step`` returns it); by default the encoder runs here.
        """
        B, T = batch["is_first"].shape
        assert batch["action"].shape[:2] == (B, T), (
            f"loss_and_states: action {tuple(batch['action'].shape)} and is_first "
            f"{tuple(batch['is_first'].shape)} must share [B, T]"
        )
        state = start
        if embed is None:
            embed = self.encode(batch)
            if self.greedy is not None:
                embed = embed.detach()  # greedy modules learn from their own losses only
        post, prior = self.rssm.observe(embed, batch["action"], batch["is_first"], state)
        losses, metrics = self._head_losses(batch, post, prior, embed)
        return losses, metrics, post

    def objectives(self) -> list[Objective]:
        """The loss parts for ``spec.representation`` (``worldmodels.objectives``), in the
        order their losses are summed. Built afresh on each call: they hold plain references
        to this model's current modules and register none."""
        return objectives_for(
            self.spec.representation,
            rssm=self.rssm,
            reward_head=self.reward_head,
            continue_head=self.continue_head,
            twohot=self.twohot,
            free_nats=self.spec.free_nats,
            decoder=self.decoder,
            cpc=self.cpc,
        )

    def _head_losses(self, batch, post: State, prior: State, embed: torch.Tensor):
        step = ObjectiveInputs(batch, post, prior, self.rssm.feat(post), embed)
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        for objective in self.objectives():
            part_losses, part_metrics = objective.apply(step)
            losses.update(part_losses)
            metrics.update(part_metrics)
        return losses, metrics

    # ---------------------------------------------------------------------------------
    @torch.no_grad()
    def videos(self, batch: dict[str, torch.Tensor], context: int = 5) -> dict[str, np.ndarray]:
        """Media for eval-time logging: per image key ``world_model/openloop_<key>``
        (``openloop_video`` of ``open_loop``: truth | model | error), and with factored
        dynamics ``world_model/graph``, the ``G x G`` adjacency as a uint8 ``[H, W, 3]``
        image. Without images or a decoder (``representation=cpc``), or with sequences no
        longer than ``context``, no videos."""
        videos = {}
        if self.rssm.graph is not None:
            videos["world_model/graph"] = self.rssm.graph.image()
        if not self.image_keys or self.decoder is None or batch["is_first"].shape[1] <= context:
            return videos
        pred = self.open_loop(batch, context)
        for key in self.image_keys:
            truth = (batch[key] + 0.5).clamp(0, 1)
            model = (pred[key].float() + 0.5).clamp(0, 1)
            videos[f"world_model/openloop_{key}"] = openloop_video(truth, model)
        return videos

    @torch.no_grad()
    def open_loop(
        self, batch: dict[str, torch.Tensor], context: int = 5
    ) -> dict[str, torch.Tensor]:
        """Reconstructions of the first ``context`` steps (posterior), then open-loop prior
        predictions driven by the batch's actions: ``{key: [B, T, ...]}`` decoder means."""
        if self.decoder is None:
            raise ValueError("open_loop needs a decoder; representation='cpc' builds none")
        ctx = {k: v[:, :context] for k, v in batch.items()}
        post, _ = self.observe(ctx, sample=False)
        start = {"deter": post["deter"][:, -1], "stoch": post["stoch"][:, -1]}
        # States after context-1, context, ...: step t consumes the action taken at t-1.
        future = self.rssm.rollout(start, batch["action"][:, context - 1 : -1], sample=False)
        feat = torch.cat([self.rssm.feat(post), self.rssm.feat(future)], 1)
        return self.decoder(feat)
