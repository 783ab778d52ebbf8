"""Counting what one training step dispatches: aten ops and host syncs.

A PyTorch update that is overhead-bound pays per op (dispatch, and on cuda a kernel launch)
and per host sync: an op whose output shape or value the host must know before it can go on
(``.item()``, ``nonzero``, ``x[mask]``, ``unique``, a copy to the host, ...). On cuda the host
then waits until the device has run everything queued before it. ``HOST_SYNC_OPS`` lists those
aten ops, each with why it needs the host, and ``HOST_READ_METHODS`` the tensor methods that
hand a tensor's data to Python. Both counters count the same list:

- ``count_dispatch(fn)``: a ``TorchDispatchMode`` sees every aten op that eager code dispatches
  below autograd (backward ops included), with its arguments, so the conditional entries
  (``x[mask]`` only with a bool mask, a copy only from a device to the host) are decided on the
  real tensors. Compiled regions do not run under such a mode (they fall back to eager), so
  this counts eager code only.
- ``count_profiled(fn)``: the autograd profiler, which also sees compiled code. Its op count is
  the top-level aten calls that still go through the dispatcher (the eager remainder of a step
  and a compiled graph's fallback kernels); a compiled graph's own fused kernels are counted
  separately as ``compiled_calls``. Both come from the profiler's event tree, where each op
  has its parent, its callees and (``record_shapes``) its inputs' devices and dtypes: an op of
  the list counts once, with whatever it calls (``x[mask]`` is ``aten::index`` calling
  ``aten::nonzero``: 1 sync).

On cpu nothing waits, and some host reads dispatch nothing that tells them apart: ``.cpu()``
and ``.numpy()`` of a cpu tensor are no-ops, ``.tolist()`` reads the memory directly. On cuda
each of them copies from the device. So both counters also count the Python calls of
``HOST_READ_METHODS``: ``count_dispatch`` through a ``TorchFunctionMode`` around ``fn``,
``count_profiled`` through the profiler's Python tracer (``with_stack``; a function mode would
make ``torch.compile`` trace and recompile the graphs under it). A chain of reads of one tensor
counts once: ``x.cpu().numpy()`` and ``x.cpu().item()`` are one host read (the result of a
counted read is on the host; the later reads of its storage are not counted). On cpu, where
``.cpu()`` returns ``x`` itself, a later read of ``x`` is then not counted either, so a count
can be below cuda's, but never 0 where there is a read. ``x.to("cpu")`` counts only where it
copies from a device (``_to_copy``): on cpu it is the same call as moving a batch to the
agent's device, which is no read.

A kernel's own read of a host-side value is not a sync and not counted: fused Adam's step
counters on cpu, ``_assert_async`` on cpu (on cuda it checks on the device), ``quantile``'s
``aten::equal`` check on cpu, ``x[mask] = 0.0`` (``index_put_`` becomes ``masked_fill_`` with
the host scalar). In the profiler these are ``_local_scalar_dense`` / ``equal`` calls inside
another aten op; the dispatch mode never sees them. What a kernel computes on the host
without dispatching anything is invisible to both counters.

The list is what the counters know, not everything that can sync: a new op that sizes its
output from data must be added to ``HOST_SYNC_OPS``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose output shape or value the host needs: on cuda each waits for the device.
# Name (as the profiler and ``func._schema.name`` spell it) -> why.
HOST_SYNC_OPS: dict[str, str] = {
    "aten::_local_scalar_dense": (
        "copies one element into a Python number: .item(), float(t), int(t), bool(t), `if t:`"
    ),
    "aten::item": "the same read (the profiler's name of .item() around _local_scalar_dense)",
    "aten::is_nonzero": "bool(t), `if t:` (the profiler's name around _local_scalar_dense)",
    "aten::nonzero": (
        "output length = number of non-zeros, read by the host to allocate the output; "
        "torch.where(c), argwhere and x[mask] go through it"
    ),
    "aten::masked_select": "output length = mask.sum(), read by the host",
    "aten::_unique": "torch.unique: output length = number of distinct values",
    "aten::_unique2": "torch.unique: output length = number of distinct values",
    "aten::unique_dim": "torch.unique(dim=): output length = number of distinct slices",
    "aten::unique_consecutive": "output length = number of runs",
    "aten::unique_dim_consecutive": "output length = number of runs",
    "aten::bincount": "output length = max(x) + 1",
    "aten::equal": "returns a Python bool computed from the data",
    "aten::allclose": "returns a Python bool computed from the data",
    # Only with some arguments (decided in _dispatch_needs_host and _profiled_syncs):
    "aten::index": "x[mask] with a bool/uint8 mask: the mask becomes indices through nonzero",
    "aten::index_put_": (
        "x[mask] = v with a bool/uint8 mask, through nonzero; not when v is one host scalar "
        "(ATen's masked_fill_ fast path)"
    ),
    "aten::index_put": "as index_put_",
    "aten::_index_put_impl_": "as index_put_",
    "aten::repeat_interleave": (
        "a tensor of repeats without output_size: output length = repeats.sum()"
    ),
    "aten::histc": "min == max (the default): the range is read from the data",
    "aten::_to_copy": "from a device to the host (x.to('cpu') of a cuda tensor)",
    "aten::copy_": "from a device into a host tensor",
}
_CONDITIONAL = {
    "aten::index",
    "aten::index_put_",
    "aten::index_put",
    "aten::_index_put_impl_",
    "aten::repeat_interleave",
    "aten::histc",
    "aten::_to_copy",
    "aten::copy_",
}
# Reads into a Python value: a caller's sync, or, inside another aten op, the kernel's own
# read of a host-side value (fused Adam's step on cpu; quantile's aten::equal check on cpu).
_CALLER_READS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::equal",
    "aten::allclose",
}
# Ops whose cpu and cuda kernels size their output through their own .item() when it syncs.
_SIZED_BY_ITEM = {"aten::repeat_interleave", "aten::histc"}

# Tensor methods that hand a tensor's data to Python. On cuda each copies it to the host (or,
# for .numpy(), needs it there already); on cpu they dispatch nothing of their own.
HOST_READ_METHODS: dict[str, str] = {
    "cpu": "copies the tensor to the host",
    "numpy": "a numpy array over host memory (a device tensor must be copied first)",
    "tolist": "Python numbers of every element",
    "__array__": "np.asarray(t): .numpy()",
    "__repr__": "printing reads the values",
    "__format__": "f'{t}' reads the values",
}
_READ_FUNCS = {getattr(torch.Tensor, name): name for name in HOST_READ_METHODS}
_MASK_DTYPES = (torch.bool, torch.uint8)


@dataclass
class OpCount:
    """Ops dispatched and host syncs made by one call; ``result`` is what the call returned."""

    ops: int
    host_syncs: int
    compiled_calls: int = 0
    result: Any = None


def _storage_key(tensor: Any) -> int | None:
    """Which storage a tensor is on (shared by its views and ``.detach()``), or None."""
    if not isinstance(tensor, torch.Tensor):
        return None
    try:
        return tensor.untyped_storage()._cdata  # the StorageImpl's address
    except (RuntimeError, NotImplementedError):  # no storage (sparse, some subclasses)
        return None


def _is_host(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _on_device(tensor: Any) -> bool:
    """A tensor on an accelerator (not the host, not the storage-less meta device)."""
    return isinstance(tensor, torch.Tensor) and tensor.device.type not in ("cpu", "meta")


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in _MASK_DTYPES


def _bind(func, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``func``'s arguments by name (positional ones first, as the schema orders them)."""
    bound = {a.name: a.default_value for a in func._schema.arguments if a.has_default_value()}
    bound.update(zip((a.name for a in func._schema.arguments), args))
    bound.update(kwargs)
    return bound


def _masked_fill_path(bound: dict[str, Any]) -> bool:
    """Whether ``index_put_`` takes ATen's ``canDispatchToMaskedFill`` fast path: one host
    scalar written through one bool mask (on the tensor's device) that spans its dimensions.
    It becomes ``masked_fill_`` with that scalar: no nonzero, no sync."""
    self, values = bound["self"], bound["values"]
    if bound.get("accumulate") or values.numel() != 1 or values.device.type != "cpu":
        return False
    defined = [(i, index) for i, index in enumerate(bound["indices"]) if index is not None]
    if len(defined) != 1:
        return False
    before, mask = defined[0]
    if not _is_mask(mask) or mask.device != self.device:
        return False
    return tuple(mask.shape) == tuple(self.shape[before : before + mask.dim()])


def _dispatch_needs_host(func, args: tuple, kwargs: dict) -> bool:
    """Whether one dispatched aten call needs the host (see ``HOST_SYNC_OPS``)."""
    name = func._schema.name
    if name not in HOST_SYNC_OPS:
        return False
    if name not in _CONDITIONAL:
        return True
    bound = _bind(func, args, kwargs)
    if name == "aten::index":
        return any(_is_mask(index) for index in bound["indices"])
    if name in ("aten::index_put_", "aten::index_put", "aten::_index_put_impl_"):
        masked = any(_is_mask(index) for index in bound["indices"])
        return masked and not _masked_fill_path(bound)
    if name == "aten::repeat_interleave":
        return isinstance(bound["repeats"], torch.Tensor) and bound.get("output_size") is None
    if name == "aten::histc":
        return bound["min"] == bound["max"]
    if name == "aten::_to_copy":
        return _on_device(bound["self"]) and _is_host(bound.get("device"))
    # aten::copy_
    return bound["self"].device.type == "cpu" and _on_device(bound["src"])


class _DispatchCounter(TorchDispatchMode):
    """Counts aten calls, and those of them that need the host, below autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.reading = 0  # > 0 inside a counted Python read: its own copies are that read
        # Storage -> a tensor on it, of every counted read's result (kept alive, so that no
        # other storage takes its address while counting).
        self.on_host: dict[int, torch.Tensor] = {}

    def read_before(self, tensor: Any) -> bool:
        return _storage_key(tensor) in self.on_host

    def mark_on_host(self, tensor: Any) -> None:
        key = _storage_key(tensor)
        if key is not None:
            self.on_host[key] = tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        needs_host = not self.reading and _dispatch_needs_host(func, args, kwargs)
        if needs_host and func._schema.name == "aten::_local_scalar_dense":
            needs_host = not self.read_before(args[0])
        out = func(*args, **kwargs)
        if needs_host:
            self.syncs += 1
            if func._schema.name in ("aten::_to_copy", "aten::copy_"):
                self.mark_on_host(out)
        return out


class _PythonReads(TorchFunctionMode):
    """Counts the ``HOST_READ_METHODS`` calls into ``counter`` (see the module docstring)."""

    def __init__(self, counter: _DispatchCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _READ_FUNCS.get(func)
        if name is None or not args or self.counter.reading:
            return func(*args, **kwargs)
        counted = not self.counter.read_before(args[0])
        self.counter.reading += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.counter.reading -= 1
        if counted:
            self.counter.syncs += 1
            if name == "cpu":
                self.counter.mark_on_host(out)
        return out


def count_dispatch(fn: Callable[[], Any]) -> OpCount:
    """aten ops and host syncs of ``fn()`` as eager code dispatches them; the syncs include
    the ``HOST_READ_METHODS`` calls, which a ``TorchFunctionMode`` sees."""
    counter = _DispatchCounter()
    with _PythonReads(counter), counter:
        result = fn()
    return OpCount(counter.ops, counter.syncs, 0, result)


# "<built-in method cpu of Tensor object at 0x7f...>": the Python tracer's name of a C method
# call; "torch/_tensor.py(1241): __array__": of a Python function.
_C_METHOD = re.compile(r"<built-in method (\w+) of (\w+) object at 0x[0-9a-f]+>")
_PY_FUNCTION = re.compile(r"torch/_tensor\.py\(\d+\): (\w+)$")


def _python_read(event) -> str | None:
    """The ``HOST_READ_METHODS`` name a Python-tracer event calls on a tensor, else None."""
    match = _C_METHOD.fullmatch(event.name) or _PY_FUNCTION.search(event.name)
    if match is None or match.group(1) not in HOST_READ_METHODS:
        return None
    if match.re is _C_METHOD and match.group(2) not in ("Tensor", "Parameter", "Buffer"):
        return None  # ndarray.tolist, list.copy: not tensors
    return match.group(1)


def _tensor_inputs(event) -> list:
    inputs = getattr(event.typed[1], "inputs", None) or []
    return [i for i in inputs if isinstance(i, torch._C._profiler._TensorMetadata)]


def _subtree(event):
    stack = [event]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)


def _first_storage(event) -> int | None:
    """Storage address of the first tensor the first aten op under ``event`` reads."""
    for node in _subtree(event):
        if node.tag == torch._C._profiler._EventType.TorchOp:
            tensors = _tensor_inputs(node)
            if tensors:
                return tensors[0].storage_data_ptr
    return None


def _host_copy(event) -> int | None:
    """The destination storage of a device -> host copy made under ``event``, else None."""
    for node in _subtree(event):
        if node.tag == torch._C._profiler._EventType.TorchOp and node.name == "aten::copy_":
            tensors = _tensor_inputs(node)  # (destination, source)
            to_host = len(tensors) == 2 and tensors[0].device.type == "cpu"
            if to_host and tensors[1].device.type not in ("cpu", "meta"):
                return tensors[0].storage_data_ptr
    return None


def _profiled_syncs(roots) -> int:
    """Host syncs in the profiler's event tree: each ``HOST_SYNC_OPS`` op (arguments decided
    from the recorded inputs and what the op called) and each ``HOST_READ_METHODS`` call counts
    once, with everything under it; see the module docstring."""
    torch_op = torch._C._profiler._EventType.TorchOp
    on_host: set[int] = set()
    syncs = 0
    # (event, whether an aten op encloses it: its scalar reads are the kernel's own)
    stack = [(root, False) for root in reversed(roots)]
    while stack:
        event, in_aten = stack.pop()
        if event.tag == torch_op:
            name = event.name
            if name in _CALLER_READS:
                if not in_aten and _first_storage(event) not in on_host:
                    syncs += 1
                continue
            if name in HOST_SYNC_OPS and name not in _CONDITIONAL:
                syncs += 1
                continue
            if name in _SIZED_BY_ITEM and any(
                node.name == "aten::_local_scalar_dense" for node in _subtree(event)
            ):
                syncs += 1
                continue
            if name == "aten::copy_":
                copied = _host_copy(event)
                if copied is not None:
                    syncs += 1
                    on_host.add(copied)
                    continue
            # index / index_put_ with a mask and _to_copy to the host: their nonzero or copy_
            # is found below them.
            in_aten = in_aten or name.startswith("aten::")
        else:
            method = _python_read(event)
            if method is not None:
                if _first_storage(event) not in on_host:
                    syncs += 1
                if method == "cpu":  # its result: the host copy, or the tensor itself on cpu
                    copied = _host_copy(event)
                    on_host.add(copied if copied is not None else _first_storage(event))
                continue
        stack.extend((child, in_aten) for child in reversed(event.children))
    return syncs


def count_profiled(fn: Callable[[], Any]) -> OpCount:
    """Top-level aten calls, host syncs and compiled-graph calls of ``fn()``, from the profiler
    (works for compiled code; see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True) as prof:
        result = fn()
    # The event tree, not prof.events(): the same events (parents included) without building
    # a FunctionEvent for each, which took seconds per update.
    roots = prof.profiler.kineto_results.experimental_event_tree()
    torch_op = torch._C._profiler._EventType.TorchOp
    ops = compiled = 0
    for root in roots:
        for event in _subtree(root):
            name = event.name
            if name.startswith("## Call CompiledFxGraph"):
                compiled += 1
            parent = event.parent
            # Top level: not called from inside another aten op (autograd's backward ops and
            # calls from Python frames count).
            top = parent is None or not parent.name.startswith("aten::")
            if top and name.startswith("aten::") and event.tag == torch_op:
                ops += 1
    return OpCount(ops, _profiled_syncs(roots), compiled, result)


__all__ = ["HOST_READ_METHODS", "HOST_SYNC_OPS", "OpCount", "count_dispatch", "count_profiled"]
