"""Roofline cost estimates from the ops a step actually runs on the host.

Every aten op of the step is seen by a ``TorchDispatchMode`` (``OpRecorder``): FLOPs from
``torch.utils.flop_counter``'s formulas (matmuls and convolutions; 2 per multiply-add), bytes
from the op's input and output tensors (fp16 storage: 2 bytes per float element). The model of
one op on one IPU (BSP: compute, then exchange, then sync; nothing overlaps within a step):

    compute  = max(flops / peak_flops(dtype), bytes / memory_bandwidth)
    exchange = exchange_bytes / exchange_bandwidth   (matmul/conv inputs; 0 for other ops)
    sync     = sync_cycles / clock                   (one superstep per op)

View ops (``view``, ``t``, ``expand``, ...) cost nothing. Assumptions, labelled as such in the
report: a matmul's inputs cross the exchange once, element-wise ops find their operands on the
same tiles, each op is one superstep, the AMP peak is reachable at any size (so small ops are
optimistic on compute and pessimistic on syncs).

Block-sparse layers (masks from the ``sparse`` package): the host multiplies dense masked
weights; on the IPU only the non-zero blocks are multiplied, so a matmul of a sparse layer's
weight (forward, input gradient) or producing its weight gradient is costed at the layer's
density (never below: the savings are exactly the density ratio, before block overheads), with
the weight read as non-zeros plus index metadata; the host's ``weight * mask`` op is skipped.

Pipelines: per-stage times per micro-batch; ``(M + S - 1) x`` the slowest stage for a step of
``M`` micro-batches over ``S`` stages (fill and drain), plus inter-IPU traffic over the IPU-Links.
``estimate_pipeline`` runs a list of stage modules explicitly and simulates the schedule: with
detached boundaries (Greedy InfoMax) each stage steps on its own loss as soon as its input
arrives, with no backward traffic between IPUs; with end-to-end backprop the backward pass waits
for the next stage's gradient (GPipe-style fill and drain).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from .constraints import (
    SparseLayer,
    check_accumulation,
    check_pipeline,
    find_sparse_layers,
)
from .memory import MemoryPlan, add_parameters, storage_bytes
from .presets import IPUPreset, get_preset

_FREE = {"detach", "alias", "lift_fresh", "empty", "_local_scalar_dense", "lift", "set_"}
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class CostModel:
    """Per-op roofline on one IPU of ``preset``; ``half``: fp16 storage and AMP rate."""

    preset: IPUPreset
    half: bool = False

    @property
    def sync_s(self) -> float:
        return self.preset.sync_cycles.value / self.preset.clock.value

    def op_times(
        self, flops: float, nbytes: float, exchange_bytes: float, half: bool
    ) -> tuple[float, float, float]:
        """(compute, exchange, sync) seconds of one op."""
        p = self.preset
        compute = max(flops / p.peak_flops(half or self.half), nbytes / p.memory_bandwidth.value)
        return compute, exchange_bytes / p.exchange_bandwidth.value, self.sync_s

    def link_s(self, nbytes: float) -> float:
        return nbytes / self.preset.link_bandwidth.value

    def host_s(self, nbytes: float) -> float:
        return nbytes / self.preset.host_bandwidth.value

    def optimizer_s(self, elements: float, tensors: int, slots: int) -> float:
        """An element-wise optimizer step: read weight, gradient and state, write weight and
        state (fp32 state), memory-bound, one superstep per parameter tensor."""
        width = 2 if self.half else 4
        nbytes = elements * (3 * width + 2 * 4 * slots)
        return nbytes / self.preset.memory_bandwidth.value + tensors * self.sync_s


@dataclass
class OpRecord:
    name: str
    stage: int | None  # None: outside every placed module (spread over the IPUs)
    phase: str  # forward | backward
    flops: float
    dense_flops: float  # the FLOPs without block sparsity
    bytes: float
    exchange_bytes: float
    compute_s: float
    exchange_s: float
    sync_s: float

    @property
    def time_s(self) -> float:
        return self.compute_s + self.exchange_s + self.sync_s


class ModuleTagger:
    """Which tagged module an op belongs to, in the forward and in the backward pass.

    Forward: a stack of tagged modules (forward pre/post hooks). Backward: after each tagged
    module's forward, the autograd nodes it created (walked back from its outputs to its inputs)
    are mapped to its tag; during the backward pass the node being executed
    (``torch._C._current_autograd_node``) gives the tag. Nested tagged modules keep their own
    nodes (the inner one maps first).
    """

    def __init__(self, tags: dict[nn.Module, Any]) -> None:
        self.tags = tags
        self.stack: list[tuple[Any, set]] = []
        self.node_tag: dict[Any, Any] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> ModuleTagger:
        for module, tag in self.tags.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(tag), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.stack.clear()

    def reset(self) -> None:
        self.node_tag.clear()

    def _pre(self, tag: Any):
        def hook(module, args, kwargs):
            leaves, _ = tree_flatten((args, kwargs))
            stop = {t.grad_fn for t in leaves if isinstance(t, torch.Tensor) and t.grad_fn}
            self.stack.append((tag, stop))

        return hook

    def _post(self):
        def hook(module, args, kwargs, output):
            tag, stop = self.stack.pop()
            leaves, _ = tree_flatten(output)
            todo = [t.grad_fn for t in leaves if isinstance(t, torch.Tensor) and t.grad_fn]
            while todo:
                node = todo.pop()
                if node is None or node in stop or node in self.node_tag:
                    continue
                self.node_tag[node] = tag
                todo.extend(n for n, _ in node.next_functions if n is not None)

        return hook

    def current(self) -> Any:
        node = torch._C._current_autograd_node()
        if node is not None:
            return self.node_tag.get(node)
        return self.stack[-1][0] if self.stack else None


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


class OpRecorder(TorchDispatchMode):
    """Records the cost of every op run while active (see the module docstring).

    ``stage``: the stage of ops when no ``stage_tagger`` is given (``estimate_pipeline`` sets
    it per stage). ``sparse_layers``: block-sparse layers whose matmuls are costed at their
    density. ``stage_tagger``: places ops by module (``ModuleTagger`` of stage ids); it also
    enables counting inter-IPU traffic (tensors produced on one stage and used on another).
    """

    def __init__(
        self,
        cost: CostModel,
        *,
        stage: int | None = 0,
        stage_tagger: ModuleTagger | None = None,
        sparse_layers: Sequence[SparseLayer] = (),
        tensor_stages: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.cost = cost
        self.stage = stage
        self.stage_tagger = stage_tagger
        self.records: list[OpRecord] = []
        self.inter_ipu_bytes = 0.0
        # data_ptr -> stage of the tensors seen (seeded with the parameters' IPUs).
        self._producer: dict[int, int] = dict(tensor_stages or {})
        self.paused = False
        self._sent: set[tuple[int, int]] = set()
        self._sparse_tagger = (
            ModuleTagger({layer.module: layer for layer in sparse_layers})
            if sparse_layers
            else None
        )
        self._masks = {layer.mask.data_ptr(): layer for layer in sparse_layers}
        self._sparse_weights: set[int] = set()
        self._phase = "forward"
        # Told when a backward pass starts (the stash of the graph it frees ends there).
        self.activations: ActivationCounter | None = None

    def __enter__(self) -> OpRecorder:
        if self._sparse_tagger is not None:
            self._sparse_tagger.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if self._sparse_tagger is not None:
            self._sparse_tagger.__exit__(*exc)

    def _bytes(self, tensors: list[torch.Tensor]) -> float:
        return float(sum(t.numel() * storage_bytes(t, self.cost.half) for t in tensors))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        packet = func.overloadpacket
        name = packet.__name__
        if getattr(func, "is_view", False) or name in _FREE:
            return out
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        if self._masks and any(t.data_ptr() in self._masks for t in inputs):
            # The host's `weight = original * mask` (and its backward): the IPU stores only the
            # non-zeros, so this op does not exist there.
            self._sparse_weights.update(t.data_ptr() for t in outputs)
            return out
        flops = (
            float(flop_registry[packet](*args, **kwargs, out_val=out))
            if packet in flop_registry
            else 0.0
        )
        dense_flops = flops
        in_bytes, out_bytes = self._bytes(inputs), self._bytes(outputs)
        matmul = packet in flop_registry
        layer = self._sparse_tagger.current() if self._sparse_tagger is not None else None
        if matmul and layer is not None:
            uses_weight = any(t.data_ptr() in self._sparse_weights for t in inputs)
            makes_grad = any(tuple(t.shape) == layer.shape for t in outputs)
            if uses_weight or makes_grad:
                flops = dense_flops * layer.density
                weight_bytes = layer.mask.numel() * (2 if self.cost.half else 4)
                index = layer.blocks * float(self.cost.preset.sparse_index_bytes.value)
                saved = weight_bytes * (1.0 - layer.density) - index
                if uses_weight:
                    in_bytes = max(0.0, in_bytes - saved)
                if makes_grad:
                    out_bytes = max(0.0, out_bytes - saved)
        half = any(t.dtype in _HALF for t in inputs)
        exchange = in_bytes if matmul else 0.0
        compute_s, exchange_s, sync_s = self.cost.op_times(
            flops, in_bytes + out_bytes, exchange, half
        )
        stage = self.stage_tagger.current() if self.stage_tagger is not None else self.stage
        if self.stage_tagger is not None and stage is None:
            # Outside every placed module (agent-level losses, optimizer steps): the op runs
            # where its first placed operand lives.
            stage = next(
                (self._producer[p] for p in (t.data_ptr() for t in inputs) if p in self._producer),
                None,
            )
        if self.stage_tagger is not None and stage is not None:
            for t in inputs:
                src = self._producer.get(t.data_ptr())
                if src is not None and src != stage and (t.data_ptr(), stage) not in self._sent:
                    self._sent.add((t.data_ptr(), stage))
                    self.inter_ipu_bytes += self._bytes([t])
            for t in outputs:
                self._producer[t.data_ptr()] = stage
        phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        if phase == "backward" and self._phase == "forward" and self.activations is not None:
            self.activations.backward_started()
        self._phase = phase
        self.records.append(
            OpRecord(
                name,
                stage,
                phase,
                flops,
                dense_flops,
                in_bytes + out_bytes,
                exchange,
                compute_s,
                exchange_s,
                sync_s,
            )
        )
        return out


class ActivationCounter:
    """Peak bytes autograd saves for the backward pass (the activations a stage must stash),
    by stage; parameters (and views of them) are weights, not activations.

    A backward pass frees the graph it ran through, so the stash is counted per segment (from
    one backward's start to the next) and the largest segment is kept: ``bytes[stage]``.
    ``backward_started()`` (called by ``OpRecorder``) closes a segment.
    """

    def __init__(
        self, half: bool, stage_of: Callable[[], int | None], params: Sequence[torch.Tensor]
    ) -> None:
        self.half = half
        self.stage_of = stage_of
        self.bytes: dict[int | None, float] = defaultdict(float)
        self._live: dict[int | None, float] = defaultdict(float)
        self._params = {p.untyped_storage().data_ptr() for p in params}
        self._seen: set[int] = set()
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        ptr = storage.data_ptr()
        if ptr in self._params or ptr in self._seen:
            return t
        self._seen.add(ptr)
        width = 2 if (self.half and t.is_floating_point()) else t.element_size()
        self._live[self.stage_of()] += storage.nbytes() / max(1, t.element_size()) * width
        return t

    def backward_started(self) -> None:
        for stage, live in self._live.items():
            self.bytes[stage] = max(self.bytes[stage], live)
        self._live.clear()
        self._seen.clear()

    def __enter__(self) -> ActivationCounter:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)
        self.backward_started()


# --------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------


@dataclass
class StageCost:
    compute_s: float = 0.0
    exchange_s: float = 0.0
    sync_s: float = 0.0
    flops: float = 0.0
    dense_flops: float = 0.0
    bytes: float = 0.0
    ops: int = 0

    def add(self, r: OpRecord) -> None:
        self.compute_s += r.compute_s
        self.exchange_s += r.exchange_s
        self.sync_s += r.sync_s
        self.flops += r.flops
        self.dense_flops += r.dense_flops
        self.bytes += r.bytes
        self.ops += 1

    @property
    def time_s(self) -> float:
        return self.compute_s + self.exchange_s + self.sync_s

    def per_micro_batch_s(self, micro_batches: int) -> float:
        """Work splits over micro-batches; every micro-batch pays every op's sync."""
        return (self.compute_s + self.exchange_s) / micro_batches + self.sync_s


@dataclass
class StepEstimate:
    """The estimated time of one step on the simulated IPU(s). Every number is an estimate."""

    preset: str
    precision: str
    num_ipus: int
    stages: int
    micro_batches: int
    step_time_s: float
    stage_costs: list[StageCost]
    unplaced: StageCost
    inter_ipu_bytes: float = 0.0
    inter_ipu_s: float = 0.0
    host_io_bytes: float = 0.0
    host_io_s: float = 0.0
    optimizer_s: float = 0.0
    fill_drain_s: float = 0.0
    top_ops: list[dict[str, Any]] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.stage_costs) + self.unplaced.flops

    @property
    def dense_flops(self) -> float:
        return sum(s.dense_flops for s in self.stage_costs) + self.unplaced.dense_flops

    @property
    def compute_s(self) -> float:
        return sum(s.compute_s for s in self.stage_costs) + self.unplaced.compute_s

    @property
    def exchange_s(self) -> float:
        return sum(s.exchange_s for s in self.stage_costs) + self.unplaced.exchange_s

    @property
    def sync_s(self) -> float:
        return sum(s.sync_s for s in self.stage_costs) + self.unplaced.sync_s

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            flops=self.flops,
            dense_flops=self.dense_flops,
            compute_s=self.compute_s,
            exchange_s=self.exchange_s,
            sync_s=self.sync_s,
        )
        return out


def summarize(
    records: Sequence[OpRecord],
    cost: CostModel,
    *,
    num_ipus: int = 1,
    stages: int = 1,
    micro_batches: int = 1,
    inter_ipu_bytes: float = 0.0,
    host_io_bytes: float = 0.0,
    optimizer_s: float = 0.0,
    top: int = 8,
) -> StepEstimate:
    """Per-stage totals and the pipelined step time (see the module docstring)."""
    per_stage = [StageCost() for _ in range(stages)]
    unplaced = StageCost()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for r in records:
        (per_stage[r.stage] if r.stage is not None else unplaced).add(r)
        row = by_name[r.name]
        row[0] += 1
        row[1] += r.time_s
        row[2] += r.flops
    slowest = max(s.per_micro_batch_s(micro_batches) for s in per_stage)
    fill_drain = (stages - 1) * slowest
    inter_s = cost.link_s(inter_ipu_bytes)
    host_s = cost.host_s(host_io_bytes)
    step = (
        micro_batches * slowest
        + fill_drain
        + unplaced.time_s / stages
        + inter_s
        + host_s
        + optimizer_s
    )
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return StepEstimate(
        preset=cost.preset.name,
        precision="fp16" if cost.half else "fp32",
        num_ipus=num_ipus,
        stages=stages,
        micro_batches=micro_batches,
        step_time_s=step,
        stage_costs=per_stage,
        unplaced=unplaced,
        inter_ipu_bytes=inter_ipu_bytes,
        inter_ipu_s=inter_s,
        host_io_bytes=host_io_bytes,
        host_io_s=host_s,
        optimizer_s=optimizer_s,
        fill_drain_s=fill_drain,
        top_ops=[
            {"op": n, "count": int(c), "estimated_time_s": t, "flops": f} for n, (c, t, f) in ranked
        ],
    )


def estimate(
    fn: Callable[..., Any],
    *args: Any,
    preset: str | IPUPreset = "ipu2",
    precision: str = "fp32",
    modules: dict[str, nn.Module] | None = None,
    **kwargs: Any,
) -> tuple[Any, StepEstimate]:
    """Run ``fn(*args, **kwargs)`` on the host and estimate it on one IPU.

    ``modules``: where to look for block-sparse layers (costed at their density).
    Returns ``(fn's result, StepEstimate)``.
    """
    cost = CostModel(get_preset(preset), half=precision == "fp16")
    sparse = find_sparse_layers(modules or {})
    with OpRecorder(cost, sparse_layers=sparse) as recorder:
        result = fn(*args, **kwargs)
    return result, summarize(recorder.records, cost)


# --------------------------------------------------------------------------------------
# Explicit pipelines (a list of stage modules), e.g. Greedy InfoMax
# --------------------------------------------------------------------------------------


@dataclass
class PipelineEstimate:
    """Estimated step of ``micro_batches`` micro-batches through ``stages`` on ``num_ipus``."""

    preset: str
    precision: str
    num_ipus: int
    ipu_of_stage: list[int]
    micro_batches: int
    detached: bool
    step_time_s: float
    forward_s: list[float]  # per stage, per micro-batch
    backward_s: list[float]
    inter_ipu_bytes: float  # per step
    optimizer_s: float
    flops: float  # per step
    dense_flops: float
    memory: dict[str, Any]
    schedule: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _simulate(
    fwd: list[float],
    bwd: list[float],
    last_bwd: list[float],
    link_fwd: list[float],
    link_bwd: list[float],
    micro_batches: int,
    detached: bool,
) -> float:
    """Makespan of ``micro_batches`` through the IPU groups (per-group times per micro-batch).

    detached: a group does forward then its local backward for each micro-batch, and sends its
    output on as soon as its last stage's forward is done. Otherwise all forwards (GPipe fill),
    then backwards in order, each waiting for the next group's input gradient (drain).
    """
    groups, m_count = len(fwd), micro_batches
    if detached:
        done = [[0.0] * m_count for _ in range(groups)]
        ready = [[0.0] * m_count for _ in range(groups + 1)]
        for m in range(m_count):
            for g in range(groups):
                start = max(done[g][m - 1] if m else 0.0, ready[g][m])
                done[g][m] = start + fwd[g] + bwd[g]
                # The output leaves once the group's last forward is done (its local backward
                # still runs): everything but that last backward.
                sent = start + fwd[g] + bwd[g] - last_bwd[g]
                ready[g + 1][m] = sent + link_fwd[g]
        return max(done[g][m_count - 1] for g in range(groups))
    fend = [[0.0] * m_count for _ in range(groups)]
    for m in range(m_count):
        for g in range(groups):
            arrive = fend[g - 1][m] + link_fwd[g - 1] if g else 0.0
            fend[g][m] = max(fend[g][m - 1] if m else 0.0, arrive) + fwd[g]
    bend = [[0.0] * m_count for _ in range(groups)]
    for m in range(m_count):
        for g in reversed(range(groups)):
            arrive = bend[g + 1][m] + link_bwd[g] if g < groups - 1 else fend[g][m]
            free = bend[g][m - 1] if m else fend[g][m_count - 1]
            bend[g][m] = max(free, arrive) + bwd[g]
    return max(bend[g][m_count - 1] for g in range(groups))


def _default_loss(index: int, output: Any) -> torch.Tensor:
    return sum(t.float().pow(2).mean() for t in _tensors(output))


def estimate_pipeline(
    stages: Sequence[nn.Module],
    example: torch.Tensor,
    *,
    loss_fn: Callable[[int, Any], torch.Tensor] | None = None,
    preset: str | IPUPreset = "ipu2",
    num_ipus: int = 1,
    ipu_of_stage: Sequence[int] | None = None,
    micro_batches: int | None = None,
    detach_boundaries: bool = True,
    precision: str = "fp32",
    optimizer_slots: int = 2,
    check_memory: bool = True,
) -> PipelineEstimate:
    """Estimate a step of ``stages`` (applied in order) pipelined over ``num_ipus`` IPUs.

    ``example`` is one micro-batch of the first stage's input. ``loss_fn(i, output)`` is stage
    ``i``'s local loss when ``detach_boundaries`` (Greedy InfoMax: no gradient crosses a stage
    boundary) or, called with the last stage, the loss of end-to-end backprop (default: the mean
    square of the output, a stand-in for cost purposes). ``ipu_of_stage``: IPU per stage,
    non-decreasing (default: contiguous, evenly spread). ``micro_batches`` (default: the number
    of IPUs used) must be >= the pipeline stages. The stages really run (forward and backward,
    no optimizer step) once, on the host, to record their ops; gradients are left in ``.grad``.
    """
    if not stages:
        raise ValueError("estimate_pipeline: give at least one stage module")
    p = get_preset(preset)
    cost = CostModel(p, half=precision == "fp16")
    count = len(stages)
    if ipu_of_stage is None:
        ipu_of_stage = [i * num_ipus // count for i in range(count)]
    ipu_of_stage = list(ipu_of_stage)
    if len(ipu_of_stage) != count:
        raise ValueError(f"ipu_of_stage: {len(ipu_of_stage)} entries for {count} stages")
    check_pipeline(ipu_of_stage, num_ipus, what="pipeline placement")
    used = sorted(set(ipu_of_stage))
    micro_batches = micro_batches or len(used)
    check_accumulation(micro_batches, len(used))
    loss_fn = loss_fn or _default_loss
    sparse = find_sparse_layers({f"stage{i}": m for i, m in enumerate(stages)})

    fwd, bwd, act, out_bytes = [0.0] * count, [0.0] * count, [0.0] * count, [0.0] * count
    flops = dense = 0.0
    recorder = OpRecorder(cost, sparse_layers=sparse)
    with recorder:
        x: Any = example
        kept: list[tuple[Any, Any]] = []
        for i, stage in enumerate(stages):
            recorder.stage = i
            inp = x.detach().requires_grad_(not detach_boundaries and i > 0)
            params = list(stage.parameters())
            with ActivationCounter(cost.half, lambda: 0, params) as saved:
                y = stage(inp)
                loss = loss_fn(i, y) if detach_boundaries or i == count - 1 else None
            act[i] = saved.bytes[0]
            out_bytes[i] = float(sum(t.numel() * storage_bytes(t, cost.half) for t in _tensors(y)))
            if detach_boundaries:
                loss.backward()
            else:
                kept.append((inp, y if loss is None else loss))
            x = y
        if not detach_boundaries:
            grad = None
            for i in reversed(range(count)):
                recorder.stage = i
                inp, out = kept[i]
                torch.autograd.backward(out, grad_tensors=grad)
                grad = inp.grad
    for r in recorder.records:
        (fwd if r.phase == "forward" else bwd)[r.stage] += r.time_s
        flops += r.flops
        dense += r.dense_flops

    # Merge consecutive stages on one IPU into pipeline groups.
    groups: list[list[int]] = []
    for i, ipu in enumerate(ipu_of_stage):
        if groups and ipu_of_stage[groups[-1][0]] == ipu:
            groups[-1].append(i)
        else:
            groups.append([i])
    g_fwd = [sum(fwd[i] for i in g) for g in groups]
    g_bwd = [sum(bwd[i] for i in g) for g in groups]
    last_bwd = [bwd[g[-1]] for g in groups]
    link = [cost.link_s(out_bytes[g[-1]]) for g in groups]
    link_back = [0.0 if detach_boundaries else s for s in link]
    step = _simulate(g_fwd, g_bwd, last_bwd, link, link_back, micro_batches, detach_boundaries)
    boundary = sum(out_bytes[g[-1]] for g in groups[:-1])
    inter = micro_batches * boundary * (1 if detach_boundaries else 2)

    plan = MemoryPlan(p, num_ipus)
    stage_modules = {f"stage{i}": m for i, m in enumerate(stages)}
    add_parameters(
        plan,
        stage_modules,
        [],
        lambda name: ipu_of_stage[int(name.split(".")[0][5:])],
        cost.half,
        sparse,
    )
    per_ipu_elements: dict[int, list[float]] = defaultdict(lambda: [0.0, 0])
    for i, stage in enumerate(stages):
        for param in stage.parameters():
            if param.requires_grad:
                width = 2 if cost.half else 4
                plan.add(f"stage{i}.gradients", ipu_of_stage[i], "gradients", param.numel() * width)
                plan.add(
                    f"stage{i}.optimizer",
                    ipu_of_stage[i],
                    "optimizer state",
                    param.numel() * 4 * optimizer_slots,
                )
                per_ipu_elements[ipu_of_stage[i]][0] += param.numel()
                per_ipu_elements[ipu_of_stage[i]][1] += 1
        # Detached stages step each micro-batch at once (one stash); backprop keeps all M.
        in_flight = 1 if detach_boundaries else micro_batches
        plan.add(
            f"stage{i} activations", ipu_of_stage[i], "stashed activations", act[i] * in_flight
        )
    optimizer = max(
        (cost.optimizer_s(n, int(t), optimizer_slots) for n, t in per_ipu_elements.values()),
        default=0.0,
    )
    if check_memory:
        plan.check()
    return PipelineEstimate(
        preset=p.name,
        precision=precision,
        num_ipus=num_ipus,
        ipu_of_stage=ipu_of_stage,
        micro_batches=micro_batches,
        detached=detach_boundaries,
        step_time_s=step + optimizer,
        forward_s=fwd,
        backward_s=bwd,
        inter_ipu_bytes=inter,
        optimizer_s=optimizer,
        flops=flops * micro_batches,
        dense_flops=dense * micro_batches,
        memory=plan.summary(),
        schedule="greedy-infomax overlap (no backward traffic)"
        if detach_boundaries
        else "backprop pipeline (fill/drain)",
    )
