"""An OP3-like object-centric world model: K slots, inferred by slot attention, decoded by a
spatial-broadcast decoder, moved by one shared transition with action attention and pairwise
interactions.

A slot's state (``S = slot_dim + 4`` numbers) is its features followed by its *frame*
``(y, x, sy, sx)``: the mean and standard deviation of the positions of the tokens it
attends to, in image units. Pieces (every weight layer built through ``LayerFactory``, so
sparse layers can be swapped in):

- ``SlotEncoder``: a small CNN (first conv at full resolution, then stride 2) plus a soft
  position embedding; ``[N, 3, H, W]`` -> tokens ``[N, (H/2) * (W/2), C]``.
- Fresh slots start at the K most distinct colours of the frame (``farthest_tokens``:
  farthest-point sampling, a k-means++-style seeding) with a small frame around each. With
  ``inference="fresh"`` (default) every frame starts so, and ``loss/dynamics`` pairs each
  predicted slot with the next frame's slot by a Hungarian matching (``match_slots``); with
  ``"filter"`` (OP3's scheme) later frames start from the dynamics' prediction, so slot
  identity persists, but on the blocks scenes the refinement learned to keep the prediction
  and the dynamics to ignore the action (see README).
- ``SlotAttention`` (Locatello et al. 2020): iterative amortised inference. Slots compete for
  the tokens (softmax over slots), each slot takes the weighted mean of the values and is
  updated by a GRU cell and a residual MLP. The attention logits add the Gaussian
  log-density of the token's position under the slot's frame (a spatial prior). With
  ``implicit=True`` the last iteration runs on detached slots with a straight-through path to
  the initial slots (first-order implicit differentiation, Chang et al. 2022).
- ``BroadcastDecoder``: each slot is broadcast on a coarse grid with coordinates relative to
  its frame (invariant slot attention, Biza et al. 2023) and absolute ones, upsampled by
  stride-2 transposed convs, and gives RGB plus a mask logit (plus its frame's Gaussian
  prior); the masks are a softmax over slots (they sum to one at every pixel) and the image is
  the mixture. Optionally a learned static background layer joins the mixture.
- ``SlotDynamics``: one transition shared by all slots: an action attention (a sigmoid gate per
  slot: which slot the action affects, possibly none), pairwise interactions with a gate per
  ordered pair (optionally only the ``interaction_topk`` strongest partners per slot: a sparse
  interaction graph), and a residual update. Permutation-equivariant in the slots.

Why the spatial machinery: plain slot attention on these scenes (three small blocks, a large
static table) sits for a long time in the plateau where every slot draws the whole table
and no slot holds a block; seeded at distinct colours and held to their surroundings, the
slots own different regions from the first update.

Sequences follow the replay convention: ``action[:, t]`` is taken *at* step ``t``, so the slots
of step ``t`` are predicted from the posterior slots of ``t - 1`` and ``action[:, t - 1]``
(the *prior*); the *posterior* is inferred from frame ``t`` (from fresh slots, or with
``filter`` refined from the prior; at ``is_first`` and at ``t = 0`` without a carried state
always from fresh slots). Images are floats
in ``[-0.5, 0.5]`` (``preprocess_obs``), area-downsampled to ``spec.resolution``.

``loss(batch)`` returns ``(losses, metrics)``: ``loss/reconstruction`` (posterior slots decoded
against the frame), ``loss/prediction`` (the dynamics' prior slots decoded against the frame
they predict) and ``loss/dynamics`` (prior slots against the detached posterior slots they
initialised; the frame centres weighted by ``position_loss_scale``), all mean squared errors
(0 when a window has no step with a predecessor). The dynamics predicts from the detached
previous posterior unless ``dynamics_trains_perception``: the two dynamics terms train the
dynamics (and ``loss/prediction`` the decoder), not the slots they start from. Every slot
state is kept canonical by ``normalize_slots`` (unit-RMS features, frames inside the image),
which keeps the prior -> posterior -> dynamics-target loop from running away.

As a ``worldmodels.interface.WorldModelInterface`` its ``State`` is ``{"slots": [..., K,
S]}``, plus ``goal [..., K, S]`` (the goal image's slots) where a planner or a goal-conditioned
behaviour carries one: ``loss_and_states`` returns the posterior ``slots [B, T, K, S]``,
``rollout(start, actions)`` the slots after each action ``[N, H, K, S]`` and ``imagine(policy,
start, horizon)`` ``[N, H + 1, K, S]`` with the actions, the start's ``goal`` carried unchanged.
``feat`` concatenates the K slot states in slot order (``[..., K * S]``; with
``SlotSpec.goal_features`` the goal slots after them, ``[..., 2 * K * S]``). ``reward`` and
``continue_prob`` need ``SlotSpec.heads``: two MLPs on ``feat`` trained by ``loss/reward``
(symlog squared error) and ``loss/continue`` (binary cross entropy against ``1 -
is_terminal``), built only then so a model without them keeps its parameters and checkpoints.

Contrastive slot dynamics (``SlotSpec.representation``, after C-SWM, Kipf et al. 2020):
``reconstruction+cpc`` adds ``loss/cpc`` and ``cpc`` replaces ``loss/prediction`` by it (the
prior slots are then never decoded, so no image decoder is trained for the dynamics; the
perception's reconstruction of the posterior, ``loss/reconstruction``, stays, since it is what
gives the slots their meaning, and so does the slot regression ``loss/dynamics``). ``loss/cpc``
(``cpc_loss``, ``worldmodels.cpc.SlotCPC``) is InfoNCE per predicted slot: after the same
Hungarian matching as ``loss/dynamics`` its positive is the next frame's inferred slot it was
matched to, and its negatives are all the other inferred slots of the batch (the other slots
of that frame, and every slot of the other samples and time steps), ``B * T * K`` candidates;
anchors are weighted like ``loss/dynamics`` (steps with a prediction, slots that draw
something). The keys are detached unless ``dynamics_trains_perception``; the projections
(``cpc.query``, ``cpc.key``) exist only in the ``cpc`` modes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from imagine_rl.worldmodels.cpc import SlotCPC
from imagine_rl.worldmodels.interface import Policy, State
from imagine_rl.worldmodels.layers import LayerFactory, symexp, symlog

INIT_SCALE = 0.1  # scale of a fresh slot's frame (image units)
PRESENT_SHARE = 0.004  # image share from which a slot counts fully in loss/dynamics
ACTION_GATE_FLOOR = 0.1  # least weight of the action's effect on any slot (see SlotDynamics)
POSITION_FREQUENCIES = 4  # Fourier features of slot positions in the action attention
MIN_SCALE = 0.03  # smallest slot scale (image units): half a token of a 16 x 16 grid
LOSS_KEYS = ("loss/reconstruction", "loss/prediction", "loss/dynamics")
HEAD_LOSS_KEYS = ("loss/reward", "loss/continue")  # with SlotSpec.heads
# State keys that change along a rollout; any other key of a start state (the "goal" slots) is
# carried unchanged to every step of ``rollout`` and ``imagine``.
_STEP_KEYS = ("slots", "action")
SLOT_INITS = ("farthest", "learned", "gaussian")
INFERENCE_MODES = ("fresh", "filter")
REPRESENTATIONS = ("reconstruction", "reconstruction+cpc", "cpc")
GOAL_PAIRINGS = ("matched", "concat")


@dataclass
class SlotSpec:
    """Architecture of a ``SlotWorldModel``. The ``op3`` section of the run config extends this
    class (``agents.op3_config.OP3Config``), so each field is defined once, here;
    ``metadata["min"]`` is the lower bound the run config checks."""

    # K slots of slot_dim features (plus a 4-d position/scale frame each), slot-attention
    # iterations per frame.
    slots: int = field(default=5, metadata={"min": 1})
    slot_dim: int = field(default=64, metadata={"min": 1})
    iterations: int = field(default=3, metadata={"min": 1})
    # How first frames start (later frames start from the dynamics' prediction): farthest:
    # from the K most distinct tokens of the frame (farthest-point sampling, see
    # ``farthest_tokens``), so slots start on different regions and no symmetric plateau has
    # to be escaped; learned: K learned vectors (BO-QSA style); gaussian: i.i.d. samples from
    # a learned Gaussian (the original slot attention).
    slot_init: Literal["farthest", "learned", "gaussian"] = "farthest"
    # Implicit differentiation of slot attention (the last iteration alone carries gradient).
    implicit: bool = True
    cnn_depth: int = field(default=32, metadata={"min": 1})  # encoder channels
    # Decoder channels (the full-resolution layer gets half).
    decoder_depth: int = field(default=32, metadata={"min": 8})
    broadcast: int = field(default=8, metadata={"min": 1})  # side of the broadcast grid
    hidden: int = field(default=128, metadata={"min": 1})  # MLP width (slot attention, dynamics)
    # Sparse interaction graph: each slot hears only its interaction_topk strongest partners
    # (0 = all K - 1 others).
    interaction_topk: int = field(default=0, metadata={"min": 0})
    # Side of the frames the model sees and reconstructs (frames are area-downsampled to it;
    # ``segment`` upsamples the mask logits back); 0 = the env's image size. It must divide
    # the image size and be 8 x a power of 2.
    resolution: int = field(default=32, metadata={"min": 0})
    # A learned static background layer (RGB and mask logit per pixel) behind the slots, as
    # one more mixture component: with a fixed camera it can explain the table and the walls,
    # leaving the slots for what moves (slower to train on CPU; see README).
    background: bool = False
    # Weight of the frame centres (y, x) in ``loss/dynamics`` relative to the features (whose
    # squared error is averaged per dimension of unit-RMS features): centres are in image
    # units, so unweighted they would be a negligible part of the loss (the planner's cost
    # rests on them).
    position_loss_scale: float = field(default=25.0, metadata={"min": 0})
    # How each frame's posterior slots are inferred (see the module docstring): fresh: from
    # the frame alone (colour-seeded start), the dynamics trained toward them after a
    # Hungarian matching; filter: refined from the dynamics' prediction (OP3's filtering;
    # measured on blocks: the slots settle into fixed regions that the refinement never moves,
    # and the dynamics learns to ignore the action; see README).
    inference: Literal["fresh", "filter"] = "fresh"
    # Whether loss/dynamics (and loss/cpc, whose keys are the posterior) also trains the
    # perception through the dynamics' input (the previous posterior). Off: the dynamics learns on the slots the perception gives it and
    # only the reconstruction shapes those slots (trained jointly, the dynamics' gradient
    # degraded a pretrained segmentation, FG-ARI 0.77 -> 0.39 in 2,000 updates; see README).
    dynamics_trains_perception: bool = False
    # What trains the dynamics besides loss/dynamics (the slot regression): reconstruction:
    # the decoded prediction (loss/prediction); reconstruction+cpc: that plus the contrastive
    # loss/cpc (C-SWM-style InfoNCE of each predicted slot against the next frame's inferred
    # slots); cpc: loss/cpc instead of loss/prediction (no decoder pass for the dynamics; the
    # perception still reconstructs the posterior, which is where the slots come from).
    representation: Literal["reconstruction", "reconstruction+cpc", "cpc"] = "reconstruction"
    # Size of the loss/cpc projections (query from the predicted slot, key from the inferred
    # one; each a linear map of the slot's features, Fourier position features and scale).
    cpc_dim: int = field(default=64, metadata={"min": 1})
    # loss/cpc compares the L2-normalised projections by dot product over this temperature.
    cpc_temperature: float = field(default=0.1, metadata={"min": 1e-6})
    # Reward and continue heads on the slot features (``reward``, ``continue_prob``; losses
    # loss/reward and loss/continue from the batch's reward and is_terminal), for planners
    # and behaviours that predict returns. Off, none is built: the parameters, random draws
    # and checkpoints of a model without them stay what they were before the heads existed.
    heads: bool = False
    # The features (``feat``) also hold the goal's slots, after the state's own: the state
    # carries ``goal [..., K, S]`` (inferred from the batch's ``goal`` frames in
    # ``loss_and_states``), and ``feat_size`` is 2 K S instead of K S.
    goal_features: bool = False
    # With goal_features, how the goal's slots enter ``feat``. matched: each slot is paired
    # with the goal slot of the same appearance (a Hungarian matching on the features alone:
    # the goal shows the same objects elsewhere), each pair is ``[slot, goal slot, centre
    # offset (y, x), its length]``, and K learned attention scores (softmax over the pairs)
    # pool the K pairs into K tokens, so ``feat`` does not depend on the order of either set of
    # slots and ``feat_size`` is ``K (2 S + 3)``. concat: the K slots, then the K goal slots, in
    # slot order (``2 K S``): the order of the goal's slots is arbitrary, so a head must learn
    # which goal slot belongs to which slot (on blocks:push-1 its reward error stayed above a
    # constant predictor's, results/slots-actor-critic-push-1).
    goal_pairing: Literal["matched", "concat"] = "matched"

    def __post_init__(self) -> None:
        if self.slot_init not in SLOT_INITS:
            raise ValueError(f"slot_init: expected one of {SLOT_INITS}, got {self.slot_init!r}")
        if self.inference not in INFERENCE_MODES:
            raise ValueError(
                f"inference: expected one of {INFERENCE_MODES}, got {self.inference!r}"
            )
        if self.representation not in REPRESENTATIONS:
            raise ValueError(
                f"representation: expected one of {REPRESENTATIONS}, got {self.representation!r}"
            )
        if self.goal_pairing not in GOAL_PAIRINGS:
            raise ValueError(
                f"goal_pairing: expected one of {GOAL_PAIRINGS}, got {self.goal_pairing!r}"
            )
        if self.cpc_temperature <= 0:
            raise ValueError(f"cpc_temperature: must be > 0, got {self.cpc_temperature}")
        if self.slots < 1 or self.iterations < 1:
            raise ValueError(f"slots and iterations must be >= 1, got {self}")
        if self.interaction_topk < 0 or self.interaction_topk > max(0, self.slots - 1):
            raise ValueError(
                f"interaction_topk={self.interaction_topk}: must be 0 (all partners) or at most "
                f"slots - 1 = {self.slots - 1}"
            )


def position_grid(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Pixel-centre coordinates ``[H, W, 4]``: ``(y, x, 1 - y, 1 - x)`` in ``[0, 1]``."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([y, x, 1.0 - y, 1.0 - x], -1)


def farthest_tokens(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """Farthest-point sampling of ``count`` tokens per image: first the token farthest from the
    mean, then each time the token farthest from all picked so far (on detached features; a
    deterministic choice that does not depend on the order of the tokens).

    Shapes: ``tokens [N, M, C]`` -> indices ``[N, count]``.
    """
    feats = tokens.detach()
    N = feats.shape[0]
    rows = torch.arange(N, device=feats.device)
    dist = (feats - feats.mean(1, keepdim=True)).square().sum(-1)  # [N, M]
    picked = []
    for k in range(count):
        index = dist.argmax(-1)  # [N]
        picked.append(index)
        gap = (feats - feats[rows, index][:, None]).square().sum(-1)
        dist = gap if k == 0 else torch.minimum(dist, gap)
    return torch.stack(picked, 1)


class SlotEncoder(nn.Module):
    """CNN + soft position embedding + per-token MLP.

    Shapes: ``[N, 3, H, W]`` -> ``(tokens [N, M, depth], colours [N, M, 3])`` with ``M =
    (H // 2) * (W // 2)``: the tokens slot attention reads, and the mean colour of each
    token's 2 x 2 cell (where ``farthest_tokens`` seeds fresh slots).
    """

    def __init__(self, image_shape: tuple[int, int, int], depth: int, factory: LayerFactory):
        super().__init__()
        channels, height, width = image_shape
        if height % 2 or width % 2:
            raise ValueError(f"image sides must be even, got {image_shape}")
        self.image_shape = tuple(image_shape)
        f = factory.scope("encoder")
        self.convs = nn.Sequential(
            f.conv2d(channels, depth, 5, 1, 2, name="conv0"),
            nn.ReLU(),
            f.conv2d(depth, depth, 5, 2, 2, name="conv1"),
            nn.ReLU(),
            f.conv2d(depth, depth, 3, 1, 1, name="conv2"),
            nn.ReLU(),
        )
        self.register_buffer("grid", position_grid(height // 2, width // 2), persistent=False)
        self.pos = f.linear(4, depth, name="pos")
        self.norm = nn.LayerNorm(depth)
        self.mlp = nn.Sequential(
            f.linear(depth, depth, name="mlp.0"), nn.ReLU(), f.linear(depth, depth, name="mlp.1")
        )
        self.out_dim = depth

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert pixels.dim() == 4 and tuple(pixels.shape[1:]) == self.image_shape, (
            f"SlotEncoder: expected pixels [N, {self.image_shape}], got {tuple(pixels.shape)}"
        )
        x = self.convs(pixels).permute(0, 2, 3, 1) + self.pos(self.grid)  # [N, H/2, W/2, C]
        colours = F.avg_pool2d(pixels, 2).flatten(2).transpose(1, 2)
        return self.mlp(self.norm(x.flatten(1, 2))), colours


def frame_logits(coords: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Gaussian log-density (up to a constant) of positions ``coords [..., P, 2]`` under each
    slot's frame ``frames [N, K, 4]`` (``(y, x, sy, sx)``): ``[N, P, K]``."""
    center = frames[:, None, :, :2]
    scale = frames[:, None, :, 2:].clamp(min=MIN_SCALE)
    return -0.5 * ((coords[..., None, :] - center) / scale).square().sum(-1)


def token_frames(weights: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Each slot's frame from its weights over tokens ``[N, M, K]`` (summing to 1 over M) and
    the token positions ``coords [M, 2]``: mean and standard deviation, ``[N, K, 4]``."""
    centers = torch.einsum("nmk,mc->nkc", weights, coords)
    spread = torch.einsum("nmk,nmkc->nkc", weights, (coords[:, None] - centers[:, None]) ** 2)
    return torch.cat([centers, (spread + 1e-6).sqrt()], -1)


def normalize_slots(slots: torch.Tensor, slot_dim: int) -> torch.Tensor:
    """The canonical slot state: features ``[..., :slot_dim]`` layer-normalised (no affine:
    unit RMS) and the frame ``(y, x, sy, sx)`` clamped to the image and to scales in
    ``[MIN_SCALE, 1]``. Slot attention's output, fresh slots and the dynamics' predictions all
    pass through it. Why: the posterior of step ``t`` is refined from the prior of step
    ``t``, and the dynamics is trained toward that posterior; with unbounded features this
    loop can chase itself (the prior grows, so its refinement grows, so the target grows)
    and the slot magnitudes run away to 1e7 within a few thousand updates."""
    features = F.layer_norm(slots[..., :slot_dim], (slot_dim,))
    frames = slots[..., slot_dim:]
    center = frames[..., :2].clamp(0.0, 1.0)
    scale = frames[..., 2:].clamp(MIN_SCALE, 1.0)
    return torch.cat([features, center, scale], -1)


# Up to this many slots the optimal matching is found by scoring every permutation on the
# tensors' own device (K! x K entries per problem: 720 x 6 at K = 6), batched and with no host
# round trip; above it by scipy's Hungarian algorithm on the CPU, one problem at a time.
EXACT_MATCHING_MAX_SLOTS = 6
# Problems per permutation-scoring chunk: bounds the [chunk, K!, K] gather to about 16M entries.
_MATCHING_CHUNK_ENTRIES = 1 << 24
_permutation_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _permutations(K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``K!`` permutations of ``range(K)``: ``[K!, K]`` long, and as one-hot assignment
    matrices flattened to ``[K * K, K!]`` (float), so that a batch of flattened ``[K, K]`` cost
    matrices times it is every assignment's total cost in one matmul."""
    key = (K, device)
    if key not in _permutation_cache:
        perms = torch.tensor(list(itertools.permutations(range(K))), dtype=torch.long)
        onehot = torch.zeros(len(perms), K, K)
        onehot[torch.arange(len(perms))[:, None], torch.arange(K), perms] = 1.0
        _permutation_cache[key] = (perms.to(device), onehot.flatten(1).T.contiguous().to(device))
    return _permutation_cache[key]


def hungarian_order(costs: torch.Tensor) -> torch.Tensor:
    """For each ``[K, K]`` matrix of ``costs [..., K, K]`` the minimum-cost one-to-one
    assignment: index ``[..., K]``, entry k the column assigned to row k. No gradient.

    ``K <= EXACT_MATCHING_MAX_SLOTS``: every permutation is scored on the costs' device (the
    same optimum as the Hungarian algorithm; among equal-cost assignments the first in
    lexicographic order), so planning and the training losses match slots without a host
    sync. Larger K: ``scipy.optimize.linear_sum_assignment`` on the CPU."""
    K = costs.shape[-1]
    assert costs.shape[-2] == K, f"hungarian_order: costs must be [..., K, K], got {costs.shape}"
    flat = costs.detach().reshape(-1, K, K).float()
    if K <= EXACT_MATCHING_MAX_SLOTS:
        perms, onehot = _permutations(K, flat.device)  # [P, K], [K * K, P]
        chunk = max(1, _MATCHING_CHUNK_ENTRIES // perms.numel())
        orders = []
        for part in flat.split(chunk):
            totals = part.flatten(1) @ onehot  # [M, P]: the cost of every assignment
            orders.append(perms[totals.argmin(-1)])
        order = torch.cat(orders) if orders else flat.new_zeros((0, K), dtype=torch.long)
        return order.reshape(*costs.shape[:-1])
    from scipy.optimize import linear_sum_assignment

    matrices = flat.cpu().numpy()
    order = torch.empty(matrices.shape[0], K, dtype=torch.long)
    for i, matrix in enumerate(matrices):
        rows_, cols = linear_sum_assignment(matrix)
        order[i, torch.as_tensor(rows_)] = torch.as_tensor(cols)
    return order.reshape(*costs.shape[:-1]).to(costs.device)


def matching_order(reference: torch.Tensor, slots: torch.Tensor, error) -> torch.Tensor:
    """Index ``[..., K]``: entry k is the slot of ``slots [..., K, S]`` matched to
    ``reference[..., k, :]`` by ``hungarian_order`` under ``error(a, b) -> (cost [...], ...)``."""
    with torch.no_grad():
        return hungarian_order(error(reference[..., :, None, :], slots[..., None, :, :])[0])


def match_slots(reference: torch.Tensor, slots: torch.Tensor, error) -> torch.Tensor:
    """``slots [..., K, S]`` reordered so that slot k is the one matched to ``reference[...,
    k, :]`` (``matching_order``). No gradient flows through the choice of the matching."""
    order = matching_order(reference, slots, error)
    return slots.gather(-2, order[..., None].expand_as(slots))


class SlotAttention(nn.Module):
    """Slot attention refinement (see the module docstring), with a spatial prior.

    Each slot carries a frame ``(y, x, sy, sx)``: the mean and standard deviation of the
    positions of the tokens it attends to. The attention logits add the frame's Gaussian
    log-density of each token's position, so a slot attends around where it is (a spatial
    mixture model's E-step); learned features can outweigh it. Slots starting at distinct
    places therefore hold distinct regions from the first update on, instead of all starting
    with the same uniform attention.

    Shapes: ``forward(tokens [N, M, C], slots [N, K, D], frames [N, K, 4], iterations,
    coords [M, 2])`` -> ``(slots [N, K, D], frames [N, K, 4], attention [N, M, K])``, the
    last iteration's attention (each token's weights over slots sum to 1).
    """

    def __init__(
        self, in_dim: int, slot_dim: int, hidden: int, implicit: bool, factory: LayerFactory
    ):
        super().__init__()
        f = factory.scope("slot_attention")
        self.slot_dim, self.implicit = slot_dim, implicit
        self.norm_tokens = nn.LayerNorm(in_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.norm_mlp = nn.LayerNorm(slot_dim)
        self.to_k = f.linear(in_dim, slot_dim, name="k", bias=False)
        self.to_v = f.linear(in_dim, slot_dim, name="v", bias=False)
        self.to_q = f.linear(slot_dim, slot_dim, name="q", bias=False)
        # GRU cell from factory-built linears (so a sparse factory reaches them too).
        self.gru_x = f.linear(slot_dim, 3 * slot_dim, name="gru.x")
        self.gru_h = f.linear(slot_dim, 3 * slot_dim, name="gru.h")
        self.mlp = nn.Sequential(
            f.linear(slot_dim, hidden, name="mlp.0"),
            nn.ReLU(),
            f.linear(hidden, slot_dim, name="mlp.1"),
        )
        self.scale = slot_dim**-0.5

    def _gru(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        xr, xz, xn = self.gru_x(x).chunk(3, -1)
        hr, hz, hn = self.gru_h(h).chunk(3, -1)
        reset = torch.sigmoid(xr + hr)
        update = torch.sigmoid(xz + hz)
        candidate = torch.tanh(xn + reset * hn)
        return (1.0 - update) * candidate + update * h

    def _step(self, k, v, slots, frames, coords):
        q = self.to_q(self.norm_slots(slots))  # [N, K, D]
        logits = torch.einsum("nmd,nkd->nmk", k, q) * self.scale + frame_logits(coords, frames)
        attn = logits.softmax(-1)  # slots compete for each token
        weights = attn / (attn.sum(1, keepdim=True) + 1e-8)  # weighted mean over tokens
        updates = torch.einsum("nmk,nmd->nkd", weights, v)
        slots = self._gru(updates, slots)
        slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, token_frames(weights, coords), attn

    def forward(
        self,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        frames: torch.Tensor,
        iterations: int,
        coords: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert (
            tokens.dim() == 3
            and slots.dim() == 3
            and frames.shape == (*slots.shape[:2], 4)
            and tokens.shape[0] == slots.shape[0]
        ), (
            f"SlotAttention: expected tokens [N, M, C], slots [N, K, D] and frames [N, K, 4], "
            f"got {tuple(tokens.shape)}, {tuple(slots.shape)} and {tuple(frames.shape)}"
        )
        tokens = self.norm_tokens(tokens)
        k, v = self.to_k(tokens), self.to_v(tokens)
        init, init_frames = slots, frames
        attn = tokens.new_zeros(0)
        for i in range(iterations):
            if self.implicit and i == iterations - 1 and torch.is_grad_enabled():
                # Detach the fixed-point iterate but keep a straight-through path to the init.
                slots = slots.detach() + init - init.detach()
                frames = frames.detach() + init_frames - init_frames.detach()
            slots, frames, attn = self._step(k, v, slots, frames, coords)
        return slots, frames, attn


class BroadcastDecoder(nn.Module):
    """Spatial-broadcast decoder: per slot RGB ``[..., 3, H, W]`` and a mask logit.

    Each slot is drawn in its own frame (position and scale, as in invariant slot attention,
    Biza et al. 2023): the broadcast grid carries coordinates relative to the slot's position,
    divided by its scale, and the mask logit gets a Gaussian prior ``-|relative|^2 / 2``. A
    slot then starts out responsible for the region around it, which breaks the early plateau
    in which every slot draws the whole scene and nothing learns which slot holds what.

    Shapes: ``forward(z [N, K, D], frame [N, K, 4])`` -> ``rgb [N, K, 3, H, W]``, ``logits
    [N, K, 1, H, W]``; a frame is ``(y, x, sy, sx)`` in ``[0, 1]`` image units.
    """

    def __init__(
        self,
        slot_dim: int,
        image_shape: tuple[int, int, int],
        depth: int,
        broadcast: int,
        factory: LayerFactory,
    ):
        super().__init__()
        channels, height, width = image_shape
        if height != width:
            raise ValueError(f"BroadcastDecoder needs square images, got {image_shape}")
        ups, side = 0, broadcast
        while side < height:
            side, ups = side * 2, ups + 1
        if side != height:
            raise ValueError(
                f"image size {height} must be the broadcast grid ({broadcast}) times a power of "
                f"2; set op3.broadcast to a divisor like {height // 8 if height >= 8 else 1}"
            )
        f = factory.scope("decoder")
        self.channels, self.broadcast = channels, broadcast
        grid = position_grid(broadcast, broadcast)[..., :2]
        self.register_buffer("grid", grid, persistent=False)
        pixels = position_grid(height, width)[..., :2]
        self.register_buffer("pixel_grid", pixels, persistent=False)
        self.pos = f.linear(4, slot_dim, name="pos")
        layers: list[nn.Module] = [f.conv2d(slot_dim, depth, 3, 1, 1, name="conv0"), nn.ReLU()]
        c = depth
        for i in range(ups):
            out = depth if i < ups - 1 else max(8, depth // 2)
            # kernel 4, stride 2, padding 1 doubles the side exactly.
            layers += [f.conv_transpose2d(c, out, 4, 2, 1, name=f"up{i}"), nn.ReLU()]
            c = out
        layers.append(f.conv2d(c, channels + 1, 3, 1, 1, name="out"))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, K, D = z.shape
        center = frame[:, :, None, None, :2]
        scale = frame[:, :, None, None, 2:].clamp(min=MIN_SCALE)
        relative = (self.grid - center) / scale  # [N, K, r, r, 2]
        absolute = self.grid.expand_as(relative)
        x = z[:, :, None, None, :] + self.pos(torch.cat([relative, absolute], -1))
        out = self.net(x.flatten(0, 1).permute(0, 3, 1, 2))  # [NK, C + 1, H, W]
        out = out.reshape(N, K, *out.shape[1:])
        prior = frame_logits(self.pixel_grid.flatten(0, 1), frame)  # [N, HW, K]
        prior = prior.transpose(1, 2).unflatten(-1, self.pixel_grid.shape[:2])
        return out[:, :, : self.channels], out[:, :, self.channels :] + prior[:, :, None]


def fourier_positions(centers: torch.Tensor) -> torch.Tensor:
    """``centers [..., 2]`` (image units) -> ``[..., 4 * POSITION_FREQUENCIES]``: sin and cos
    of ``2^f * pi * c`` for ``f < POSITION_FREQUENCIES``."""
    scales = torch.pi * 2.0 ** torch.arange(POSITION_FREQUENCIES, device=centers.device)
    angles = (centers[..., None] * scales).flatten(-2)
    return torch.cat([angles.sin(), angles.cos()], -1)


class SlotDynamics(nn.Module):
    """One transition for all slots: action attention, pairwise interactions, residual update.

    The last 4 numbers of a slot are its frame ``(y, x, sy, sx)``. The action attention is a
    sigmoid of a scaled dot product between a query from the action and a key from the slot's
    features and Fourier features of its position (``fourier_positions``).

    Shapes: ``forward(slots [N, K, D], action [N, A])`` -> ``(slots [N, K, D], info)`` with
    ``info["action_weight"] [N, K]`` (how much the action acts on each slot) and
    ``info["interaction_weight"] [N, K, K]`` (row k: how much each other slot acts on k; zero
    on the diagonal and, with ``topk``, outside each row's ``topk`` strongest partners).
    """

    def __init__(
        self, slot_dim: int, action_dim: int, hidden: int, topk: int, factory: LayerFactory
    ):
        super().__init__()
        f = factory.scope("dynamics")
        D, H = slot_dim, hidden
        self.topk = topk
        self.norm = nn.LayerNorm(D)

        def mlp(i: int, o: int, name: str) -> nn.Sequential:
            return nn.Sequential(
                f.linear(i, H, name=f"{name}.0"), nn.ReLU(), f.linear(H, o, name=f"{name}.1")
            )

        self.action_embed = mlp(action_dim, H, "action_embed")
        # Action attention: a query from the action against a key from each slot's features
        # and Fourier features of its position, so "does the action act where this slot is"
        # is a dot product rather than a comparison an MLP has to discover.
        P = 4 * POSITION_FREQUENCIES
        self.action_query = f.linear(H, H, name="action_query")
        self.action_key = mlp(D + P, H, "action_key")
        self.action_effect = mlp(D + P + H, D, "action_effect")
        self.pair = mlp(2 * D, H, "pair")
        self.pair_gate = f.linear(H, 1, name="pair_gate")
        self.pair_effect = f.linear(H, D, name="pair_effect")
        self.update = mlp(3 * D, D, "update")

    def forward(
        self, slots: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert slots.dim() == 3 and action.dim() == 2 and slots.shape[0] == action.shape[0], (
            f"SlotDynamics: expected slots [N, K, D] and action [N, A], got "
            f"{tuple(slots.shape)} and {tuple(action.shape)}"
        )
        N, K, D = slots.shape
        h = self.norm(slots)
        hp = torch.cat([h, fourier_positions(slots[..., -4:-2])], -1)
        act = self.action_embed(action.to(h.dtype))  # [N, H]
        query = self.action_query(act)[:, None]  # [N, 1, H]
        logits = (self.action_key(hp) * query).sum(-1) * query.shape[-1] ** -0.5
        # A floor on the gate: a plain sigmoid gate closes on every slot within a few hundred
        # updates (most transitions move nothing, and the untrained effect only adds error),
        # after which the effect it gates gets no gradient and never learns (measured).
        action_weight = ACTION_GATE_FLOOR + (1.0 - ACTION_GATE_FLOOR) * torch.sigmoid(logits)
        hpa = torch.cat([hp, act[:, None].expand(N, K, -1)], -1)
        action_effect = action_weight[..., None] * self.action_effect(hpa)
        if K > 1:
            pairs = torch.cat(
                [h[:, :, None].expand(N, K, K, D), h[:, None, :].expand(N, K, K, D)], -1
            )
            p = self.pair(pairs)  # [N, K, K, H]: features of "j acts on k" at [k, j]
            logits = self.pair_gate(p)[..., 0]
            keep = ~torch.eye(K, dtype=torch.bool, device=slots.device).expand(N, K, K)
            if 0 < self.topk < K - 1:
                masked = logits.masked_fill(~keep, float("-inf"))
                top = masked.topk(self.topk, -1).indices
                keep = torch.zeros_like(keep).scatter_(-1, top, True)
            weight = torch.sigmoid(logits) * keep
            interaction = (weight[..., None] * self.pair_effect(p)).sum(2)
        else:
            weight = slots.new_zeros(N, K, K)
            interaction = torch.zeros_like(slots)
        delta = self.update(torch.cat([h, action_effect, interaction], -1))
        return slots + delta, {"action_weight": action_weight, "interaction_weight": weight}


class SlotWorldModel(nn.Module):
    """Encoder, slot attention, decoder and dynamics (and with ``spec.heads`` reward and
    continue heads); ``observe``, ``loss``, ``segment``, and the ``WorldModelInterface``
    (``loss_and_states``, ``rollout``, ``imagine``, ``feat``, ``reward``, ``continue_prob``)
    over states ``{"slots": [..., K, S]}``. ``image_shape`` is ``(3, H, W)``; ``factory``
    builds every weight layer."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        action_dim: int,
        spec: SlotSpec | None = None,
        factory: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        self.spec = s = spec or SlotSpec()
        self.image_shape = tuple(image_shape)
        channels, height, width = self.image_shape
        side = s.resolution or height
        if height != width or height % side:
            raise ValueError(
                f"op3.resolution={s.resolution}: the model needs square frames whose side is a "
                f"multiple of it, got frames {self.image_shape}"
            )
        self.model_shape = (channels, side, side)
        self.action_dim = action_dim
        factory = factory or LayerFactory(norm="layer", act="relu")
        f = factory.scope("op3")
        self.encoder = SlotEncoder(self.model_shape, s.cnn_depth, f)
        self.attention = SlotAttention(s.cnn_depth, s.slot_dim, s.hidden, s.implicit, f)
        self.decoder = BroadcastDecoder(
            s.slot_dim, self.model_shape, s.decoder_depth, s.broadcast, f
        )
        self.dynamics = SlotDynamics(self.state_dim, action_dim, s.hidden, s.interaction_topk, f)
        grid = self.encoder.grid[..., :2].flatten(0, 1)  # token centres (y, x)
        self.register_buffer("token_coords", grid.clone(), persistent=False)
        self.background: nn.Parameter | None = None
        if s.background:
            self.background = nn.Parameter(torch.zeros(channels + 1, side, side))
        if s.slot_init == "learned":
            self.init_slots = nn.Parameter(torch.randn(s.slots, s.slot_dim) * s.slot_dim**-0.5)
        elif s.slot_init == "farthest":
            self.init_norm = nn.LayerNorm(s.cnn_depth)  # tokens -> slot features
            self.init_proj = f.linear(s.cnn_depth, s.slot_dim, name="init")
        else:
            self.init_mean = nn.Parameter(torch.randn(1, s.slot_dim) * s.slot_dim**-0.5)
            self.init_log_std = nn.Parameter(torch.zeros(1, s.slot_dim))
        # Built last and only when used: a reconstruction model's weights, checkpoints and
        # random draws stay what they were before loss/cpc existed.
        self.cpc: SlotCPC | None = None
        if s.representation != "reconstruction":
            features = s.slot_dim + 4 * POSITION_FREQUENCIES + 2
            self.cpc = SlotCPC(features, s.cpc_dim, s.cpc_temperature, f.scope("cpc"))
        # Built after everything else and only with spec.heads, for the same reason.
        self.reward_head: nn.Sequential | None = None
        self.continue_head: nn.Sequential | None = None
        if s.heads:
            # The reward head's output starts at zero (DreamerV3's): a predicted return of 0
            # until the head has learned anything, rather than noise a planner would chase.
            self.reward_head = self._head("reward", f, outscale=0.0)
            self.continue_head = self._head("continue", f)
        # The pooling scores of goal_pairing=matched (one per slot pair and pooled token).
        self.goal_attention: nn.Module | None = None
        if s.goal_features and s.goal_pairing == "matched":
            self.goal_attention = f.linear(self.pair_size, s.slots, name="goal_attention")

    def _head(self, name: str, factory: LayerFactory, outscale: float = 1.0) -> nn.Sequential:
        """An MLP ``[..., feat_size]`` -> ``[..., 1]`` (layers ``op3.<name>.0``, ``.out``)."""
        hidden = self.spec.hidden
        return nn.Sequential(
            factory.linear(self.feat_size, hidden, name=f"{name}.0"),
            nn.ReLU(),
            factory.linear(hidden, 1, name=f"{name}.out", outscale=outscale),
        )

    @property
    def num_slots(self) -> int:
        return self.spec.slots

    @property
    def state_dim(self) -> int:
        """Size of one slot's state: ``slot_dim`` features, then its frame ``(y, x, sy, sx)``
        (position and scale in image units)."""
        return self.spec.slot_dim + 4

    @property
    def pair_size(self) -> int:
        """Size of one (slot, goal slot) pair of ``goal_pairing=matched``: ``2 S + 3``."""
        return 2 * self.state_dim + 3

    @property
    def feat_size(self) -> int:
        """Size of ``feat``: the K slot states; with ``spec.goal_features`` also the K goal
        slots (``concat``: ``2 K S``) or K pooled slot-goal pairs (``matched``: ``K (2 S + 3)``)."""
        K, S = self.spec.slots, self.state_dim
        if not self.spec.goal_features:
            return K * S
        return K * self.pair_size if self.spec.goal_pairing == "matched" else 2 * K * S

    # ---------------------------------------------------------------------------------
    def initial(self, tokens: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
        """Starting slots ``[N, K, S]`` for first frames: tokens ``[N, M, C]`` and their
        colours ``[N, M, 3]`` (see ``SlotEncoder``)."""
        s = self.spec
        N = tokens.shape[0]
        center = tokens.new_tensor([0.5, 0.5, 0.3, 0.3]).expand(N, s.slots, 4)
        if s.slot_init == "learned":
            slots = torch.cat([self.init_slots[None].expand(N, -1, -1), center], -1)
            return normalize_slots(slots, s.slot_dim)
        if s.slot_init == "gaussian":
            noise = torch.randn(N, s.slots, s.slot_dim, device=tokens.device)
            slots = torch.cat([self.init_mean + self.init_log_std.exp() * noise, center], -1)
            return normalize_slots(slots, s.slot_dim)
        index = farthest_tokens(colours, s.slots)  # [N, K]
        normed = self.init_norm(tokens)
        picked = normed.gather(1, index[..., None].expand(-1, -1, normed.shape[-1]))
        scale = tokens.new_full((N, s.slots, 2), INIT_SCALE)
        slots = torch.cat([self.init_proj(picked), self.token_coords[index], scale], -1)
        return normalize_slots(slots, s.slot_dim)

    def resize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frames ``[N, 3, H, W]`` at the model's resolution (area average)."""
        side = self.model_shape[-1]
        if pixels.shape[-1] == side:
            return pixels
        return F.adaptive_avg_pool2d(pixels, side)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [N, M, C], colours [N, M, 3])`` of frames ``[N, 3, H, W]`` (any multiple
        of the resolution); see ``SlotEncoder``."""
        return self.encoder(self.resize(pixels))

    def refine(
        self, tokens: torch.Tensor, slots: torch.Tensor, iterations: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot attention from ``slots [N, K, S]`` on ``tokens [N, M, C]``: ``(slots [N, K,
        S], attention [N, M, K])``; see ``SlotAttention``."""
        D = self.spec.slot_dim
        z, frames, attn = self.attention(
            tokens,
            slots[..., :D],
            slots[..., D:],
            iterations or self.spec.iterations,
            self.token_coords,
        )
        return normalize_slots(torch.cat([z, frames], -1), D), attn

    def infer(
        self, pixels: torch.Tensor, init: torch.Tensor | None = None, iterations: int | None = None
    ) -> torch.Tensor:
        """Slots ``[N, K, S]`` of single frames ``[N, 3, H, W]`` (fresh starting slots unless
        ``init`` is given)."""
        tokens, colours = self.encode(pixels)
        if init is None:
            init = self.initial(tokens, colours)
        return self.refine(tokens, init, iterations)[0]

    def decode(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Slots ``[..., K, S]`` -> the mixture's components ``rgb [..., C, 3, h, w]``, mask
        ``logits`` and ``masks [..., C, 1, h, w]`` (softmax over components: they sum to one
        at every pixel) and the mixture ``image [..., 3, h, w]``, at the model's resolution.
        The components are the K slots, after the background layer when there is one
        (``C = K + 1``, background first; ``num_components``)."""
        lead = slots.shape[:-2]
        flat = slots.reshape(-1, *slots.shape[-2:])
        D = self.spec.slot_dim
        rgb, logits = self.decoder(flat[..., :D], flat[..., D:])
        if self.background is not None:
            N = flat.shape[0]
            back = self.background[None, None].expand(N, 1, *self.background.shape)
            rgb = torch.cat([back[:, :, :-1], rgb], 1)
            logits = torch.cat([back[:, :, -1:], logits], 1)
        masks = logits.softmax(1)
        image = (masks * rgb).sum(1)
        out = {"rgb": rgb, "logits": logits, "masks": masks, "image": image}
        return {k: v.reshape(*lead, *v.shape[1:]) for k, v in out.items()}

    @property
    def num_components(self) -> int:
        """Mixture components of ``decode``/``segment``: the slots, plus the background."""
        return self.spec.slots + int(self.background is not None)

    def transition(self, slots: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Slots after ``action``: ``[N, K, S]``, ``[N, A]`` -> ``[N, K, S]``."""
        return normalize_slots(self.dynamics(slots, action)[0], self.spec.slot_dim)

    @torch.no_grad()
    def segment(self, pixels: torch.Tensor) -> torch.Tensor:
        """Mixture masks ``[N, C, H, W]`` of single frames ``[N, 3, H, W]`` (floats in
        ``[-0.5, 0.5]``), at the frames' size, ``C = num_components`` (background first when
        there is one); ``argmax`` over ``C`` gives a segmentation."""
        logits = self.decode(self.infer(pixels))["logits"][:, :, 0]
        if logits.shape[-2:] != pixels.shape[-2:]:
            logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear")
        return logits.softmax(1)

    # ---------------------------------------------------------------------------------
    def observe(
        self,
        pixels: torch.Tensor,
        action: torch.Tensor,
        is_first: torch.Tensor,
        state: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Filter a sequence: ``pixels [B, T, 3, H, W]``, ``action [B, T, A]`` (taken at each
        step), ``is_first [B, T]``; ``state`` (``slots [B, K, S]``, ``action [B, A]``) carries
        the previous call's last posterior and action. Returns ``post`` and ``prior`` slots
        ``[B, T, K, S]``, ``has_prior [B, T]`` (1 where ``prior`` is a dynamics prediction) and
        the slot attention of every step ``attention [B, T, M, K]``.
        """
        B, T = pixels.shape[:2]
        assert action.shape[:2] == (B, T) and is_first.shape == (B, T), (
            f"observe: pixels {tuple(pixels.shape)}, action {tuple(action.shape)} and is_first "
            f"{tuple(is_first.shape)} must share [B, T]"
        )
        if self.spec.inference == "fresh":
            return self._observe_fresh(pixels, action, is_first, state)
        tokens, colours = self.encode(pixels.flatten(0, 1))
        tokens, colours = tokens.unflatten(0, (B, T)), colours.unflatten(0, (B, T))
        first = is_first.float().clone()
        if state is None:
            first[:, 0] = 1.0  # nothing to predict the first step from
            slots = action.new_zeros(B, self.spec.slots, self.state_dim)
            prev_action = action.new_zeros(B, self.action_dim)
        else:
            slots, prev_action = state["slots"], state["action"]
        posts, priors, attns = [], [], []
        for t in range(T):
            if t > 0:
                prev_action = action[:, t - 1]
            keep = (1.0 - first[:, t])[:, None, None]
            source = slots if self.spec.dynamics_trains_perception else slots.detach()
            predicted = self.transition(source, prev_action.float())
            prior = keep * predicted + (1.0 - keep) * self.initial(tokens[:, t], colours[:, t])
            slots, attn = self.refine(tokens[:, t], prior)
            priors.append(prior)
            posts.append(slots)
            attns.append(attn)
        return {
            "post": torch.stack(posts, 1),
            "prior": torch.stack(priors, 1),
            "has_prior": 1.0 - first,
            "attention": torch.stack(attns, 1),
        }

    def _observe_fresh(self, pixels, action, is_first, state):
        """``observe`` with per-frame inference: every frame's slots come from the frame alone
        (all frames in one batch), and the prior of step ``t`` is the dynamics applied to the
        posterior of ``t - 1`` (so the prior's slot order follows ``t - 1``'s, not ``t``'s:
        ``loss`` matches them)."""
        B, T = pixels.shape[:2]
        tokens, colours = self.encode(pixels.flatten(0, 1))
        post, attention = self.refine(tokens, self.initial(tokens, colours))
        post, attention = post.unflatten(0, (B, T)), attention.unflatten(0, (B, T))
        first = is_first.float().clone()
        if state is None:
            first[:, 0] = 1.0
            before = post[:, :1]  # placeholder; step 0 has no prior
            before_action = action[:, :1]
        else:
            before = state["slots"][:, None]
            before_action = state["action"][:, None]
        previous = torch.cat([before, post[:, :-1]], 1)  # posterior of t - 1: [B, T, K, S]
        if not self.spec.dynamics_trains_perception:
            previous = previous.detach()
        previous_action = torch.cat([before_action, action[:, :-1]], 1).float()
        predicted = self.transition(previous.flatten(0, 1), previous_action.flatten(0, 1))
        keep = (1.0 - first)[..., None, None]
        prior = keep * predicted.unflatten(0, (B, T)) + (1.0 - keep) * post
        return {"post": post, "prior": prior, "has_prior": 1.0 - first, "attention": attention}

    def cpc_features(self, slots: torch.Tensor) -> torch.Tensor:
        """What ``loss/cpc`` projects of a slot ``[..., S]``: its features, Fourier features of
        its centre (``fourier_positions``: a linear map of raw coordinates in [0, 1] could
        hardly tell two nearby positions apart) and its scale; ``[..., D + 4P + 2]``."""
        D = self.spec.slot_dim
        return torch.cat(
            [slots[..., :D], fourier_positions(slots[..., D : D + 2]), slots[..., D + 2 :]], -1
        )

    def cpc_loss(
        self, prior: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss/cpc`` (``SlotCPC``) of predicted slots ``prior [B, T, K, S]`` against the
        inferred slots ``target [B, T, K, S]`` *already matched to them* (slot k of
        ``target[b, t]`` is the one paired with ``prior[b, t, k]``); ``weight [B, T, K]``
        weighs each predicted slot as an anchor (0 where there is no prediction or the slot
        draws nothing). The candidates for each anchor are all ``B * T * K`` inferred slots of
        the batch: the positive, the other slots of the same frame, and every slot of every
        other frame (other samples and other time steps, including those without a
        prediction). The set of candidates, hence the loss, does not depend on the order of the
        slots. Returns ``(loss, metrics)`` with ``cpc_accuracy_k1``, ``cpc_mi_bound_k1`` and
        ``cpc_mi_bound`` (``log(B T K) - loss``)."""
        if self.cpc is None:
            raise ValueError("cpc_loss needs representation=reconstruction+cpc or cpc")
        return self.cpc(self.cpc_features(prior), self.cpc_features(target), weight)

    # ---------------------------------------------------------------------------------
    # WorldModelInterface: prediction from slot states
    # ---------------------------------------------------------------------------------
    def _check_start(self, start: State, where: str) -> tuple[torch.Tensor, State]:
        """``start["slots"] [N, K, S]`` and the keys carried unchanged (``goal [N, K, S]``)."""
        slots = start["slots"]
        K, S = self.num_slots, self.state_dim
        assert slots.dim() == 3 and tuple(slots.shape[1:]) == (K, S), (
            f"{where}: expected start slots [N, {K}, {S}], got {tuple(slots.shape)}"
        )
        carried = {k: v for k, v in start.items() if k not in _STEP_KEYS}
        for key, value in carried.items():
            assert value.shape[0] == slots.shape[0], (
                f"{where}: start {key!r} {tuple(value.shape)} and slots {tuple(slots.shape)} "
                "must share [N]"
            )
        return slots, carried

    @staticmethod
    def _carry(carried: State, steps: int) -> State:
        """The carried keys ``[N, ...]`` repeated along ``steps``: ``[N, steps, ...]`` views."""
        return {k: v[:, None].expand(v.shape[0], steps, *v.shape[1:]) for k, v in carried.items()}

    def rollout(self, start: State, actions: torch.Tensor) -> State:
        """Open loop: the slots after each of ``actions`` from ``start`` (not included), plus
        the start's other keys (e.g. ``goal``) repeated at every step.

        Shapes: ``start`` ``slots [N, K, S]`` (``goal [N, K, S]``...), ``actions [N, H, A]``
        -> ``slots [N, H, K, S]`` (``goal [N, H, K, S]``...).
        """
        slots, carried = self._check_start(start, "rollout")
        assert actions.dim() == 3 and actions.shape[0] == slots.shape[0], (
            f"rollout: expected actions [N, H, {self.action_dim}] for {slots.shape[0]} starts, "
            f"got {tuple(actions.shape)}"
        )
        steps = []
        for t in range(actions.shape[1]):
            slots = self.transition(slots, actions[:, t])
            steps.append(slots)
        out = {"slots": torch.stack(steps, 1) if steps else slots[:, None][:, :0]}
        out.update(self._carry(carried, actions.shape[1]))
        return out

    def imagine(self, policy: Policy, start: State, horizon: int) -> State:
        """Closed loop: ``horizon`` steps of ``policy(state) -> action [N, A]``, each state
        ``slots [N, K, S]`` plus the start's other keys (``goal``), moved by the dynamics.

        Shapes: ``start`` ``slots [N, K, S]`` -> ``slots [N, H + 1, K, S]`` (index 0 is the
        start), ``action [N, H, A]``, and every other start key repeated ``[N, H + 1, ...]``.
        """
        slots, carried = self._check_start(start, "imagine")
        N = slots.shape[0]
        states, actions = [slots], []
        for _ in range(horizon):
            action = policy({"slots": slots, **carried})
            assert tuple(action.shape) == (N, self.action_dim), (
                f"imagine: policy must return actions [{N}, {self.action_dim}], got "
                f"{tuple(action.shape)}"
            )
            slots = self.transition(slots, action)
            states.append(slots)
            actions.append(action)
        out = {
            "slots": torch.stack(states, 1),
            "action": (
                torch.stack(actions, 1) if actions else slots.new_zeros(N, 0, self.action_dim)
            ),
        }
        out.update(self._carry(carried, horizon + 1))
        return out

    def feat(self, state: State) -> torch.Tensor:
        """The features of slot states (the input of the heads, an actor or a critic): the K
        slots concatenated in slot order, then with ``spec.goal_features`` the K goal slots.

        Shapes: ``slots [..., K, S]`` (``goal [..., K, S]``) -> ``[..., feat_size]``.
        """
        slots = state["slots"]
        K, S = self.num_slots, self.state_dim
        assert tuple(slots.shape[-2:]) == (K, S), (
            f"feat: expected slots [..., {K}, {S}], got {tuple(slots.shape)}"
        )
        if ("goal" in state) != self.spec.goal_features:
            has = "carries" if "goal" in state else "has no"
            raise ValueError(
                f"feat: the state {has} 'goal' slots but SlotSpec.goal_features="
                f"{self.spec.goal_features} (feat_size {self.feat_size})"
            )
        if not self.spec.goal_features:
            return slots.flatten(-2)
        goal = state["goal"]
        assert goal.shape == slots.shape, (
            f"feat: goal {tuple(goal.shape)} and slots {tuple(slots.shape)} must match"
        )
        if self.goal_attention is None:
            return torch.cat([slots.flatten(-2), goal.flatten(-2)], -1)
        pairs = self.goal_pairs(slots, goal)  # [..., K, P]
        weights = self.goal_attention(pairs).float().softmax(-2).to(pairs.dtype)  # [..., K, Q]
        return torch.einsum("...kq,...kp->...qp", weights, pairs).flatten(-2)

    def goal_pairs(self, slots: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """Each slot with the goal slot of the same appearance (``match_slots`` under
        ``_feature_error``; no gradient through the choice), then the offset of the goal slot's
        centre from the slot's and its length: ``[slot, goal slot, dy, dx, |d|]``.

        Shapes: ``slots [..., K, S]``, ``goal [..., K, S]`` -> ``[..., K, 2 S + 3]``.
        """
        D = self.spec.slot_dim
        matched = match_slots(slots, goal, self._feature_error)  # row k: slot k's goal slot
        offset = matched[..., D : D + 2] - slots[..., D : D + 2]
        # The epsilon keeps the length's gradient finite where a slot sits on its goal.
        length = (offset.square().sum(-1, keepdim=True) + 1e-8).sqrt()
        return torch.cat([slots, matched, offset, length], -1)

    def _checked_head(self, feat: torch.Tensor, head: nn.Module | None, name: str) -> nn.Module:
        """``head``, after checking that it exists and that ``feat`` is ``[..., feat_size]``."""
        if head is None:
            raise ValueError(f"{name}: this SlotWorldModel has no heads; set SlotSpec.heads=True")
        assert feat.shape[-1] == self.feat_size, (
            f"{name}: expected features [..., {self.feat_size}], got {tuple(feat.shape)}"
        )
        return head

    def reward(self, feat: torch.Tensor) -> torch.Tensor:
        """Predicted reward ``[...]`` at features ``[..., feat_size]`` (the head predicts it in
        symlog space). Needs ``spec.heads``."""
        head = self._checked_head(feat, self.reward_head, "reward")
        return symexp(head(feat).float().squeeze(-1))

    def continue_prob(self, feat: torch.Tensor) -> torch.Tensor:
        """Probability ``[...]`` that the episode continues after the step at features
        ``[..., feat_size]``. Needs ``spec.heads``."""
        head = self._checked_head(feat, self.continue_head, "continue_prob")
        return torch.sigmoid(head(feat).float().squeeze(-1))

    # ---------------------------------------------------------------------------------
    def _feature_error(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Mean squared difference of the slot features of ``a`` and ``b [..., S]``: ``[...]``."""
        D = self.spec.slot_dim
        return (a[..., :D] - b[..., :D]).square().mean(-1), None

    def _slot_error(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared error between slots ``a`` and ``b [..., S]`` (broadcast): per-dimension
        mean over the features, plus ``position_loss_scale`` x the centres' mean, plus the
        scales' mean; and the centres' mean squared error alone. Both ``[...]``."""
        D = self.spec.slot_dim
        err = (a - b).square()
        center = err[..., D : D + 2].mean(-1)
        total = err[..., :D].mean(-1) + self.spec.position_loss_scale * center
        return total + err[..., D + 2 :].mean(-1), center

    def loss(
        self, batch: dict[str, torch.Tensor], start: State | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``batch``: ``pixels [B, T, 3, H, W]`` (floats), ``action [B, T, A]``, ``is_first
        [B, T]`` (with ``spec.heads`` also ``reward`` and ``is_terminal [B, T]``; with
        ``spec.goal_features`` the ``goal`` frames ``[B, T, 3, H, W]``). Returns the unscaled
        losses (``LOSS_KEYS``, ``HEAD_LOSS_KEYS``) and ``world_model/...`` metrics."""
        losses, metrics, _ = self.loss_and_states(batch, start)
        return losses, metrics

    def loss_and_states(
        self,
        batch: dict[str, torch.Tensor],
        start: State | None = None,
        predict_pixels: bool = True,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], State]:
        """``(losses, metrics, post)`` (see ``loss``): ``post`` the posterior State, ``slots
        [B, T, K, S]`` (and ``goal [B, T, K, S]`` with ``spec.goal_features``). ``start``
        (``slots [B, K, S]``, ``action [B, A]``) carries the previous window's last posterior
        and action (see ``observe``). ``predict_pixels=False`` skips decoding the prior slots
        (``loss/prediction`` is then 0). With ``representation=cpc`` the prior slots are never
        decoded and there is no ``loss/prediction``; with ``reconstruction+cpc`` or ``cpc``
        there is ``loss/cpc`` (``cpc_loss``: the keys are the detached posterior unless
        ``dynamics_trains_perception``) and its metrics. With ``spec.heads``:
        ``loss/reward`` and ``loss/continue`` (``_head_losses``)."""
        missing = [k for k in self._batch_keys() if k not in batch]
        if missing:
            raise ValueError(f"loss_and_states: the batch lacks {missing} (see SlotSpec)")
        mode = self.spec.representation
        states = self.observe(batch["pixels"], batch["action"], batch["is_first"], start)
        pixels = self.resize(batch["pixels"].flatten(0, 1)).unflatten(0, batch["pixels"].shape[:2])
        post, prior, has_prior = states["post"], states["prior"], states["has_prior"]
        decoded = self.decode(post)
        rec = (decoded["image"] - pixels).square().mean((-3, -2, -1))  # [B, T]
        losses = {"loss/reconstruction": rec.mean()}
        valid = has_prior
        count = valid.sum().clamp(min=1.0)
        if mode == "cpc":
            pass  # no decoder pass for the dynamics: loss/cpc (below) replaces loss/prediction
        elif predict_pixels and bool(valid.any()):
            idx = valid.flatten().nonzero()[:, 0]
            pred = self.decode(prior.flatten(0, 1)[idx])["image"]
            err = (pred - pixels.flatten(0, 1)[idx]).square().mean((-3, -2, -1))
            losses["loss/prediction"] = err.sum() / count
        else:
            losses["loss/prediction"] = pixels.new_zeros(())
        target = post.detach()
        with torch.no_grad():
            masks = decoded["masks"][..., 0, :, :]  # [B, T, C, H, W]
            usage = masks[..., -self.num_slots :, :, :].mean((-2, -1))  # [B, T, K] image share
        # Slots that draw (almost) nothing carry no observable state: their inferred positions
        # are arbitrary from frame to frame, so they are left out of loss/dynamics.
        share = usage
        if self.spec.inference == "fresh":
            # Each frame's slots are inferred in their own order: pair every predicted slot
            # with the posterior slot of the same appearance (a Hungarian matching on the
            # features alone: a picked block lands far away, so positions would pair it with
            # whatever now sits where it was; measured 95% vs 91% correct pairs).
            order = matching_order(prior.detach(), target, self._feature_error)
            target = target.gather(-2, order[..., None].expand_as(target))
            share = share.gather(-1, order)
        else:
            order = None
        present = (share / PRESENT_SHARE).clamp(max=1.0)  # [B, T, K]
        dyn, center_err = self._slot_error(prior, target)  # [B, T, K]
        dyn = (dyn * present).sum(-1) / present.sum(-1).clamp(min=1e-6)  # [B, T]
        center_err = center_err * present
        losses["loss/dynamics"] = (dyn * valid).sum() / count
        cpc_metrics: dict[str, torch.Tensor] = {}
        if mode != "reconstruction":
            # Keys: the matched posterior, detached like the loss/dynamics target unless
            # dynamics_trains_perception (then loss/cpc trains the perception, as in C-SWM).
            keys = target
            if self.spec.dynamics_trains_perception:
                keys = post if order is None else post.gather(-2, order[..., None].expand_as(post))
            weight = valid[..., None] * present  # anchors: predicted slots that draw something
            losses["loss/cpc"], cpc_metrics = self.cpc_loss(prior, keys, weight)
        with torch.no_grad():
            entropy = -(masks.clamp_min(1e-8).log() * masks).sum(-3).mean()
            metrics = {
                "world_model/recon_mse": rec.mean(),
                "world_model/mask_entropy": entropy,
                "world_model/slots_used": (usage > 0.01).float().sum(-1).mean(),
                "world_model/predicted_steps": valid.mean(),
                # RMS error of the predicted slot centres (image units, 1 = the image side).
                "world_model/position_error": (
                    (center_err.sum(-1) / present.sum(-1).clamp(min=1e-6) * valid).sum() / count
                ).sqrt(),
            }
            metrics.update({f"world_model/{k}": v for k, v in cpc_metrics.items()})
        posterior: State = {"slots": post}
        if self.spec.goal_features:
            posterior["goal"] = self._goal_slots(batch["goal"])
        if self.reward_head is not None:
            head_losses, head_metrics = self._head_losses(batch, posterior)
            losses.update(head_losses)
            metrics.update(head_metrics)
        return losses, metrics, posterior

    def _batch_keys(self) -> tuple[str, ...]:
        """The batch keys ``loss_and_states`` reads under this spec."""
        keys = ("pixels", "action", "is_first")
        keys += ("reward", "is_terminal") if self.spec.heads else ()
        return keys + (("goal",) if self.spec.goal_features else ())

    @torch.no_grad()
    def _goal_slots(self, goal: torch.Tensor) -> torch.Tensor:
        """Slots ``[B, T, K, S]`` of the goal frames ``[B, T, 3, H, W]``: a conditioning input,
        inferred from fresh slots by the perception without training it."""
        return self.infer(goal.flatten(0, 1)).unflatten(0, goal.shape[:2])

    def _head_losses(
        self, batch: dict[str, torch.Tensor], post: State
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``loss/reward`` (squared error in symlog space) and ``loss/continue`` (binary cross
        entropy against ``1 - is_terminal``) at every posterior step, and their metrics. The
        heads read the detached slots unless ``dynamics_trains_perception``: like the
        dynamics' losses, they learn on the slots the perception gives them.

        Shapes: ``reward``, ``is_terminal`` ``[B, T]``; ``post`` ``slots [B, T, K, S]``.
        """
        assert self.reward_head is not None and self.continue_head is not None
        lead = tuple(post["slots"].shape[:2])
        for key in ("reward", "is_terminal"):
            assert tuple(batch[key].shape) == lead, (
                f"loss_and_states: batch {key!r} {tuple(batch[key].shape)} must be [B, T] = {lead}"
            )
        if not self.spec.dynamics_trains_perception:
            post = {k: v.detach() for k, v in post.items()}
        feat = self.feat(post)
        reward_pred = self.reward_head(feat).float().squeeze(-1)  # symlog space
        reward = batch["reward"].float()
        cont_logits = self.continue_head(feat).float().squeeze(-1)
        cont_target = 1.0 - batch["is_terminal"].float()
        losses = {
            "loss/reward": (reward_pred - symlog(reward)).square().mean(),
            "loss/continue": F.binary_cross_entropy_with_logits(cont_logits, cont_target),
        }
        with torch.no_grad():
            metrics = {
                "world_model/reward_error": (symexp(reward_pred) - reward).abs().mean(),
                "world_model/continue_accuracy": (
                    ((cont_logits > 0).float() == cont_target).float().mean()
                ),
            }
        return losses, metrics


__all__ = [
    "GOAL_PAIRINGS",
    "HEAD_LOSS_KEYS",
    "LOSS_KEYS",
    "SLOT_INITS",
    "BroadcastDecoder",
    "SlotAttention",
    "SlotDynamics",
    "SlotEncoder",
    "SlotSpec",
    "SlotWorldModel",
    "INFERENCE_MODES",
    "REPRESENTATIONS",
    "fourier_positions",
    "hungarian_order",
    "match_slots",
    "matching_order",
    "normalize_slots",
    "position_grid",
]
