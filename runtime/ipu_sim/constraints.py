"""What the simulated IPU enforces: static signatures, pipeline placement, block-sparse limits.

Every violation raises an ``IPUSimError`` subclass with a one-line message naming the problem
and the fix (scripts print it without a traceback).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from imagine_rl.runtime.errors import AcceleratorError

from .presets import IPUPreset


class IPUSimError(AcceleratorError):
    """A limit of the simulated IPU was hit."""


class IPUShapeError(IPUSimError):
    """A compiled program was called with other shapes or dtypes than its first call."""


class IPUMemoryError(IPUSimError):
    """The tensors one IPU must hold exceed its memory budget."""


class IPUConstraintError(IPUSimError):
    """A placement, gradient-accumulation or block-sparse rule is broken."""


# --------------------------------------------------------------------------------------
# Static shapes and dtypes
# --------------------------------------------------------------------------------------


def _flatten(tree: Any, path: str, out: list[tuple[str, tuple[int, ...], str]]) -> None:
    if isinstance(tree, torch.Tensor):
        out.append((path, tuple(tree.shape), str(tree.dtype).replace("torch.", "")))
    elif isinstance(tree, dict):
        for key in sorted(tree, key=str):
            _flatten(tree[key], f"{path}[{key!r}]", out)
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            _flatten(value, f"{path}[{i}]", out)


def signature(tree: Any, name: str = "input") -> list[tuple[str, tuple[int, ...], str]]:
    """``[(path, shape, dtype)]`` of every tensor in a dict/list/tuple tree."""
    out: list[tuple[str, tuple[int, ...], str]] = []
    _flatten(tree, name, out)
    return out


def _fmt(entry: tuple[str, tuple[int, ...], str]) -> str:
    return f"{entry[2]}{list(entry[1])}"


class SignatureGuard:
    """The first call of each program fixes its input signature; any later change raises.

    On a real IPU a program is compiled for fixed shapes and dtypes; a new shape means a new
    compilation (minutes), so the simulated device refuses it instead of silently re-running.
    """

    def __init__(self) -> None:
        self.signatures: dict[str, list[tuple[str, tuple[int, ...], str]]] = {}

    def check(self, program: str, inputs: Any) -> None:
        now = signature(inputs, "batch")
        before = self.signatures.setdefault(program, now)
        if now == before:
            return
        old = {entry[0]: entry for entry in before}
        new = {entry[0]: entry for entry in now}
        changes = []
        for path in sorted(set(old) | set(new)):
            a, b = old.get(path), new.get(path)
            if a != b:
                changes.append(
                    f"{path} {_fmt(a) if a else 'absent'} -> {_fmt(b) if b else 'absent'}"
                )
        raise IPUShapeError(
            f"ipu-sim: program '{program}' was compiled for static shapes and dtypes at its first "
            f"call; this call differs: {'; '.join(changes[:4])}"
            f"{' ...' if len(changes) > 4 else ''}. Keep the shapes fixed (e.g. replay.batch_size "
            f"and replay.batch_length), as the IPU needs one compiled program per signature"
        )


# --------------------------------------------------------------------------------------
# Pipeline placement
# --------------------------------------------------------------------------------------


@dataclass
class Placement:
    """Which IPU (pipeline stage) holds each named module; ``order`` is the execution order."""

    entries: list[tuple[str, int]]  # (module prefix, ipu) in pipeline order
    num_ipus: int

    @property
    def stages(self) -> int:
        """Pipeline stages: the distinct IPUs used."""
        return len({ipu for _, ipu in self.entries}) or 1

    def ipu_of(self, name: str) -> int | None:
        """The IPU of the longest placed prefix of ``name`` (``a.b`` matches ``a.b.c``)."""
        best, ipu = -1, None
        for prefix, stage in self.entries:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, ipu = len(prefix), stage
        return ipu


def check_pipeline(stage_ids: Sequence[int], num_ipus: int, what: str = "ipu.placement") -> None:
    """Stage ids must be in ``[0, num_ipus)`` and non-decreasing in execution order."""
    for i, stage in enumerate(stage_ids):
        if not 0 <= stage < num_ipus:
            raise IPUConstraintError(
                f"{what}: entry {i} is placed on IPU {stage}, but ipu.num_ipus={num_ipus} "
                f"(valid ids 0..{num_ipus - 1}); raise ipu.num_ipus or fix the placement"
            )
        if i and stage < stage_ids[i - 1]:
            raise IPUConstraintError(
                f"{what}: stage ids must be non-decreasing in execution order (a pipeline "
                f"only sends activations forward), got {list(stage_ids)}; reorder the entries"
            )


def check_accumulation(micro_batches: int, stages: int) -> None:
    if micro_batches < stages:
        raise IPUConstraintError(
            f"ipu.gradient_accumulation={micro_batches} is below the {stages} pipeline stages: "
            f"every stage needs a micro-batch in flight; set ipu.gradient_accumulation >= "
            f"{stages} (or 0 for exactly {stages})"
        )


def parse_placement(entries: Sequence[str], num_ipus: int) -> list[tuple[str, int]]:
    """``["world_model.encoder:0", "actor:1"]`` -> ``[("world_model.encoder", 0), ...]``."""
    parsed = []
    for entry in entries:
        match = re.fullmatch(r"\s*([\w.\-]+)\s*[:=]\s*(\d+)\s*", str(entry))
        if match is None:
            raise IPUConstraintError(
                f"ipu.placement: bad entry {entry!r}; expected '<module prefix>:<ipu>', "
                f"e.g. world_model.encoder:0"
            )
        parsed.append((match.group(1), int(match.group(2))))
    check_pipeline([ipu for _, ipu in parsed], num_ipus)
    return parsed


def auto_placement(units: Sequence[tuple[str, int]], num_ipus: int) -> list[tuple[str, int]]:
    """Contiguous groups of ``(name, bytes)`` units, one group per IPU, balanced by bytes
    (each unit goes to the IPU whose share of the running total it falls in)."""
    total = sum(b for _, b in units) or 1
    placed, running = [], 0
    for name, size in units:
        middle = running + size / 2
        placed.append((name, min(num_ipus - 1, int(middle * num_ipus / total))))
        running += size
    return placed


# --------------------------------------------------------------------------------------
# Block-sparse layers
# --------------------------------------------------------------------------------------


@dataclass
class SparseLayer:
    """A weight masked by the ``sparse`` library (``weight = original * mask``)."""

    name: str  # module path, e.g. "world_model.encoder.mlp.0.0"
    module: nn.Module
    mask: torch.Tensor
    block: int
    nnz: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape)

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.mask.numel())

    @property
    def blocks(self) -> int:
        return self.nnz // (self.block * self.block)

    @property
    def original(self) -> torch.Tensor:
        return self.module.parametrizations.weight.original


def find_sparse_layers(modules: dict[str, nn.Module]) -> list[SparseLayer]:
    """Every module whose ``weight`` carries a mask parametrization (duck-typed: a ``mask``
    buffer and a ``block`` size, as ``sparse.MaskParametrization`` has)."""
    layers = []
    for root, module in modules.items():
        for path, sub in module.named_modules():
            plist = getattr(getattr(sub, "parametrizations", None), "weight", None)
            if plist is None:
                continue
            for p in plist:
                mask, block = getattr(p, "mask", None), getattr(p, "block", None)
                if isinstance(mask, torch.Tensor) and isinstance(block, int):
                    name = f"{root}.{path}" if path else root
                    nnz = int(torch.count_nonzero(mask))
                    layers.append(SparseLayer(name, sub, mask, block, nnz))
    return layers


def check_sparse_blocks(layers: Sequence[SparseLayer], preset: IPUPreset, half: bool) -> None:
    """Block sides the device's block-sparse matmul supports (fp32: up to a smaller side)."""
    allowed = tuple(int(b) for b in preset.sparse_block_sizes.value)
    fp32_max = int(preset.sparse_fp32_max_block.value)
    for layer in layers:
        if layer.block not in allowed:
            raise IPUConstraintError(
                f"ipu-sim: sparse layer '{layer.name}' uses {layer.block}x{layer.block} blocks; "
                f"the IPU's block-sparse matmul supports {', '.join(map(str, allowed))}: set "
                f"sparse.block to one of them"
            )
        if not half and layer.block > fp32_max:
            raise IPUConstraintError(
                f"ipu-sim: sparse layer '{layer.name}' uses {layer.block}x{layer.block} blocks in "
                f"fp32; fp32 block-sparse supports blocks up to {fp32_max}x{fp32_max}: set "
                f"sparse.block={fp32_max} or accelerator.precision=fp16"
            )


def check_sparse_nnz(layers: Sequence[SparseLayer]) -> None:
    """The non-zero count of every sparse layer is fixed: the IPU allocates its buffers once."""
    for layer in layers:
        now = int(torch.count_nonzero(layer.mask))
        if now != layer.nnz:
            raise IPUConstraintError(
                f"ipu-sim: sparse layer '{layer.name}' changed its non-zeros from {layer.nnz} to "
                f"{now}; the IPU allocates fixed-size non-zero buffers, so topology updates must "
                f"drop and regrow equally many blocks"
            )


def block_index_bytes(layer: SparseLayer, preset: IPUPreset) -> float:
    return layer.blocks * float(preset.sparse_index_bytes.value)
