"""The host-sync counters against each op that needs the host, and ops that do not.

Every op below waits for the device on cuda (its output shape or value is read by the host);
on cpu nothing waits, so the counters must recognise the op itself. Each case is counted by
both counters (``count_dispatch``: TorchDispatchMode + TorchFunctionMode; ``count_profiled``:
the profiler's event tree and Python tracer) and must give exactly the stated number.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from imagine_rl.runtime.profiling import (
    HOST_READ_METHODS,
    HOST_SYNC_OPS,
    count_dispatch,
    count_profiled,
)

torch.set_num_threads(1)

X = torch.tensor([1.0, -2.0, 3.0, 0.0])
MASK = X > 0
REPEATS = torch.tensor([1, 2, 0, 1])


def _write_through_mask(value):
    def write():
        y = X.clone()
        y[MASK] = value
        return y

    return write


NEEDS_HOST = {
    "nonzero": lambda: X.nonzero(),
    "where(cond)": lambda: torch.where(MASK),
    "argwhere": lambda: torch.argwhere(X),
    "x[mask]": lambda: X[MASK],
    "x[:, mask]": lambda: X[None][:, MASK],
    "x[mask] = tensor": _write_through_mask(torch.tensor([5.0, 6.0])),
    "masked_select": lambda: X.masked_select(MASK),
    "unique": lambda: X.unique(),
    "unique(inverse, counts)": lambda: torch.unique(X, return_inverse=True, return_counts=True),
    "unique(dim)": lambda: torch.unique(X[None], dim=1),
    "unique_consecutive": lambda: X.unique_consecutive(),
    "bincount": lambda: REPEATS.bincount(),
    "histc(range from data)": lambda: X.histc(bins=3),
    "repeat_interleave(tensor)": lambda: X.repeat_interleave(REPEATS),
    "item": lambda: X.sum().item(),
    "float": lambda: float(X.sum()),
    "bool": lambda: bool(X.sum()),
    "if t": lambda: 1 if X.sum() else 0,
    "is_nonzero": lambda: X.sum().is_nonzero(),
    "int index": lambda: [1, 2, 3][X.long()[0]],
    "equal": lambda: torch.equal(X, X),
    "tolist": lambda: X.tolist(),
    "cpu": lambda: X.cpu(),
    "numpy": lambda: X.numpy(),
    "np.asarray": lambda: np.asarray(X),
    "repr": lambda: repr(X),
    "format": lambda: f"{X.sum():.2f}",
    # A chain of reads of one tensor is one read: the first brings it to the host.
    "cpu().numpy()": lambda: X.cpu().numpy(),
    "cpu().item()": lambda: X.sum().cpu().item(),
    "cpu().tolist()": lambda: X.detach().cpu().tolist(),
}

SYNC_FREE = {
    "add": lambda: X + 1,
    "where(cond, x, y)": lambda: torch.where(MASK, X, 0.0),
    "index_select": lambda: X.index_select(0, REPEATS),
    "x[long]": lambda: X[REPEATS],
    "masked_fill": lambda: X.masked_fill(MASK, 0.0),
    # One host scalar through one mask: ATen writes it with masked_fill_, no nonzero.
    "x[mask] = 0.0": _write_through_mask(0.0),
    "repeat_interleave(tensor, output_size)": lambda: X.repeat_interleave(REPEATS, output_size=4),
    "repeat_interleave(int)": lambda: X.repeat_interleave(2),
    "nonzero_static": lambda: torch.nonzero_static(X, size=4),
    "histc(given range)": lambda: X.histc(bins=3, min=-2, max=3),
    "sort": lambda: X.sort(),
    "to(float64)": lambda: X.to(torch.float64),
    # On cpu the same call as moving a batch to the agent's device: no read.
    "to(cpu)": lambda: X.to("cpu"),
    # A kernel's own host-side checks on cpu (quantile's aten::equal, multinomial's
    # _assert_async): none on cuda.
    "quantile": lambda: torch.quantile(X, torch.tensor([0.1, 0.9])),
    "multinomial": lambda: torch.multinomial(X.abs(), 2),
    "clip_grad_norm_(foreach)": lambda: torch.nn.utils.clip_grad_norm_(
        [torch.nn.Parameter(X.clone())], 1.0, foreach=True
    ),
}


@pytest.mark.parametrize("name", list(NEEDS_HOST))
def test_each_op_that_needs_the_host_counts_once(name):
    fn = NEEDS_HOST[name]
    assert count_dispatch(fn).host_syncs == 1
    assert count_profiled(fn).host_syncs == 1


@pytest.mark.parametrize("name", list(SYNC_FREE))
def test_sync_free_ops_count_zero(name):
    fn = SYNC_FREE[name]
    assert count_dispatch(fn).host_syncs == 0
    profiled = count_profiled(fn)
    assert profiled.ops >= 1  # the profiler saw the op (x.to("cpu") dispatches nothing)
    assert profiled.host_syncs == 0


def test_counts_add_up_over_several_reads():
    def three_reads():
        X.nonzero()
        X[MASK]
        return X.sum().item()

    assert count_dispatch(three_reads).host_syncs == 3
    assert count_profiled(three_reads).host_syncs == 3


def test_fused_adam_on_cpu_reads_its_host_side_step_without_a_sync():
    """fused Adam reads its step counter with .item() inside its cpu kernel: a host-side
    scalar there, a device tensor on cuda. Neither counter counts it."""
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    adam = torch.optim.Adam([param], fused=True)
    adam.step()
    assert count_dispatch(adam.step).host_syncs == 0
    assert count_profiled(adam.step).host_syncs == 0


def test_device_to_host_copies_count_as_syncs():
    """A tensor on a device without one: a fake cuda tensor. The dispatch counter sees the
    copies' source and destination devices (the profiler records a fake tensor as meta)."""
    with FakeTensorMode():
        on_device = torch.ones(3, device="cuda")
        host = torch.empty(3)
    assert on_device.device.type == "cuda"
    assert count_dispatch(lambda: on_device.to("cpu")).host_syncs == 1
    assert count_dispatch(lambda: host.copy_(on_device)).host_syncs == 1
    assert count_dispatch(lambda: on_device.cpu()).host_syncs == 1
    # The copy's result is on the host: reading it is the same read.
    assert count_dispatch(lambda: on_device.to("cpu").add(1)).host_syncs == 1
    assert count_dispatch(lambda: on_device + 1).host_syncs == 0


def test_the_lists_name_a_reason_for_each_entry():
    for name, why in {**HOST_SYNC_OPS, **HOST_READ_METHODS}.items():
        assert why.strip(), name
    assert all(name.startswith("aten::") for name in HOST_SYNC_OPS)
    assert all(hasattr(torch.Tensor, name) for name in HOST_READ_METHODS)
