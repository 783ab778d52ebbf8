"""Compressed kernels for balanced block-sparse ``nn.Linear`` layers, and the per-shape choice.

``balanced-bsr-bmm``: a weight ``W [out, in]`` whose mask keeps exactly ``K`` of the ``C = in/b``
``b x b`` blocks in each of its ``R = out/b`` block-rows is stored as ``Wb [R, b, K*b]`` (the
active blocks of each block-row side by side) plus the block-column indices ``idx [R, K]``.
With ``xT = x^T [in, N]`` viewed as ``[C, b*N]`` (one row per input block):

    G  = xT[idx]                      # [R*K, b*N] -> [R, K*b, N]   (index_select)
    yT = bmm(Wb, G)                   # [R, b, N]  -> y = yT^T      (one batched matmul)

and the backward is two more batched matmuls plus an ``index_add``:

    dWb = bmm(dyT, G^T)               # [R, b, K*b], scattered back into a dense dW
    dG  = bmm(Wb^T, dyT);  dxT = zeros.index_add(0, idx, dG)

``G`` is ``out * density / b`` times the size of ``x``. It lives in a reused workspace and the
rows are processed in chunks that keep it under ``workspace_limit()`` bytes: a fresh allocation
of that size per call costs more in page faults than the matmul itself on CPU. ``G`` is rebuilt
in the backward from the saved input instead of being saved. The workspace is per process and
not thread-safe (one forward/backward at a time per device and dtype).

Whether the kernel pays depends on shape, density, block, batch, threads and the machine, so
``choose_kernel`` measures forward+backward against the dense-masked ``F.linear`` once per key
and caches the decision.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

DENSE_MASKED = "dense-masked"
BALANCED_BMM = "balanced-bsr-bmm"
# The fast kernel must beat dense-masked by this factor to be chosen (measurements are noisy).
CHOOSE_MARGIN = 0.9

_WORKSPACE: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}
_WORKSPACE_LIMIT = [128 * 2**20]
_DECISIONS: dict[tuple, dict] = {}


def workspace_limit() -> int:
    """Bytes the gathered-input buffer of one chunk may take (its gradient takes as much)."""
    return _WORKSPACE_LIMIT[0]


def set_workspace_limit(nbytes: int) -> None:
    _WORKSPACE_LIMIT[0] = int(nbytes)


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
    per_row = rows * k * block * itemsize
    return max(1, min(n, workspace_limit() // max(per_row, 1)))


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """``t^T`` as a contiguous tensor: a free view when ``t`` is itself a transposed view."""
    tt = t.t()
    return tt if tt.is_contiguous() else tt.contiguous()


def _gather(xt: torch.Tensor, idxf: torch.Tensor, n0: int, n1: int, block: int) -> torch.Tensor:
    """``[R*K*b, n1-n0]`` rows of ``xt [in, N]`` for every kept block, columns ``n0:n1``."""
    inp, n = xt.shape
    m = n1 - n0
    g = _buffer("G", idxf.numel() * block * m, xt).view(idxf.numel(), block, m)
    torch.index_select(xt.view(inp // block, block, n)[:, :, n0:n1], 0, idxf, out=g)
    return g


class _BalancedBlockLinear(torch.autograd.Function):
    # Works on transposed activations (features x rows): x^T is gathered by whole rows and
    # y^T comes out of bmm. y is returned contiguous (callers may .view() a Linear's output);
    # dx is returned as a transposed view (autograd accepts any strides), and an input that
    # already is a transposed view is used without a copy.
    @staticmethod
    def forward(ctx, x2d, weight, idx, block):
        rows, k = idx.shape
        out_f = weight.shape[0]
        idxf = idx.reshape(-1)
        wb = pack_blocks(weight.detach(), idx, block).contiguous()
        xt = _transposed(x2d)
        n = xt.shape[1]
        yt = xt.new_empty(rows, block, n)
        step = _chunk_rows(rows, k, block, n, xt.element_size())
        for n0 in range(0, n, step):
            n1 = min(n, n0 + step)
            g = _gather(xt, idxf, n0, n1, block).view(rows, k * block, n1 - n0)
            if n1 - n0 == n:
                torch.bmm(wb, g, out=yt)
            else:
                yt[:, :, n0:n1] = torch.bmm(wb, g)
        ctx.save_for_backward(xt, wb, idx)
        ctx.block = block
        ctx.weight_shape = tuple(weight.shape)
        return yt.view(out_f, n).t().contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        xt, wb, idx = ctx.saved_tensors
        block = ctx.block
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows, k = idx.shape
        idxf = idx.reshape(-1)
        inp, n = xt.shape
        gyt = _transposed(gy).view(rows, block, n)
        gwb = wb.new_empty(wb.shape) if need_w else None
        gxt = xt.new_zeros(inp // block, block, n) if need_x else None
        wbt = wb.transpose(1, 2)
        step = _chunk_rows(rows, k, block, n, xt.element_size())
        for n0 in range(0, n, step):
            n1 = min(n, n0 + step)
            m = n1 - n0
            gyc = gyt[:, :, n0:n1]
            if need_w:
                g = _gather(xt, idxf, n0, n1, block).view(rows, k * block, m)
                if n0 == 0:
                    torch.bmm(gyc, g.transpose(1, 2), out=gwb)
                else:
                    gwb.baddbmm_(gyc, g.transpose(1, 2))
            if need_x:
                gg = _buffer("gG", rows * k * block * m, gy).view(rows, k * block, m)
                torch.bmm(wbt, gyc, out=gg)
                dest = gxt if m == n else gxt[:, :, n0:n1]
                dest.index_add_(0, idxf, gg.view(rows * k, block, m))
        gw = unpack_blocks(gwb, idx, ctx.weight_shape, block) if need_w else None
        gx = gxt.view(inp, n).t() if need_x else None
        return gx, gw, None, None


def balanced_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    idx: torch.Tensor,
    bias: torch.Tensor | None = None,
    block: int = 16,
) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` for a balanced block mask given by ``idx [R, K]``.

    ``weight`` is the dense ``[out, in]`` parameter (values outside the mask are ignored; its
    gradient is zero there). Differentiable in ``x``, ``weight`` and ``bias``.
    """
    lead = x.shape[:-1]
    y = _BalancedBlockLinear.apply(x.reshape(-1, x.shape[-1]), weight, idx, block)
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
