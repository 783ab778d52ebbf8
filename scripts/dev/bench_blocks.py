"""Blocks env throughput and random-policy baseline: ``python scripts/dev/bench_blocks.py [key=value ...]``.

Example::

    OMP_NUM_THREADS=1 python scripts/dev/bench_blocks.py env=blocks:push-3 episodes=200 \
        json=runs/bench_blocks.json

For each action mode (``modes``, default both): env steps per second of one
``envs.make_env(env, obs=pixels, size=size)`` (the full wrapper stack, every step rendering the
pixels and the segmentation masks of ``info``; ``steps`` timed steps of uniformly random
actions), then the success rate of the uniformly random policy over ``episodes`` episodes of
the default length (``is_success`` of each episode's final step, as ``scripts/evaluate.py``
counts it). Printed and, with ``json=<path>``, written as JSON.

Keys: ``env`` (blocks:push-3), ``modes`` (pick_place,pusher), ``size`` (64), ``steps`` (500),
``episodes`` (200), ``seed`` (0), ``json`` (output path).
"""

from __future__ import annotations

import time
from typing import Any

import harness
import numpy as np

DEFAULTS: dict[str, Any] = {
    "env": "blocks:push-3",
    "modes": ["pick_place", "pusher"],
    "size": 64,
    "steps": 500,
    "episodes": 200,
    "seed": 0,
    "json": None,
}


def bench_mode(env_id: str, mode: str, args: dict[str, Any]) -> dict[str, Any]:
    from imagine_rl import envs

    env = envs.make_env(
        env_id, obs="pixels", size=args["size"], blocks_action=mode, seed=args["seed"]
    )
    env.reset()
    tick = time.perf_counter()
    for _ in range(args["steps"]):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    steps_per_s = args["steps"] / (time.perf_counter() - tick)

    successes, lengths, returns = [], [], []
    for episode in range(args["episodes"]):
        env.reset(seed=args["seed"] + 1 + episode)
        done, length, total = False, 0, 0.0
        while not done:
            _, reward, terminated, truncated, info = env.step(env.action_space.sample())
            done = terminated or truncated
            length += 1
            total += float(reward)
        successes.append(bool(info["is_success"]))
        lengths.append(length)
        returns.append(total)
    env.close()
    return {
        "mode": mode,
        "steps_per_s": steps_per_s,
        "episode_length": int(np.mean(lengths)),
        "random_success_rate": float(np.mean(successes)),
        "random_return_mean": float(np.mean(returns)),
        "episodes": len(successes),
    }


def main(argv: list[str]) -> int:
    from imagine_rl.runtime.config import ConfigError

    try:
        args = harness.parse(argv, DEFAULTS, __doc__)
    except ConfigError as error:
        return harness.error(error)
    from imagine_rl import envs

    envs.check_env_id(args["env"])
    if not args["env"].startswith("blocks:"):
        print(f"error: env must be a blocks:<push|stack>-<n> id, got {args['env']!r}")
        return 2
    results = []
    for mode in args["modes"]:
        result = bench_mode(args["env"], mode, args)
        results.append(result)
        print(
            f"{args['env']} {mode}: {result['steps_per_s']:.0f} env steps/s "
            f"({args['size']}x{args['size']} pixels + masks); random policy: success "
            f"{result['random_success_rate']:.3f}, return {result['random_return_mean']:.2f} "
            f"over {result['episodes']} episodes of {result['episode_length']} steps"
        )
    if args["json"]:
        harness.write_json(
            args["json"], {"env": args["env"], "size": args["size"], "modes": results}
        )
    return 0


if __name__ == "__main__":
    harness.run(main)
