"""Observation encoders and decoders, and the MLP heads of a Dreamer world model.

Observation keys are split by shape: 3-d ``[C, H, W]`` keys are images (a CNN; all image keys
must share ``H = W``, a power of two times ``minres``), 1-d keys are vectors (an MLP on their
concatenation, inputs ``symlog``-squashed). Images enter as floats in ``[-0.5, 0.5]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imagine_rl.worldmodels.layers import LayerFactory, symlog

Shapes = dict[str, tuple[int, ...]]


def split_keys(shapes: Shapes) -> tuple[list[str], list[str]]:
    """``(image_keys, vector_keys)`` of an observation shape dict, in sorted order."""
    images = sorted(k for k, s in shapes.items() if len(s) == 3)
    vectors = sorted(k for k, s in shapes.items() if len(s) == 1)
    other = set(shapes) - set(images) - set(vectors)
    if other:
        raise ValueError(
            f"observation keys {sorted(other)}: expected [D] vectors or [C, H, W] images"
        )
    return images, vectors


def image_sizes(minres: int = 4, largest: int = 256) -> list[int]:
    """The image sides the CNN encoder and decoder take: ``minres`` times a power of 2, >= 2x."""
    sizes, size = [], 2 * minres
    while size <= largest:
        sizes.append(size)
        size *= 2
    return sizes


def _stages(size: int, minres: int) -> int:
    stages = int(round(math.log2(size / minres)))
    if size != minres * 2**stages or stages < 1:
        raise ValueError(f"image size {size} must be {minres} times a power of two (>= 2)")
    return stages


class Encoder(nn.Module):
    """Observations ``{key: [N, ...]}`` -> embedding ``[N, embed_dim]``."""

    def __init__(
        self,
        shapes: Shapes,
        units: int,
        layers: int,
        depth: int,
        factory: LayerFactory,
        minres: int = 4,
    ) -> None:
        super().__init__()
        f = factory.scope("encoder")
        self.image_keys, self.vector_keys = split_keys(shapes)
        self.embed_dim = 0
        if self.vector_keys:
            dims = sum(shapes[k][0] for k in self.vector_keys)
            self.mlp = f.mlp(dims, units, max(1, layers), name="mlp")
            self.embed_dim += units
        if self.image_keys:
            sizes = {shapes[k][1:] for k in self.image_keys}
            if len(sizes) != 1 or len({s[0] for s in sizes} | {s[1] for s in sizes}) != 1:
                raise ValueError(f"image keys need one square size, got {sorted(sizes)}")
            size = shapes[self.image_keys[0]][1]
            channels = sum(shapes[k][0] for k in self.image_keys)
            convs: list[nn.Module] = []
            for i in range(_stages(size, minres)):
                out = depth * 2**i
                convs += [
                    f.conv2d(channels, out, 4, 2, 1, name=f"cnn.{i}", bias=False),
                    f.channel_norm(out),
                    f.act(),
                ]
                channels = out
            self.cnn = nn.Sequential(*convs)
            self.embed_dim += channels * minres * minres

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Accepts any leading axes ``[..., *shape]``; returns ``[..., embed_dim]``."""
        outs = []
        if self.vector_keys:
            x = torch.cat([obs[k].float() for k in self.vector_keys], -1)
            outs.append(self.mlp(symlog(x)))
        if self.image_keys:
            x = torch.cat([obs[k] for k in self.image_keys], -3)
            lead = x.shape[:-3]
            y = self.cnn(x.reshape(-1, *x.shape[-3:]))
            outs.append(y.reshape(*lead, -1))
        return torch.cat(outs, -1)


class Decoder(nn.Module):
    """Features ``[..., F]`` -> reconstruction means ``{key: [..., *shape]}``.

    Vector keys are predicted in symlog space (compare with ``symlog(target)``); image keys in
    the ``[-0.5, 0.5]`` input space.
    """

    def __init__(
        self,
        shapes: Shapes,
        feat_dim: int,
        units: int,
        layers: int,
        depth: int,
        factory: LayerFactory,
        minres: int = 4,
    ) -> None:
        super().__init__()
        f = factory.scope("decoder")
        self.shapes = shapes
        self.image_keys, self.vector_keys = split_keys(shapes)
        self.minres = minres
        if self.vector_keys:
            dims = sum(shapes[k][0] for k in self.vector_keys)
            self.mlp = f.mlp(feat_dim, units, max(1, layers), name="mlp")
            self.mlp_out = f.linear(units, dims, name="mlp.out")
        if self.image_keys:
            size = shapes[self.image_keys[0]][1]
            channels_out = sum(shapes[k][0] for k in self.image_keys)
            stages = _stages(size, minres)
            self.top = depth * 2 ** (stages - 1)
            self.cnn_in = f.linear(feat_dim, self.top * minres * minres, name="cnn.in", bias=False)
            layers_: list[nn.Module] = [f.channel_norm(self.top), f.act()]
            channels = self.top
            for i in range(stages):
                last = i == stages - 1
                out = channels_out if last else channels // 2
                layers_.append(
                    f.conv_transpose2d(channels, out, 4, 2, 1, name=f"cnn.{i}", bias=last)
                )
                if not last:
                    layers_ += [f.channel_norm(out), f.act()]
                channels = out
            self.cnn = nn.Sequential(*layers_)

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        lead = feat.shape[:-1]
        if self.vector_keys:
            y = self.mlp_out(self.mlp(feat))
            sizes = [self.shapes[k][0] for k in self.vector_keys]
            out.update(zip(self.vector_keys, y.split(sizes, -1)))
        if self.image_keys:
            x = self.cnn_in(feat).reshape(-1, self.top, self.minres, self.minres)
            y = self.cnn(x)
            y = y.reshape(*lead, *y.shape[1:])
            sizes = [self.shapes[k][0] for k in self.image_keys]
            out.update(zip(self.image_keys, y.split(sizes, -3)))
        return out


class Head(nn.Module):
    """MLP head ``[..., F] -> [..., out]``; ``outscale`` scales the output layer's init."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        units: int,
        layers: int,
        factory: LayerFactory,
        name: str,
        outscale: float = 1.0,
    ) -> None:
        super().__init__()
        f = factory.scope(name)
        self.mlp = f.mlp(in_dim, units, layers, name="mlp")
        self.out = f.linear(units if layers else in_dim, out_dim, name="out", outscale=outscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(x))
