"""Time the agent's training step: ``python scripts/bench_train_step.py preset=s env=dmc:cartpole-balance json=out.json``.

Takes the same ``key=value`` config overrides as ``train.py`` (``agent=dreamer`` is the
default here), plus ``updates=`` (timed updates, default 10), ``warmup=`` (default 2) and
``json=``. Reports, on whatever device the accelerator config resolves to:

- ``updates_per_s``: full updates (world model + behaviour) per second,
- ``env_steps_per_s``: env steps (frames) per second the update rate sustains at the config's
  replay ratio (``updates_per_s * batch_size * batch_length / replay_ratio * action_repeat``),
- ``flops_per_update``: FLOPs of one update, counted by ``torch.utils.flop_counter``,
- ``matmul_flops_per_s``: a large matmul timed in the same run (the practical limit),
- ``mfu``: achieved FLOP/s over that limit.

The batch is sampled from a replay filled with random-policy steps of the real env, so shapes,
dtypes and value ranges match training.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

BENCH_KEYS = ("updates", "warmup", "json")


def matmul_flops_per_s(device, dtype, size: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul, the practical limit for dense layers on this device."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    sync()
    return 2 * size**3 * count / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import agents
    import envs
    from runtime.accelerator import configure_threads, resolve_device, seed_everything
    from runtime.config import ConfigError, build_config, parse_overrides, to_dict
    from runtime.replay import SequenceReplay

    try:
        args = parse_overrides(argv)
        bench = {k: args.pop(k) for k in BENCH_KEYS if k in args}
        args.setdefault("agent", "dreamer")
        config = build_config(args)
        updates = int(bench.get("updates", 10))
        warmup = int(bench.get("warmup", 2))
        envs.check_env_id(config.env.id)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    configure_threads(config.accelerator)
    seed_everything(config.seed)
    device = resolve_device(config.accelerator)
    cfg = config.replay
    env = envs.make_vector_env(
        config.env.id,
        1,
        seed=config.seed,
        obs=config.env.obs,
        size=config.env.size,
        action_repeat=config.env.action_repeat,
    )
    agent = agents.make_agent(config, env.single_observation_space, env.single_action_space)
    replay = SequenceReplay(
        capacity=max(4 * cfg.batch_length, 2000),
        batch_size=cfg.batch_size,
        batch_length=cfg.batch_length,
    )
    obs, _ = env.reset(seed=config.seed)
    done = np.zeros(1, dtype=bool)
    for _ in range(replay.capacity):
        action = np.stack([env.single_action_space.sample() for _ in range(1)])
        next_obs, reward, terminated, truncated, _ = env.step(action)
        replay.add(
            {
                **obs,
                "action": action,
                "reward": np.where(done, 0.0, reward).astype(np.float32),
                "is_first": done.copy(),
                "is_last": np.zeros(1, dtype=bool),
                "is_terminal": np.zeros(1, dtype=bool),
            }
        )
        obs, done = next_obs, terminated | truncated
    env.close()
    batches = [replay.sample() for _ in range(warmup + updates)]

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for batch in batches[:warmup]:
        agent.update(batch)
    sync()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        agent.update(batch)
    sync()
    seconds = (time.perf_counter() - start) / updates
    with FlopCounterMode(display=False) as counter:
        agent.update(batches[-1])
    flops = counter.get_total_flops()
    dtype = torch.bfloat16 if config.agent.precision == "bf16" else torch.float32
    limit = matmul_flops_per_s(device, dtype)
    updates_per_s = 1.0 / seconds
    steps_per_update = cfg.batch_size * cfg.batch_length
    result = {
        "env": config.env.id,
        "agent": config.agent.name,
        "preset": config.preset,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "batch": [cfg.batch_size, cfg.batch_length],
        "replay_ratio": config.run.replay_ratio,
        "seconds_per_update": seconds,
        "updates_per_s": updates_per_s,
        "env_steps_per_s": updates_per_s
        * steps_per_update
        / config.run.replay_ratio
        * config.env.action_repeat
        if config.run.replay_ratio > 0
        else None,
        "flops_per_update": flops,
        "matmul_flops_per_s": limit,
        "mfu": flops * updates_per_s / limit,
        "parameters": sum(
            p.numel() for m in (agent.wm, agent.actor, agent.critic) for p in m.parameters()
        )
        if hasattr(agent, "wm")
        else None,
        "config": to_dict(config),
    }
    summary = {k: v for k, v in result.items() if k != "config"}
    print(json.dumps(summary, indent=2))
    if "json" in bench:
        path = Path(str(bench["json"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
