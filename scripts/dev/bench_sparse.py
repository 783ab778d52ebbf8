"""Micro-benchmark: dense vs dense-masked vs the compressed fast path for square sparse layers.

    python scripts/dev/bench_sparse.py json=bench.json [sizes=256,512,1024,2048] [batches=2,500]
        [densities=0.5,0.2,0.1,0.05] [blocks=1,16] [threads=1] [reps=5]

Writes a JSON list of rows, one per (size, batch, density, block):
``dense_*``: plain ``nn.Linear``; ``masked_*``: the sparsified layer run dense-masked
(``weight = original * mask`` through ``torch.nn.utils.parametrize``); ``fast_path``: the kernel
``sparsify(..., fast_path="auto")`` picked for the layer at this batch (measured by
``sparse.kernels.choose_kernel``); ``fast_*``: times of that chosen path;
``bsr_bmm_*``: times of the balanced block kernel whether chosen or not;
``fast_fwd_bwd_ratio``: ``fast_fwd_bwd_ms / dense_fwd_bwd_ms``. Forward times are under
``torch.no_grad``; forward+backward computes gradients for the input, weight and bias. Times are
medians over ``reps`` after one warm-up. ``load_avg`` (1-min load average when the row was
measured) is recorded because the numbers are only meaningful on a quiet machine.
"""

from __future__ import annotations

import os
import statistics
import time

import harness
import torch
from torch import nn

from imagine_rl.sparse import SparseConfig, kernels, sparsify

DEFAULTS = {
    "json": "bench_sparse.json",
    "sizes": [256, 512, 1024, 2048],
    "batches": [2, 500],
    "densities": [0.5, 0.2, 0.1, 0.05],
    "blocks": [1, 16],
    "threads": 1,
    "reps": 5,
    "seed": 0,
}


def parse_args(argv: list[str]) -> dict:
    from imagine_rl.runtime.config import ConfigError

    aliases = {"size": "sizes", "batch": "batches", "density": "densities", "block": "blocks"}
    try:
        return harness.parse(argv, DEFAULTS, __doc__, aliases)
    except ConfigError as error:
        raise SystemExit(f"bench_sparse: {error}") from None


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_layer(layer: nn.Module, x: torch.Tensor, reps: int) -> tuple[float, float]:
    def fwd():
        with torch.no_grad():
            layer(x)

    def fwd_bwd():
        for p in layer.parameters():
            p.grad = None
        xx = x.detach().requires_grad_()
        layer(xx).sum().backward()

    return median_ms(fwd, reps), median_ms(fwd_bwd, reps)


def bench_row(size: int, batch: int, density: float, block: int, reps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    dense = nn.Linear(size, size)
    x = torch.randn(batch, size)
    row = {"size": size, "batch": batch, "density": density, "block": block}
    row["load_avg"] = round(os.getloadavg()[0], 2)
    row["dense_fwd_ms"], row["dense_fwd_bwd_ms"] = time_layer(dense, x, reps)

    cfg = SparseConfig(
        density=density,
        method="static",
        distribution="uniform",
        block=block,
        balanced=True,
        fast_path="auto",
        fast_path_batch=batch,
        seed=seed,
    )
    layer = nn.Linear(size, size)
    sp = sparsify(layer, cfg)
    (info,) = sp.sparse_layers
    row["density_actual"] = info.nnz / info.numel
    row["fast_path"] = info.kernel
    chosen = info.p.fast
    info.p.fast = False
    row["masked_fwd_ms"], row["masked_fwd_bwd_ms"] = time_layer(layer, x, reps)
    sp.choose_kernels(force="on")
    row["bsr_bmm_fwd_ms"], row["bsr_bmm_fwd_bwd_ms"] = time_layer(layer, x, reps)
    if chosen:
        row["fast_fwd_ms"], row["fast_fwd_bwd_ms"] = (
            row["bsr_bmm_fwd_ms"],
            row["bsr_bmm_fwd_bwd_ms"],
        )
    else:
        row["fast_fwd_ms"], row["fast_fwd_bwd_ms"] = row["masked_fwd_ms"], row["masked_fwd_bwd_ms"]
    row["fast_fwd_bwd_ratio"] = row["fast_fwd_bwd_ms"] / row["dense_fwd_bwd_ms"]
    row["bsr_bmm_fwd_bwd_ratio"] = row["bsr_bmm_fwd_bwd_ms"] / row["dense_fwd_bwd_ms"]
    kernels.clear_workspace()
    return row


def main(argv: list[str]) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args["threads"])
    rows = []
    for size in args["sizes"]:
        for batch in args["batches"]:
            for density in args["densities"]:
                for block in args["blocks"]:
                    if size % block:
                        continue
                    row = bench_row(size, batch, density, block, args["reps"], args["seed"])
                    row["threads"] = args["threads"]
                    rows.append(row)
                    print(
                        f"size={size} batch={batch} density={density} block={block}: "
                        f"dense {row['dense_fwd_bwd_ms']:.2f} ms, masked {row['masked_fwd_bwd_ms']:.2f} ms, "
                        f"bsr-bmm {row['bsr_bmm_fwd_bwd_ms']:.2f} ms, chosen {row['fast_path']} "
                        f"(fwd+bwd ratio {row['fast_fwd_bwd_ratio']:.3f}, load {row['load_avg']})",
                        flush=True,
                    )
                    harness.write_json(args["json"], rows, quiet=True)
    print(f"json: {args['json']}")
    return rows


if __name__ == "__main__":
    harness.run(main)
