"""Counting what one training step dispatches: aten ops and host syncs.

A PyTorch update that is overhead-bound pays per op (dispatch, and on cuda a kernel launch)
and per host sync (``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``bool(t)``; on cuda
the device stalls until the host has read the value). Two ways to count them:

- ``count_dispatch(fn)``: a ``TorchDispatchMode`` sees every aten op that eager code dispatches
  below autograd (backward ops included). Compiled regions do not run under such a mode (they
  fall back to eager), so this counts eager code only.
- ``count_profiled(fn)``: the autograd profiler, which also sees compiled code. Its op count is
  the top-level aten calls that still go through the dispatcher (the eager remainder of a step
  and a compiled graph's fallback kernels); a compiled graph's own fused kernels are counted
  separately as ``compiled_calls``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OP = "aten::_local_scalar_dense"


@dataclass
class OpCount:
    """Ops dispatched and host syncs made by one call; ``result`` is what the call returned."""

    ops: int
    host_syncs: int
    compiled_calls: int = 0
    result: Any = None


class _DispatchCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def count_dispatch(fn: Callable[[], Any]) -> OpCount:
    """aten ops and host syncs of ``fn()`` as eager code dispatches them."""
    with _DispatchCounter() as counter:
        result = fn()
    return OpCount(counter.ops, counter.syncs, 0, result)


# The aten ops through which Python code reads a tensor's value (.item(), bool(t)).
_READS = ("aten::item", "aten::is_nonzero", SYNC_OP)


def _requested_by_caller(event) -> bool:
    """Whether a ``_local_scalar_dense`` event is a read the caller asked for, not a kernel's
    own read of a host-side scalar (fused Adam's step counters on cpu: no sync)."""
    parent = event.cpu_parent
    while parent is not None and parent.name in _READS:
        parent = parent.cpu_parent
    return parent is None or not parent.name.startswith("aten::")


def count_profiled(fn: Callable[[], Any]) -> OpCount:
    """Top-level aten calls, host syncs and compiled-graph calls of ``fn()``, from the profiler
    (works for compiled code; see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    ops = syncs = compiled = 0
    for event in prof.events():
        name = event.name
        if name.startswith("## Call CompiledFxGraph"):
            compiled += 1
        parent = event.cpu_parent
        # Top level: not called from inside another aten op (autograd's backward ops count).
        if name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            ops += 1
        if name == SYNC_OP and _requested_by_caller(event):
            syncs += 1
    return OpCount(ops, syncs, compiled, result)


__all__ = ["OpCount", "count_dispatch", "count_profiled"]
