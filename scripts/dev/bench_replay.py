"""Benchmark SequenceReplay: ``python scripts/dev/bench_replay.py [key=value ...]``.

Example::

    python scripts/dev/bench_replay.py json=out.json capacity=100000 batch_size=16 batch_length=64 \
        size=64

Fills a replay with pixel steps (``uint8 [N, 3, size, size]`` plus state, action, reward and
flags), then reports ms per ``sample()``, fill throughput, memory and save/load times; printed
and, with ``json=<path>``, written as JSON.

Keys: ``capacity`` (steps, 100000), ``batch_size`` (16), ``batch_length`` (64), ``size`` (64),
``num_envs`` (1), ``chunk_size`` (1024), ``samples`` (200 timed calls), ``seed`` (0),
``directory`` (chunk files; default a temp dir, ``none`` keeps everything in the saved state),
``json`` (output path).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np

DEFAULTS: dict[str, Any] = {
    "capacity": 100_000,
    "batch_size": 16,
    "batch_length": 64,
    "size": 64,
    "num_envs": 1,
    "chunk_size": 1024,
    "samples": 200,
    "seed": 0,
    "directory": "",
    "json": None,
}


def make_pool(num_envs: int, size: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Precomputed steps, cycled during the fill so the timing is the replay's, not the RNG's."""
    pool = []
    for i in range(64):
        pool.append(
            {
                "pixels": rng.integers(0, 256, size=(num_envs, 3, size, size), dtype=np.uint8),
                "state": rng.normal(size=(num_envs, 24)).astype(np.float32),
                "action": rng.uniform(-1, 1, size=(num_envs, 6)).astype(np.float32),
                "reward": rng.normal(size=num_envs).astype(np.float32),
                "is_first": np.full(num_envs, i % 50 == 0),
                "is_last": np.full(num_envs, i % 50 == 49),
                "is_terminal": np.zeros(num_envs, dtype=bool),
            }
        )
    return pool


def bench(args: dict[str, Any], directory: Path | None, scratch: Path) -> dict[str, Any]:
    from imagine_rl.runtime.replay import SequenceReplay

    replay = SequenceReplay(
        args["capacity"],
        args["batch_size"],
        args["batch_length"],
        chunk_size=args["chunk_size"],
        seed=args["seed"],
        directory=directory,
    )
    num_envs = args["num_envs"]
    pool = make_pool(num_envs, args["size"], np.random.default_rng(args["seed"]))
    # Fill past capacity so the timed samples run on a wrapped ring.
    vector_steps = -(-args["capacity"] // num_envs) + args["chunk_size"] // 2
    tick = time.perf_counter()
    for i in range(vector_steps):
        replay.add(pool[i % len(pool)])
    fill_s = time.perf_counter() - tick

    replay.sample()  # warm-up
    times = []
    for _ in range(args["samples"]):
        tick = time.perf_counter()
        replay.sample()
        times.append(time.perf_counter() - tick)
    ms = np.array(times) * 1e3

    state = scratch / "ckpt" / "replay.npz"
    tick = time.perf_counter()
    replay.save(state)  # also fsyncs the chunk files written since the last save (all, here)
    save_s = time.perf_counter() - tick
    tick = time.perf_counter()
    replay.save(state)  # the steady cost at a checkpoint: tail + counters only
    save_again_s = time.perf_counter() - tick
    restored = SequenceReplay(
        args["capacity"],
        args["batch_size"],
        args["batch_length"],
        chunk_size=args["chunk_size"],
        directory=directory,
    )
    tick = time.perf_counter()
    restored.load(state)
    load_s = time.perf_counter() - tick
    assert len(restored) == len(replay)

    return {
        **{k: args[k] for k in DEFAULTS if k not in ("json", "directory")},
        "chunk_files": directory is not None,
        "sample_ms_mean": float(ms.mean()),
        "sample_ms_median": float(np.median(ms)),
        "sample_ms_p95": float(np.percentile(ms, 95)),
        "fill_steps_per_s": replay.inserted / fill_s,
        "steps_stored": len(replay),
        "memory_mb": replay.memory_bytes() / 2**20,
        "save_s": save_s,
        "save_again_s": save_again_s,
        "save_mb": state.stat().st_size / 2**20,
        "load_s": load_s,
    }


def main(argv: list[str]) -> int:
    from imagine_rl.runtime.config import ConfigError

    try:
        args = harness.parse(argv, DEFAULTS, __doc__)
        for key in ("capacity", "batch_size", "batch_length", "size", "num_envs", "chunk_size"):
            if not isinstance(args[key], int) or args[key] < 1:
                raise ConfigError(f"{key} must be a positive int, got {args[key]!r}")
    except ConfigError as error:
        return harness.error(error)

    with tempfile.TemporaryDirectory(prefix="bench_replay-") as tmp:
        scratch = Path(tmp)
        if args["directory"] in (None, "none", "null"):
            directory = None
        else:
            directory = Path(args["directory"]) if args["directory"] else scratch / "replay"
        result = bench(args, directory, scratch)

    print(
        f"sample [{args['batch_size']}, {args['batch_length']}] of {args['size']}x{args['size']} "
        f"pixels: mean {result['sample_ms_mean']:.2f} ms, median "
        f"{result['sample_ms_median']:.2f} ms, p95 {result['sample_ms_p95']:.2f} ms\n"
        f"fill: {result['fill_steps_per_s']:,.0f} steps/s "
        f"({'with' if directory else 'without'} chunk files)\n"
        f"memory: {result['memory_mb']:.1f} MB for {result['steps_stored']:,} steps\n"
        f"save: {result['save_s'] * 1e3:.1f} ms first"
        f"{' (syncs the chunk files)' if directory else ''}, "
        f"{result['save_again_s'] * 1e3:.1f} ms again ({result['save_mb']:.1f} MB), "
        f"load: {result['load_s'] * 1e3:.1f} ms"
    )
    if args["json"]:
        harness.write_json(args["json"], result)
    return 0


if __name__ == "__main__":
    harness.run(main)
