"""OP3 planning speed: ``python scripts/dev/bench_planner.py [populations=64,128,256,512] [json=...]``.

Times one greedy planning step of the OP3 agent (``OP3Agent.plan``: CEM with
``op3.cem_iterations`` iterations over the slot world model of preset ``op3``, untrained
weights: the cost of a step does not depend on them) for each population in ``populations``,
with the slot matching inside the cost done two ways, side by side in one process:

- ``device``: every permutation scored on the tensors' device (``worldmodels.slots.
  hungarian_order`` for ``op3.slots <= EXACT_MATCHING_MAX_SLOTS``), no host round trip;
- ``scipy``: ``scipy.optimize.linear_sum_assignment`` on the CPU, one problem at a time (the
  matching before this change; forced by setting ``EXACT_MATCHING_MAX_SLOTS`` to 0).

Each is the median over ``repeats`` calls after ``warmup`` calls. ``device=`` picks the torch
device (``cpu``; ``cuda`` on a GPU machine). Prints and, with ``json=<path>``, writes
``{"device", "slots", "iterations", "rows": [{"population", "device_ms", "scipy_ms",
"speedup"}]}``. Run with one thread beside anything else (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import harness

os.environ.setdefault("MUJOCO_GL", "egl")

DEFAULTS: dict[str, Any] = {
    "populations": [64, 128, 256, 512],
    "iterations": 5,
    "repeats": 10,
    "warmup": 2,
    "device": "cpu",
    "seed": 0,
    "json": None,
}


def time_plan(agent, slots, goal, repeats: int, warmup: int) -> float:
    """Median wall milliseconds of ``agent.plan(slots, goal)``, synchronised on cuda."""
    import torch

    def sync() -> None:
        if slots.device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            agent.plan(slots, goal)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    from imagine_rl.runtime.config import ConfigError

    try:
        args = harness.parse(argv, DEFAULTS, __doc__)
        if min(args["populations"]) < 8:
            raise ConfigError(f"populations: expected values >= 8, got {args['populations']}")
    except ConfigError as error:
        return harness.error(error)
    import gymnasium as gym
    import numpy as np
    import torch

    from imagine_rl.agents.op3 import OP3Agent
    from imagine_rl.runtime.config import build_config
    from imagine_rl.worldmodels import slots as slot_module

    rows = []
    exact = slot_module.EXACT_MATCHING_MAX_SLOTS
    for population in args["populations"]:
        config = build_config(
            [
                "preset=op3",
                "run.stages=[]",
                f"accelerator.name={args['device']}",
                "agent.compile=false",
                f"op3.cem_population={population}",
                f"op3.cem_iterations={args['iterations']}",
                f"seed={args['seed']}",
            ]
        )
        size = config.env.size
        image = gym.spaces.Box(0, 255, (3, size, size), np.uint8)
        spaces = gym.spaces.Dict({"pixels": image, "goal": image})
        agent = OP3Agent(config, spaces, gym.spaces.Box(-1, 1, (4,), np.float32))
        generator = torch.Generator().manual_seed(args["seed"])
        frames = torch.randint(0, 255, (2, 3, size, size), generator=generator, dtype=torch.uint8)
        with torch.inference_mode():
            current, goal = agent.wm.infer(agent._pixels(frames)).split(1)
        row: dict[str, Any] = {"population": population}
        for name, limit in (("device", exact), ("scipy", 0)):
            slot_module.EXACT_MATCHING_MAX_SLOTS = limit
            try:
                row[f"{name}_ms"] = round(
                    time_plan(agent, current, goal, args["repeats"], args["warmup"]), 2
                )
            finally:
                slot_module.EXACT_MATCHING_MAX_SLOTS = exact
        row["speedup"] = round(row["scipy_ms"] / row["device_ms"], 2)
        rows.append(row)
        print(
            f"population {population} x {args['iterations']} iterations: device matching "
            f"{row['device_ms']} ms, scipy {row['scipy_ms']} ms per plan ({row['speedup']}x)",
            flush=True,
        )
    report = {
        "device": str(agent.device),
        "slots": config.op3.slots,
        "iterations": args["iterations"],
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args["json"]:
        harness.write_json(args["json"], report)
    return 0


if __name__ == "__main__":
    harness.run(main)
