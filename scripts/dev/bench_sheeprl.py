"""Time SheepRL's DreamerV3 gradient step the way ``bench_train_step.py`` times ours.

SheepRL is not a dependency of imagine-rl: run this in its own virtual environment, e.g.::

    python -m venv /tmp/sheeprl-venv
    /tmp/sheeprl-venv/bin/pip install torch==2.13.0 sheeprl==0.8.4
    OMP_NUM_THREADS=2 /tmp/sheeprl-venv/bin/python scripts/dev/bench_sheeprl.py \\
        json=sheeprl.json updates=20 warmup=3 threads=2 -- \\
        exp=dreamer_v3 algo=dreamer_v3_XS env=gym env.id=CartPole-v1 ...

Everything after ``--`` goes to SheepRL's own command line (Hydra overrides). The script wraps
``sheeprl.algos.dreamer_v3.dreamer_v3.train`` (one gradient step: world model, actor, critic),
lets SheepRL collect its ``learning_starts`` steps and train as usual, then times ``updates``
calls after ``warmup`` untimed ones, counts the FLOPs of one more call with
``torch.utils.flop_counter`` (untimed), times a 2048x2048 matmul like ``bench_train_step.py``
and writes ``{"updates_per_s", "seconds_per_update", "flops_per_update",
"matmul_flops_per_s", "mfu", ...}`` to ``json=`` before ending the process. ``threads=``
sets torch's threads (0, the default: leave torch's own). The arguments go through
``scripts/dev/harness.py``, which imports ``runtime.config`` from this checkout when
imagine-rl is not installed in SheepRL's environment (it needs PyYAML and torch there).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import harness

# This script's keys; everything after `--` goes to SheepRL.
DEFAULTS = {"json": None, "updates": 20, "warmup": 3, "threads": 0}


def _matmul_flops_per_s(size: int = 2048, seconds: float = 1.0) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    try:
        args, theirs = harness.parse_with_rest(argv, DEFAULTS, __doc__, ours=lambda key: True)
    except ValueError as error:  # runtime.config.ConfigError
        return harness.error(error)
    updates, warmup = args["updates"], args["warmup"]

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        from sheeprl.algos.dreamer_v3 import dreamer_v3
        from sheeprl.cli import run
    except ImportError as error:
        return harness.error(
            f"sheeprl is not importable here ({error}); see this script's docstring"
        )
    if args["threads"] > 0:
        torch.set_num_threads(args["threads"])

    original = dreamer_v3.train
    times: list[float] = []
    calls = {"n": 0}

    def timed_train(*a, **k):
        index = calls["n"]
        calls["n"] += 1
        if index == warmup + updates:  # one untimed call under the FLOP counter, then report
            with FlopCounterMode(display=False) as counter:
                original(*a, **k)
            limit = _matmul_flops_per_s()
            seconds = sum(times) / len(times)
            flops = counter.get_total_flops()
            result = {
                "framework": "sheeprl",
                "updates_per_s": 1.0 / seconds,
                "seconds_per_update": seconds,
                "seconds_per_update_all": times,
                "flops_per_update": flops,
                "matmul_flops_per_s": limit,
                "mfu": flops / seconds / limit,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "platform": platform.platform(),
                "overrides": theirs,
            }
            print(json.dumps({k: v for k, v in result.items() if k != "seconds_per_update_all"}))
            if args["json"]:
                harness.write_json(args["json"], result)
            sys.stdout.flush()
            os._exit(0)  # SheepRL would go on training; the measurement is done
        start = time.perf_counter()
        original(*a, **k)
        if index >= warmup:
            times.append(time.perf_counter() - start)

    dreamer_v3.train = timed_train
    sys.argv = [sys.argv[0], *theirs]
    run()
    print("error: SheepRL stopped before enough gradient steps; raise algo.total_steps")
    return 1


if __name__ == "__main__":
    harness.run(main)
