"""Pixel env throughput: ``python scripts/dev/bench_render.py [envs=a,b] [size=64] [steps=300]``.

For each env id: env steps per second of one ``envs.make_env(id, obs=pixels, size=size)`` (the
full wrapper stack; every step renders) over ``steps`` steps of uniformly random actions after
20 warm-up steps, resetting at episode ends. Prints and, with ``json=<path>``, writes
``{"mujoco", "dm_control", "<env id>": steps per wall second, "<env id> per cpu second":
steps per CPU second of the process, ...}``. Used to compare MuJoCo and
dm-control versions side by side (README, Environments).
"""

from __future__ import annotations

import json
import os
import time
from importlib.metadata import version
from typing import Any

import harness

os.environ.setdefault("MUJOCO_GL", "egl")

DEFAULTS: dict[str, Any] = {
    "envs": ["dmc:cartpole-balance", "dmc:walker-walk", "blocks:push-3"],
    "size": 64,
    "steps": 300,
    "seed": 0,
    "json": None,
}


def steps_per_second(env_id: str, size: int, steps: int, seed: int) -> tuple[float, float]:
    """(steps per wall second, steps per CPU second of this process). The CPU rate is less
    disturbed by other processes on a shared machine than the wall rate."""
    from imagine_rl import envs

    extra = {"goal_obs": True} if env_id.startswith("blocks:") else {}
    env = envs.make_env(env_id, obs="pixels", size=size, **extra)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    for _ in range(20):
        env.step(env.action_space.sample())
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    env.close()
    return steps / wall, steps / cpu


def main(argv: list[str]) -> int:
    from imagine_rl.runtime.config import ConfigError

    try:
        args = harness.parse(argv, DEFAULTS, __doc__)
    except ConfigError as error:
        return harness.error(error)
    result: dict[str, Any] = {"mujoco": version("mujoco"), "dm_control": version("dm-control")}
    for env_id in args["envs"]:
        wall, cpu = steps_per_second(env_id, args["size"], args["steps"], args["seed"])
        result[env_id] = round(wall, 1)
        result[f"{env_id} per cpu second"] = round(cpu, 1)
    print(json.dumps(result))
    if args["json"]:
        harness.write_json(args["json"], result)
    return 0


if __name__ == "__main__":
    harness.run(main)
