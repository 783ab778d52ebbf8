"""Building blocks shared by the world model, actor and critic.

Every weight layer (linear, block-diagonal linear, conv, transposed conv) of a Dreamer model is
built through one ``LayerFactory``. The factory initialises the weights (truncated normal,
fan-in scaled, with an optional output scale) and records each layer under a dotted ``name``;
the sparse-layers work swaps in dynamic-sparse layers by subclassing the factory (or replacing
layers by name from ``factory.layers``) without touching model code.

Also here: norms and activations, ``symlog``/``symexp``, the two-hot distribution over
symlog-spaced bins, and a straight-through one-hot categorical with uniform mixing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# --------------------------------------------------------------------------------------
# Elementwise transforms
# --------------------------------------------------------------------------------------


def symlog(x: torch.Tensor) -> torch.Tensor:
    """``sign(x) * log(1 + |x|)``: compresses large magnitudes, identity-like near zero."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``symlog``: ``sign(x) * (exp(|x|) - 1)``."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


def one_hot(index: torch.Tensor, classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``index [...]`` -> one-hot ``[..., classes]`` without a host sync.

    ``F.one_hot`` reads the indices back to the host to range-check them (one sync per call,
    thousands per update); a comparison with ``arange`` stays on the device. Out-of-range
    indices give an all-zero row instead of an error.
    """
    classes_range = torch.arange(classes, device=index.device)
    return (index[..., None] == classes_range).to(dtype)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


class BlockLinear(nn.Module):
    """``blocks`` independent linear maps applied to ``x[..., blocks, in_features]``.

    Equivalent to one linear layer with a block-diagonal weight of ``blocks`` blocks of size
    ``in_features x out_features``; stored as ``weight [blocks, in_features, out_features]``.
    """

    def __init__(self, in_features: int, out_features: int, blocks: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.blocks = in_features, out_features, blocks
        self.weight = nn.Parameter(torch.empty(blocks, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(blocks, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("...gi,gio->...go", x, self.weight)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"blocks={self.blocks}, bias={self.bias is not None}"
        )


class ChannelNorm(nn.Module):
    """Applies a feature norm (``LayerNorm`` or ``RMSNorm``) over the channel dimension of
    ``[N, C, H, W]`` maps; its weights are the wrapped norm's."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            # Eager: the fused kernel on channels-last values.
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        # Compiled: the same statistics reduced over dim 1 in place, so the generated kernels
        # read the maps contiguously (vectorised over H x W) instead of through a permute.
        norm = self.norm
        x32 = x.float()
        if isinstance(norm, nn.RMSNorm):
            eps = norm.eps if norm.eps is not None else torch.finfo(x32.dtype).eps
            y = x32 * torch.rsqrt(x32.square().mean(1, keepdim=True) + eps)
        else:
            mean = x32.mean(1, keepdim=True)
            centered = x32 - mean
            y = centered * torch.rsqrt(centered.square().mean(1, keepdim=True) + norm.eps)
        if norm.weight is not None:
            y = y * norm.weight[:, None, None]
        if getattr(norm, "bias", None) is not None:
            y = y + norm.bias[:, None, None]
        return y  # float32, as the norm gives under autocast


def _trunc_normal_fan_in(weight: torch.Tensor, fan_in: int, scale: float) -> None:
    if scale == 0.0:
        nn.init.zeros_(weight)
        return
    # A normal truncated at +-2 std has std 0.8796 of the untruncated one; undo that shrinkage
    # so the layer's output variance is ``scale**2`` for unit-variance inputs.
    std = scale / math.sqrt(max(1, fan_in)) / 0.87962566103423978
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class LayerFactory:
    """Builds, initialises and records every weight layer of a model.

    ``outscale`` multiplies the init std of a layer (0 gives zero weights, as DreamerV3 does
    for the reward and value outputs; 0.01 for the policy output). ``layers`` maps each
    ``name`` to its module, in creation order. Names must be unique; a prefix scope (see
    ``scope``) keeps them readable, e.g. ``wm.rssm.gru.gates``.

    Subclasses override ``_make_linear`` / ``_make_block_linear`` / ``_make_conv2d`` /
    ``_make_conv_transpose2d`` to return other modules with the same call signature.
    """

    def __init__(self, norm: str = "layer", act: str = "silu", eps: float = 1e-4, prefix: str = ""):
        if norm not in ("rms", "layer", "none"):
            raise ValueError(f"norm: expected 'rms', 'layer' or 'none', got {norm!r}")
        if act not in ACTIVATIONS:
            raise ValueError(f"act: expected one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.norm_kind, self.act_kind, self.eps = norm, act, eps
        self.prefix = prefix
        self.layers: dict[str, nn.Module] = {}
        self._root = self

    # -- naming -----------------------------------------------------------------------
    def scope(self, name: str) -> LayerFactory:
        """A view of this factory that prefixes names with ``name.`` (shares the registry)."""
        child = object.__new__(type(self))
        child.__dict__.update(self.__dict__)
        child.prefix = f"{self.prefix}{name}."
        return child

    def _register(self, name: str, module: nn.Module) -> nn.Module:
        full = f"{self.prefix}{name}"
        if full in self._root.layers:
            raise ValueError(f"layer name {full!r} is already taken")
        self._root.layers[full] = module
        module.layer_name = full  # type: ignore[attr-defined]
        return module

    # -- weight layers ----------------------------------------------------------------
    def linear(
        self,
        in_features: int,
        out_features: int,
        *,
        name: str,
        bias: bool = True,
        outscale: float = 1.0,
    ) -> nn.Module:
        layer = self._make_linear(in_features, out_features, bias)
        _trunc_normal_fan_in(layer.weight, in_features, outscale)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
        return self._register(name, layer)

    def block_linear(
        self,
        in_features: int,
        out_features: int,
        blocks: int,
        *,
        name: str,
        bias: bool = True,
        outscale: float = 1.0,
    ) -> nn.Module:
        """Block-diagonal linear over ``x[..., blocks, in_features]`` (sizes per block)."""
        layer = self._make_block_linear(in_features, out_features, blocks, bias)
        _trunc_normal_fan_in(layer.weight, in_features, outscale)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
        return self._register(name, layer)

    def conv2d(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        padding: int = 0,
        *,
        name: str,
        bias: bool = True,
        outscale: float = 1.0,
    ) -> nn.Module:
        layer = self._make_conv2d(in_channels, out_channels, kernel, stride, padding, bias)
        _trunc_normal_fan_in(layer.weight, in_channels * kernel * kernel, outscale)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
        return self._register(name, layer)

    def conv_transpose2d(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        padding: int = 0,
        *,
        name: str,
        bias: bool = True,
        outscale: float = 1.0,
    ) -> nn.Module:
        layer = self._make_conv_transpose2d(
            in_channels, out_channels, kernel, stride, padding, bias
        )
        # Each output pixel of a stride-s transposed conv sums about in * (k/s)^2 inputs.
        fan_in = in_channels * max(1, (kernel // max(1, stride)) ** 2)
        _trunc_normal_fan_in(layer.weight, fan_in, outscale)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
        return self._register(name, layer)

    # -- constructors to override ----------------------------------------------------------
    def _make_linear(self, i: int, o: int, bias: bool) -> nn.Module:
        return nn.Linear(i, o, bias=bias)

    def _make_block_linear(self, i: int, o: int, blocks: int, bias: bool) -> nn.Module:
        return BlockLinear(i, o, blocks, bias=bias)

    def _make_conv2d(self, i: int, o: int, k: int, s: int, p: int, bias: bool) -> nn.Module:
        return nn.Conv2d(i, o, k, stride=s, padding=p, bias=bias)

    def _make_conv_transpose2d(
        self, i: int, o: int, k: int, s: int, p: int, bias: bool
    ) -> nn.Module:
        return nn.ConvTranspose2d(i, o, k, stride=s, padding=p, bias=bias)

    # -- norms and activations (no weights to sparsify) ----------------------------------
    def norm(self, features: int) -> nn.Module:
        if self.norm_kind == "rms":
            return nn.RMSNorm(features, eps=self.eps)
        if self.norm_kind == "layer":
            return nn.LayerNorm(features, eps=self.eps)
        return nn.Identity()

    def channel_norm(self, channels: int) -> nn.Module:
        return ChannelNorm(self.norm(channels)) if self.norm_kind != "none" else nn.Identity()

    def act(self) -> nn.Module:
        return ACTIVATIONS[self.act_kind]()

    def dense(self, in_features: int, out_features: int, *, name: str) -> nn.Sequential:
        """Linear (with bias) -> norm -> activation.

        The bias matters even before a norm: ``norm(W x)`` is invariant to the scale of ``x``,
        so without one a 1-d action (or observation) would reach the model only through its
        sign, and any input only through its direction. With a zero bias that stays so until
        the bias has been learned (hundreds of updates), so the bias starts, as in
        ``nn.Linear``, uniform in ``+-1/sqrt(in_features)``: negligible for wide inputs, enough
        to keep the scale of a narrow one from the first update.
        """
        linear = self.linear(in_features, out_features, name=name)
        bound = 1.0 / math.sqrt(max(1, in_features))
        nn.init.uniform_(linear.bias, -bound, bound)
        return nn.Sequential(linear, self.norm(out_features), self.act())

    def mlp(self, in_features: int, units: int, layers: int, *, name: str) -> nn.Sequential:
        """``layers`` dense blocks of width ``units`` (an empty MLP when ``layers`` is 0)."""
        blocks = []
        for i in range(layers):
            blocks.append(self.dense(in_features if i == 0 else units, units, name=f"{name}.{i}"))
        return nn.Sequential(*blocks)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


# --------------------------------------------------------------------------------------
# Distributions
# --------------------------------------------------------------------------------------


class TwoHot(nn.Module):
    """Two-hot encoding over ``bins`` symlog-spaced bins in ``[low, high]`` (symlog space).

    A scalar ``y`` is encoded as weights on the two bins around ``symlog(y)`` whose weighted
    mean is ``symlog(y)``; a network's logits over the bins decode to ``symexp`` of the mean
    bin under ``softmax(logits)``. ``log_prob(logits, y)`` is the cross-entropy target used
    for the reward head and the critic. Holds the bins as a (non-persistent) buffer.
    """

    def __init__(self, bins: int = 255, low: float = -20.0, high: float = 20.0):
        super().__init__()
        if bins < 2:
            raise ValueError(f"bins: need at least 2, got {bins}")
        self.num_bins = bins
        grid = torch.linspace(low, high, bins)
        if low == -high:
            # float32 linspace is symmetric only to rounding; mirror it exactly so the
            # symmetric sum in ``decode`` cancels to 0.
            grid = (grid - grid.flip(0)) / 2
        self.register_buffer("bins", grid, persistent=False)

    def _neighbours(self, y: torch.Tensor):
        """Indices of the bins below/above ``symlog(y)`` and their weights."""
        bins = self.bins
        x = symlog(y.float()).clamp(bins[0], bins[-1])
        below = (torch.bucketize(x, bins, right=True) - 1).clamp(0, self.num_bins - 1)
        above = (below + 1).clamp(max=self.num_bins - 1)
        dist_below = (x - bins[below]).abs()
        dist_above = (bins[above] - x).abs()
        total = dist_below + dist_above
        # Exactly on a bin (or clamped to an end): all weight below.
        weight_below = torch.where(
            total == 0, torch.ones_like(total), dist_above / total.clamp_min(1e-12)
        )
        return below, above, weight_below, 1.0 - weight_below

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """``y [...]`` -> two-hot weights ``[..., bins]`` (rows sum to 1)."""
        below, above, w_below, w_above = self._neighbours(y)
        target = torch.zeros(*y.shape, self.num_bins, device=y.device)
        target.scatter_add_(-1, below[..., None], w_below[..., None])
        target.scatter_add_(-1, above[..., None], w_above[..., None])
        return target

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., bins]`` -> predicted value ``[...]`` (mean in symlog space)."""
        # Elementwise, not a matmul: autocast would run a matmul in bf16 and blur the mean.
        weighted = torch.softmax(logits.float(), -1) * self.bins
        # Summed symmetrically (DreamerV3): each negative bin's term is added to its mirror
        # image before the total, so uniform probabilities over symmetric bins decode to
        # exactly 0 (a left-to-right sum leaves rounding error: a zero-initialised critic or
        # reward head would not predict 0).
        half = self.num_bins // 2
        pairs = weighted[..., :half].flip(-1) + weighted[..., self.num_bins - half :]
        mean = pairs.sum(-1)
        if self.num_bins % 2:
            mean = mean + weighted[..., half]
        return symexp(mean)

    def log_prob(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Log-likelihood ``[...]`` of targets ``y [...]`` under logits ``[..., bins]``:
        the cross-entropy against the two-hot encoding (gathered, never built densely)."""
        below, above, w_below, w_above = self._neighbours(y.detach())
        logp = torch.log_softmax(logits.float(), -1)
        lp_below = logp.gather(-1, below[..., None])[..., 0]
        lp_above = logp.gather(-1, above[..., None])[..., 0]
        return w_below * lp_below + w_above * lp_above


class OneHotDist:
    """Categorical over the last axis with ``unimix`` uniform mixing, sampled as one-hot.

    ``sample()`` and ``mode()`` return one-hot vectors whose gradient passes straight through
    to the probabilities (``onehot + probs - stop_grad(probs)``). ``logits`` may carry extra
    leading (batch) and group axes; ``log_prob``/``entropy``/``kl`` reduce only the class axis.
    """

    def __init__(self, logits: torch.Tensor, unimix: float = 0.01):
        logits = logits.float()
        probs = torch.softmax(logits, -1)
        if unimix > 0:
            probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
            logits = torch.log(probs)
        else:
            logits = torch.log_softmax(logits, -1)
        self.logits, self.probs = logits, probs

    def _straight_through(self, index: torch.Tensor) -> torch.Tensor:
        onehot = one_hot(index, self.probs.shape[-1], self.probs.dtype)
        return onehot + self.probs - self.probs.detach()

    def sample(self) -> torch.Tensor:
        # Gumbel-max: argmax(logits + Gumbel noise) is an exact categorical sample.
        uniform = torch.rand_like(self.logits).clamp_(1e-20, 1.0 - 1e-7)
        return self._straight_through(
            torch.argmax(self.logits - torch.log(-torch.log(uniform)), -1)
        )

    def mode(self) -> torch.Tensor:
        return self._straight_through(torch.argmax(self.logits, -1))

    def log_prob(self, onehot: torch.Tensor) -> torch.Tensor:
        return (onehot.float() * self.logits).sum(-1)

    def entropy(self) -> torch.Tensor:
        return -(self.probs * self.logits).sum(-1)

    def kl(self, other: OneHotDist) -> torch.Tensor:
        """``KL(self || other)`` over the class axis."""
        return (self.probs * (self.logits - other.logits)).sum(-1)


class NormalDist:
    """Diagonal Gaussian with reparameterised samples; reduces nothing (caller sums)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean.float(), std.float()

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.float() - self.mean) / self.std
        return -0.5 * z.square() - torch.log(self.std) - 0.5 * math.log(2 * math.pi)

    def entropy(self) -> torch.Tensor:
        return 0.5 + 0.5 * math.log(2 * math.pi) + torch.log(self.std)

    def kl(self, other: NormalDist) -> torch.Tensor:
        var_ratio = (self.std / other.std).square()
        diff = ((self.mean - other.mean) / other.std).square()
        return 0.5 * (var_ratio + diff - 1.0 - torch.log(var_ratio))
