"""Compressed kernels for balanced block-sparse ``nn.Linear`` layers, and the per-shape choice.

``balanced-bsr-bmm``: a weight ``W [out, in]`` whose mask keeps exactly ``K`` of the ``C = in/b``
``b x b`` blocks in each of its ``R = out/b`` block-rows is stored as ``Wb [R, b, K*b]`` (the
active blocks of each block-row side by side) plus the block-column indices ``idx [R, K]``.
For a chunk of ``m`` rows of ``x [N, in]`` viewed as ``[m, C, b]`` (one ``b``-vector per input
block):

    G  = x[n0:n1][:, idx]             # [m, R*K, b] -> [R, m, K*b] (index_select; strided view)
    y  = bmm(G, Wb^T)                 # [R, m, b]   -> y[n0:n1] viewed as [m, R, b]

and the backward is two more batched matmuls plus an ``index_add`` per chunk:

    dWb^T += bmm(G^T, dy)             # [R, K*b, b], scattered back into a dense dW once
    dG     = bmm(dy, Wb);  dx[:, idx] += dG

BLAS reads the strided ``[R, m, .]`` views directly, so no chunk is transposed (the first
version transposed every chunk in and out: those copies took 0.65 s of a 3 s xs update).
``G`` is ``out * K`` values per row of ``x`` (``out * density / b`` times the row). The rows go
through in chunks whose ``G`` fits ``workspace_limit()`` bytes (512 KiB: a chunk's gather
and matmul stay in the core's cache; one gather of every row at once is memory
bound, measured 1.2-1.4x dense time at 16,384 rows where 64-row chunks took 0.8x). ``G`` lives
in a reused buffer and is rebuilt in the backward from the saved input rather than saved.
The buffers are per process and not thread-safe (one forward/backward at a time per device
and dtype).

Whether the kernel pays depends on shape, density, block, rows, threads and the machine:
``choose_kernel`` measures forward+backward against the dense-masked ``F.linear`` once per key
and caches the decision; below ``min_rows()`` rows a call runs dense-masked (the gather and the
``b``-row matmuls cost more than they save: 2-6x dense time at 16 rows, every shape measured).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

DENSE_MASKED = "dense-masked"
BALANCED_BMM = "balanced-bsr-bmm"
# The fast kernel must beat dense-masked by this factor to be chosen (measurements are noisy).
CHOOSE_MARGIN = 0.9

_WORKSPACE: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}
_WORKSPACE_LIMIT = [512 * 2**10]
_MIN_ROWS = [128]
_DECISIONS: dict[tuple, dict] = {}


def workspace_limit() -> int:
    """Bytes the gathered input of one chunk of rows may take (its gradient takes as much)."""
    return _WORKSPACE_LIMIT[0]


def set_workspace_limit(nbytes: int) -> None:
    _WORKSPACE_LIMIT[0] = int(nbytes)


def min_rows() -> int:
    """Rows (the product of the input's leading dims) below which a fast layer runs
    dense-masked."""
    return _MIN_ROWS[0]


def set_min_rows(rows: int) -> None:
    _MIN_ROWS[0] = int(rows)


def clear_workspace() -> None:
    """Free the reused buffers (they grow to the largest chunk seen)."""
    _WORKSPACE.clear()


def _buffer(slot: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    key = (str(like.device), like.dtype, slot)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        _WORKSPACE[key] = buf
    return buf[:numel]


def indices_from_mask(block_active: torch.Tensor) -> torch.Tensor:
    """``[R, K]`` sorted active block-columns of a balanced ``[R, C]`` bool block mask."""
    rows = block_active.shape[0]
    counts = block_active.sum(dim=1)
    if rows and not bool((counts == counts[0]).all()):
        raise ValueError("sparse: mask is not balanced (block-rows keep different block counts)")
    return block_active.nonzero()[:, 1].reshape(rows, -1).contiguous()


def pack_blocks(weight: torch.Tensor, idx: torch.Tensor, block: int) -> torch.Tensor:
    """``[R, b, K*b]``: the active blocks of each block-row of ``weight [out, in]``."""
    rows, k = idx.shape
    w4 = weight.reshape(rows, block, weight.shape[1] // block, block)
    ar = torch.arange(rows, device=idx.device).unsqueeze(1)
    return w4[ar, :, idx, :].permute(0, 2, 1, 3).reshape(rows, block, k * block)


def unpack_blocks(wb: torch.Tensor, idx: torch.Tensor, shape: tuple[int, int], block: int):
    """Dense ``[out, in]`` tensor, zero outside the blocks, from packed ``wb [R, b, K*b]``."""
    rows, k = idx.shape
    dense = wb.new_zeros(shape)
    d4 = dense.view(rows, block, shape[1] // block, block)
    ar = torch.arange(rows, device=idx.device).unsqueeze(1)
    d4[ar, :, idx, :] = wb.reshape(rows, block, k, block).permute(0, 2, 1, 3)
    return dense


def _chunk_rows(rows: int, k: int, block: int, n: int, itemsize: int) -> int:
    """Rows of ``x`` per chunk: as many as keep the chunk's ``G`` within the workspace."""
    per_row = rows * k * block * itemsize
    return max(1, min(n, workspace_limit() // max(per_row, 1)))


def _gather(x2d: torch.Tensor, idxf: torch.Tensor, n0: int, n1: int, block: int) -> torch.Tensor:
    """``[m, R*K, b]``: for the rows ``n0:n1`` of ``x2d [N, in]``, the input features of every
    kept block (one ``b``-vector per row, block-row and kept block), in a reused buffer."""
    m = n1 - n0
    g = _buffer("G", m * idxf.numel() * block, x2d).view(m, idxf.numel(), block)
    torch.index_select(x2d[n0:n1].view(m, -1, block), 1, idxf, out=g)
    return g


# Row chunks of x (contiguous slices) are gathered by whole input blocks into ``[m, R*K, b]``
# and multiplied per block-row as strided batches (``[R, m, K*b] @ [R, K*b, b]``): BLAS reads
# the strided views directly, so no chunk is transposed.
def _forward(x2d: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, block: int):
    rows, k = idx.shape
    out_f, in_f = weight.shape
    idxf = idx.reshape(-1)
    wbt = pack_blocks(weight.detach(), idx, block).transpose(1, 2).contiguous()  # [R, K*b, b]
    x2d = x2d.contiguous()
    n = x2d.shape[0]
    y = x2d.new_empty(n, out_f)
    step = _chunk_rows(rows, k, block, n, x2d.element_size())
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        g = _gather(x2d, idxf, n0, n1, block).view(n1 - n0, rows, k * block).transpose(0, 1)
        y[n0:n1].view(n1 - n0, rows, block).transpose(0, 1).copy_(torch.bmm(g, wbt))
    return y


def _backward(gy, x2d, weight, idx, block: int, need_x: bool, need_w: bool):
    """``(dx, dW)``, ``None`` for a gradient not needed; ``dW`` is zero outside the blocks."""
    rows, k = idx.shape
    idxf = idx.reshape(-1)
    x2d, gy = x2d.contiguous(), gy.contiguous()
    wb = pack_blocks(weight.detach(), idx, block).contiguous()  # [R, b, K*b]
    n, inp = x2d.shape
    gwbt = wb.new_zeros(rows, k * block, block) if need_w else None
    gx = x2d.new_zeros(n, inp) if need_x else None
    step = _chunk_rows(rows, k, block, n, x2d.element_size())
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        m = n1 - n0
        gyr = gy[n0:n1].view(m, rows, block).transpose(0, 1)  # [R, m, b]
        if need_w:
            g = _gather(x2d, idxf, n0, n1, block).view(m, rows, k * block).transpose(0, 1)
            gwbt.baddbmm_(g.transpose(1, 2), gyr)
        if need_x:
            gg = torch.bmm(gyr, wb)  # [R, m, K*b]
            gg = gg.transpose(0, 1).reshape(m, rows * k, block)
            gx[n0:n1].view(m, inp // block, block).index_add_(1, idxf, gg)
    gw = None
    if need_w:
        gw = unpack_blocks(gwbt.transpose(1, 2), idx, tuple(weight.shape), block)
    return gx, gw


@torch.library.custom_op("imagine_rl::balanced_block_linear", mutates_args=())
def _balanced_op(
    x2d: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, block: int
) -> torch.Tensor:
    """The kernel's forward as one opaque op: ``torch.compile`` puts it in its graph as a
    call (no tracing into the chunk loop), so a compiled sparse update keeps the kernel."""
    return _forward(x2d, weight, idx, block)


@_balanced_op.register_fake
def _(x2d: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, block: int) -> torch.Tensor:
    return x2d.new_empty(x2d.shape[0], weight.shape[0])


@torch.library.custom_op("imagine_rl::balanced_block_linear_backward", mutates_args=())
def _balanced_backward_op(
    gy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    idx: torch.Tensor,
    block: int,
    need_x: bool,
    need_w: bool,
) -> list[torch.Tensor]:
    gx, gw = _backward(gy, x2d, weight, idx, block, need_x, need_w)
    # A custom op returns tensors: an empty one stands for a gradient nobody asked for.
    return [
        gx if gx is not None else x2d.new_empty(0),
        gw if gw is not None else weight.new_empty(0),
    ]


@_balanced_backward_op.register_fake
def _(gy, x2d, weight, idx, block, need_x, need_w):
    return [
        x2d.new_empty(x2d.shape if need_x else (0,)),
        weight.new_empty(weight.shape if need_w else (0,)),
    ]


def _setup_context(ctx, inputs, output) -> None:
    x2d, weight, idx, block = inputs
    ctx.save_for_backward(x2d, weight, idx)
    ctx.block = block


def _op_backward(ctx, gy):
    x2d, weight, idx = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gw = _balanced_backward_op(gy, x2d, weight.detach(), idx, ctx.block, need_x, need_w)
    return (gx if need_x else None), (gw if need_w else None), None, None


_balanced_op.register_autograd(_op_backward, setup_context=_setup_context)


# FLOPs of the opaque ops for ``torch.utils.flop_counter`` (2 per multiply-add of a kept
# block): without them a FlopCounterMode would count a fast layer as free.
@register_flop_formula(torch.ops.imagine_rl.balanced_block_linear)
def _forward_flops(x_shape, w_shape, idx_shape, block, *args, **kwargs) -> int:
    rows, k = idx_shape
    return 2 * x_shape[0] * rows * block * k * block


@register_flop_formula(torch.ops.imagine_rl.balanced_block_linear_backward)
def _backward_flops(gy_shape, x_shape, w_shape, idx_shape, block, need_x, need_w, **kwargs):
    return _forward_flops(x_shape, w_shape, idx_shape, block) * (int(need_x) + int(need_w))


def balanced_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    idx: torch.Tensor,
    bias: torch.Tensor | None = None,
    block: int = 16,
) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` for a balanced block mask given by ``idx [R, K]``.

    ``weight`` is the dense ``[out, in]`` parameter (values outside the mask are ignored; its
    gradient is zero there). Differentiable in ``x``, ``weight`` and ``bias``; one op under
    ``torch.compile`` (``imagine_rl::balanced_block_linear``).
    """
    lead = x.shape[:-1]
    y = _balanced_op(x.reshape(-1, x.shape[-1]), weight, idx, block)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[0])


def _time_pair_ms(fns, device: torch.device, reps: int, min_sample_ms: float = 5.0) -> list[float]:
    """Per-call milliseconds of each function: interleaved samples (so drifting load hits all
    alike), each sample long enough to dwarf timer and Python noise; the minimum over samples
    (the least disturbed run) is kept."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    inner = []
    for fn in fns:
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        once = (time.perf_counter() - t0) * 1e3
        inner.append(max(1, min(1000, int(min_sample_ms / max(once, 1e-3)))))
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(inner[i]):
                fn()
            sync()
            best[i] = min(best[i], (time.perf_counter() - t0) * 1e3 / inner[i])
    return best


def measure(
    out_features: int,
    in_features: int,
    k_blocks: int,
    block: int,
    batch: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    reps: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Forward+backward milliseconds (best of ``reps`` interleaved samples) of dense-masked
    ``F.linear`` and the balanced kernel on random data."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    rows, cols = out_features // block, in_features // block
    scores = torch.rand(rows, cols, generator=gen)
    active = torch.zeros(rows, cols, dtype=torch.bool)
    active.scatter_(1, scores.topk(k_blocks, dim=1).indices, True)
    idx = indices_from_mask(active).to(device)
    mask = active.repeat_interleave(block, 0).repeat_interleave(block, 1).to(device, dtype)
    w = (torch.randn(out_features, in_features, generator=gen) * mask.cpu()).to(device, dtype)
    w.requires_grad_(True)
    x = torch.randn(batch, in_features, generator=gen).to(device, dtype).requires_grad_(True)
    gy = torch.randn(batch, out_features, generator=gen).to(device, dtype)

    def dense():
        w.grad = x.grad = None
        F.linear(x, w * mask).backward(gy)

    def fast():
        w.grad = x.grad = None
        balanced_block_linear(x, w, idx, None, block).backward(gy)

    dense_ms, fast_ms = _time_pair_ms([dense, fast], device, reps)
    return {"dense_masked_ms": dense_ms, "fast_ms": fast_ms}


def choose_kernel(
    out_features: int,
    in_features: int,
    k_blocks: int,
    block: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch: int = 256,
    reps: int = 3,
) -> str:
    """``BALANCED_BMM`` if it measured faster (by ``CHOOSE_MARGIN``) than dense-masked for this
    key, else ``DENSE_MASKED``. Cached per (shape, blocks kept per row (the density), block,
    device, dtype, batch, threads)."""
    key = (
        out_features,
        in_features,
        k_blocks,
        block,
        str(torch.device(device)),
        str(dtype),
        batch,
        torch.get_num_threads(),
    )
    if key not in _DECISIONS:
        times = measure(out_features, in_features, k_blocks, block, batch, device, dtype, reps)
        kernel = (
            BALANCED_BMM
            if times["fast_ms"] < CHOOSE_MARGIN * times["dense_masked_ms"]
            else DENSE_MASKED
        )
        _DECISIONS[key] = {"kernel": kernel, **times}
    return _DECISIONS[key]["kernel"]


def decisions() -> list[dict]:
    """Every cached kernel decision with the timings it was based on."""
    names = ("out", "in", "k_blocks", "block", "device", "dtype", "batch", "threads")
    return [{**dict(zip(names, key)), **value} for key, value in _DECISIONS.items()]


def clear_decisions() -> None:
    _DECISIONS.clear()
