"""Per-IPU memory budget: what each IPU must hold, and a clear error when it does not fit.

Counted per IPU: weights in their storage dtype (fp16: 2 bytes), gradients of the trained
weights (same dtype), optimizer state (fp32 slots: 2 for Adam-like, 1 for momentum SGD /
RMSprop / Adagrad), stashed activations of the pipeline stage (measured on the host: the
tensors autograd saved for the backward pass), and for block-sparse layers the non-zero values
plus index metadata instead of the dense weight. Not counted (an assumption): code, vertex
state and exchange buffers, covered by the preset's usable-memory fraction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .constraints import IPUMemoryError, SparseLayer, block_index_bytes
from .presets import IPUPreset

KINDS = ("weights", "gradients", "optimizer state", "stashed activations", "sparse index metadata")
_ADAM_LIKE = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "SparseAdam", "Lamb", "LAMB")


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def optimizer_slots(optimizer: torch.optim.Optimizer) -> int:
    """fp32 state tensors per parameter the optimizer keeps (by type; 2 when unknown)."""
    name = type(optimizer).__name__
    if name in _ADAM_LIKE:
        return 2
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    if name == "SGD":
        return 1 if group.get("momentum", 0) else 0
    if name == "RMSprop":
        return 1 + (1 if group.get("momentum", 0) else 0) + (1 if group.get("centered") else 0)
    if name in ("Adagrad", "Adadelta"):
        return 1 if name == "Adagrad" else 2
    return 2


def storage_bytes(t: torch.Tensor, half: bool) -> int:
    """Bytes per element on the device: floats are fp16 under fp16 storage."""
    if half and t.is_floating_point():
        return 2
    return t.element_size()


def pretty_name(name: str) -> str:
    """``x.parametrizations.weight.original`` -> ``x.weight``."""
    return name.replace(".parametrizations.", ".").replace(".original", "")


@dataclass
class MemoryItem:
    name: str
    ipu: int
    kind: str
    bytes: float


class MemoryPlan:
    """The items each IPU holds, against the preset's budget."""

    def __init__(self, preset: IPUPreset, num_ipus: int) -> None:
        self.preset = preset
        self.num_ipus = num_ipus
        self.items: list[MemoryItem] = []

    def add(self, name: str, ipu: int, kind: str, nbytes: float) -> None:
        if kind not in KINDS:
            raise ValueError(f"memory kind must be one of {KINDS}, got {kind!r}")
        if nbytes:
            self.items.append(MemoryItem(name, ipu, kind, float(nbytes)))

    def clear(self, kind: str) -> None:
        self.items = [item for item in self.items if item.kind != kind]

    def per_ipu(self) -> dict[int, dict[str, float]]:
        """``{ipu: {kind: bytes, ..., "total": bytes}}`` for every IPU."""
        table = {i: dict.fromkeys((*KINDS, "total"), 0.0) for i in range(self.num_ipus)}
        for item in self.items:
            table[item.ipu][item.kind] += item.bytes
            table[item.ipu]["total"] += item.bytes
        return table

    def largest(self, ipu: int, count: int = 3) -> list[tuple[str, float, list[str]]]:
        """The ``count`` largest named items on one IPU (kinds of one name summed)."""
        sizes: dict[str, float] = defaultdict(float)
        kinds: dict[str, list[str]] = defaultdict(list)
        for item in self.items:
            if item.ipu == ipu:
                sizes[item.name] += item.bytes
                if item.kind not in kinds[item.name]:
                    kinds[item.name].append(item.kind)
        ranked = sorted(sizes, key=lambda n: -sizes[n])[:count]
        return [(n, sizes[n], kinds[n]) for n in ranked]

    def summary(self) -> dict[str, object]:
        per = self.per_ipu()
        budget = self.preset.budget_bytes
        return {
            "budget_bytes_per_ipu": budget,
            "per_ipu": {str(i): row for i, row in per.items()},
            "max_fraction_of_budget": max(row["total"] for row in per.values()) / budget,
            "largest_items": [
                {"name": n, "bytes": b, "kinds": k} for n, b, k in self.largest(0, 5)
            ],
        }

    def check(self) -> None:
        """Raise ``IPUMemoryError`` (breakdown and largest items, one line) if an IPU overflows."""
        budget = self.preset.budget_bytes
        per = self.per_ipu()
        over = [i for i, row in per.items() if row["total"] > budget]
        if not over:
            return
        worst = max(over, key=lambda i: per[i]["total"])
        row = per[worst]
        parts = " + ".join(f"{kind} {fmt_bytes(row[kind])}" for kind in KINDS if row[kind])
        largest = ", ".join(
            f"{name} {fmt_bytes(size)} ({'+'.join(kinds)})"
            for name, size, kinds in self.largest(worst)
        )
        p = self.preset
        raise IPUMemoryError(
            f"ipu-sim: out of memory on IPU {worst} of {self.num_ipus} (preset {p.name}: budget "
            f"{fmt_bytes(budget)} = {p.tiles.value:.0f} tiles x {fmt_bytes(p.tile_memory.value)}"
            f" x {p.usable_memory.value:.2f} usable): needs {fmt_bytes(row['total'])} = {parts}; "
            f"largest items: {largest}. Fix: a larger ipu.preset, more ipu.num_ipus (pipeline "
            f"stages), accelerator.precision=fp16, sparse layers, or a smaller model"
        )


def add_parameters(
    plan: MemoryPlan,
    modules: dict[str, nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    ipu_of: Callable[[str], int],
    half: bool,
    sparse_layers: Sequence[SparseLayer] = (),
) -> None:
    """Weights, gradients, optimizer state and sparse metadata of ``modules`` into ``plan``.

    ``ipu_of(name)`` places a parameter (full name ``<root>.<path>``) on an IPU.
    """
    slots: dict[int, int] = {}
    for opt in optimizers:
        n = optimizer_slots(opt)
        for group in opt.param_groups:
            for p in group["params"]:
                slots[id(p)] = max(slots.get(id(p), 0), n)
    sparse_of = {id(layer.original): layer for layer in sparse_layers}
    masks = {id(layer.mask) for layer in sparse_layers}
    seen: set[int] = set()
    for root, module in modules.items():
        for path, param in module.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = pretty_name(f"{root}.{path}")
            ipu = ipu_of(f"{root}.{path}")
            layer = sparse_of.get(id(param))
            elements = layer.nnz if layer is not None else param.numel()
            width = storage_bytes(param, half)
            plan.add(name, ipu, "weights", elements * width)
            if layer is not None:
                plan.add(name, ipu, "sparse index metadata", block_index_bytes(layer, plan.preset))
            if id(param) in slots:
                plan.add(name, ipu, "gradients", elements * width)
                plan.add(name, ipu, "optimizer state", elements * 4 * slots[id(param)])
        for path, buf in module.named_buffers():
            if id(buf) in seen or id(buf) in masks:
                continue  # masks are the host's stand-in for the index metadata above
            seen.add(id(buf))
            plan.add(
                f"{root}.{path}",
                ipu_of(f"{root}.{path}"),
                "weights",
                buf.numel() * storage_bytes(buf, half),
            )
