"""Time the agent's training step: ``imagine-rl bench preset=s env=dmc:cartpole-balance json=out.json``.

``imagine-rl bench`` runs this script (``python scripts/bench_train_step.py`` takes the same
arguments).

Takes the same ``key=value`` config overrides as ``train.py`` (``agent=dreamer`` is the
default here), plus ``updates=`` (timed updates, default 10), ``warmup=`` (default 2) and
``json=``. Reports, on whatever device the accelerator config resolves to:

- ``updates_per_s``: full updates (world model + behaviour) per second,
- ``env_steps_per_s``: env steps (frames) per second the update rate sustains at the config's
  replay ratio (``updates_per_s * batch_size * batch_length / replay_ratio * action_repeat``),
- ``flops_per_update``: FLOPs of one update, counted by ``torch.utils.flop_counter``,
- ``matmul_flops_per_s``: a large matmul timed in the same run (the practical limit),
- ``mfu``: achieved FLOP/s over that limit.

``parts=true`` (eager runs) adds ``parts``: seconds per update of the world-model step and of
the behaviour step (imagination + actor-critic), wall and process CPU time, and ``top_ops``:
the ops with the most self CPU time in one update (the autograd profiler).

The batch is sampled from a replay filled with random-policy steps of the real env, so shapes,
dtypes and value ranges match training.

Data parallel: ``world_size=N`` launches ``N`` local processes (torch.multiprocessing, the
``distributed.backend`` the config resolves to: gloo on cpu, NCCL on cuda), or run the script
under ``torchrun --nproc_per_node=N`` (then ``world_size`` is torchrun's). Every rank times the
same updates on its own batches, gradients averaged as in training; rank 0 first times the same
updates alone (``baseline=false`` skips that) and reports:

- ``updates_per_s_per_rank`` (each update: one batch per rank) and ``samples_per_s``
  (replayed steps per second summed over ranks), next to the single-process ``baseline``,
- ``scaling_efficiency``: ``samples_per_s / (world_size * baseline samples_per_s)`` (1 = linear),
- ``comm_fraction``: the share of an update spent in collectives (gradient all-reduce, the
  return normaliser's all-gather), measured on rank 0.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

BENCH_KEYS = ("updates", "warmup", "json", "world_size", "baseline", "compile", "act", "parts")
COMPILE_CHOICES = ("both", "true", "false", "auto")


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


def _parse(argv: list[str]):
    """(config, bench options) from ``key=value`` arguments; raises ConfigError/ValueError."""
    from imagine_rl import envs
    from imagine_rl.runtime.config import build_config, parse_overrides

    args = parse_overrides(argv)
    bench = {k: args.pop(k) for k in BENCH_KEYS if k in args}
    args.setdefault("agent", "dreamer")
    compile_choice = str(bench.get("compile", "false")).lower()
    if compile_choice not in COMPILE_CHOICES:
        raise ValueError(
            f"compile: expected one of {', '.join(COMPILE_CHOICES)}, got {compile_choice!r}"
        )
    if compile_choice != "both":
        args["agent.compile"] = {"true": True, "false": False}.get(compile_choice, "auto")
    config = build_config(args)
    options = {
        "updates": int(bench.get("updates", 10)),
        "warmup": int(bench.get("warmup", 2)),
        "json": bench.get("json"),
        "world_size": int(bench.get("world_size", 1)),
        "baseline": bool(bench.get("baseline", True)),
        "compile": compile_choice,
        "act": bool(bench.get("act", False)),
        "parts": bool(bench.get("parts", False)),
    }
    if options["updates"] < 1 or options["warmup"] < 0 or options["world_size"] < 1:
        raise ValueError("updates must be >= 1, warmup >= 0 and world_size >= 1")
    if compile_choice == "both" and options["world_size"] > 1:
        raise ValueError("compile=both times one process; use compile=true|false with world_size")
    envs.check_env_id(config.env.id)
    return config, options


def _training_env(config, seed: int):
    """One training env of ``config`` (its ``env`` settings, as ``train.py`` builds them), run
    in this process: a worker process would only slow a one-env fill."""
    from imagine_rl.runtime.factories import make_env_factory

    return make_env_factory(config, video=False, asynchronous=False)("train", 1, seed)


def _agent_and_batches(config, count: int, seed: int):
    """A fresh agent and ``count`` replay batches of random-policy steps of the real env."""

    from imagine_rl import agents
    from imagine_rl.runtime.replay import SequenceReplay, fill_with_random_policy

    cfg = config.replay
    env = _training_env(config, seed)
    agent = agents.make_agent(config, env.single_observation_space, env.single_action_space)
    replay = SequenceReplay(
        capacity=max(4 * cfg.batch_length, 2000),
        batch_size=cfg.batch_size,
        batch_length=cfg.batch_length,
        seed=seed,
    )
    fill_with_random_policy(replay, env, seed)
    env.close()
    return agent, [replay.sample() for _ in range(count)]


def _seconds_per_update(agent, batches, warmup: int, device) -> float:
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for batch in batches[:warmup]:
        agent.update(batch)
    sync()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        agent.update(batch)
    sync()
    return (time.perf_counter() - start) / (len(batches) - warmup)


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _write(result: dict, path) -> None:
    summary = {k: v for k, v in result.items() if k != "config"}
    print(json.dumps(summary, indent=2))
    if path is not None:
        path = Path(str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


def main(argv: list[str]) -> int:
    from imagine_rl.runtime import distributed
    from imagine_rl.runtime.config import ConfigError

    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__.rstrip())
        print(f"\nbench keys: {', '.join(BENCH_KEYS)}; config keys: imagine-rl train --help")
        return 0
    try:
        config, options = _parse(argv)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if distributed.launch_world_size() > 1:  # under torchrun: this process is one rank
        return _rank_main(config, options)
    if options["world_size"] > 1:
        return _spawn(argv, options["world_size"])
    return _single_main(config, options)


def _time_mode(config, batches: list, options, device) -> dict:
    """Build an agent for ``config`` and time it on ``batches``: cold first update (compile
    included), steady seconds per update, aten ops and host syncs of one update."""
    import torch

    from imagine_rl import agents
    from imagine_rl.runtime.profiling import count_dispatch, count_profiled

    warmup = options["warmup"]
    agent = agents.make_agent(config, *_spaces(config))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    compiled = bool(getattr(agent, "compiled", False))
    sync()
    start = time.perf_counter()
    agent.update(batches[0])  # compiles here when compiling
    sync()
    first = time.perf_counter() - start
    seconds = _seconds_per_update(agent, batches[1:], warmup, device)
    # Counted after warm-up. Eager: a TorchDispatchMode, as the issue counted them (compiled
    # graphs do not run under one); the profiler's count is reported for both modes.
    profiled = count_profiled(lambda: agent.update(batches[-1]))
    out = {
        "compiled": compiled,
        "seconds_per_update": seconds,
        "updates_per_s": 1.0 / seconds,
        "first_update_seconds": first,
        "compile_seconds": max(0.0, first - seconds) if compiled else 0.0,
        "aten_ops_per_update": profiled.ops,
        "host_syncs_per_update": profiled.host_syncs,
        "compiled_graph_calls_per_update": profiled.compiled_calls,
        "counted_by": "profiler: top-level aten calls",
    }
    if not compiled:
        dispatched = count_dispatch(lambda: agent.update(batches[-1]))
        out.update(
            aten_ops_per_update=dispatched.ops,
            host_syncs_per_update=dispatched.host_syncs,
            profiler_aten_ops_per_update=profiled.ops,
            counted_by="TorchDispatchMode",
        )
    if compiled:
        out["caches"] = _compile_cache_counters()
    elif options["parts"]:
        out["parts"] = _part_seconds(agent, batches[1 + warmup :], device)
        out["top_ops"] = _top_ops(agent, batches[-1])
    return {"agent": agent, "batch": batches[-1], **out}


def _part_seconds(agent, batches, device) -> dict:
    """Seconds per update of the world-model step and the behaviour step (imagination and
    the actor-critic losses) of an eager Dreamer-style agent, as ``agent.update`` runs them:
    wall time and this process's CPU time (``time.process_time``, which other processes on
    the machine disturb far less than the wall clock)."""
    import torch

    if getattr(agent, "joint", False) or not hasattr(agent, "train_behaviour"):
        return {}  # one optimizer over everything (laprop): no separate steps to time
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    totals = {"world_model": [0.0, 0.0], "behaviour": [0.0, 0.0]}

    def clocks() -> tuple[float, float]:
        sync()
        return time.perf_counter(), time.process_time()

    for batch in batches:
        if getattr(agent, "context", None) is not None:  # replay.context: every input present
            batch = agent.context.complete(batch)
        with agent.accelerator.train_step(batch):
            data = agent.preprocess(batch)
            wall, cpu = clocks()
            post, _ = agent.train_world_model(data)
            mid_wall, mid_cpu = clocks()
            agent.train_behaviour(post, data)
            end_wall, end_cpu = clocks()
        totals["world_model"][0] += mid_wall - wall
        totals["world_model"][1] += mid_cpu - cpu
        totals["behaviour"][0] += end_wall - mid_wall
        totals["behaviour"][1] += end_cpu - mid_cpu
    n = len(batches)
    return {
        f"{part}_{clock}_seconds": value / n
        for part, (wall, cpu) in totals.items()
        for clock, value in (("wall", wall), ("cpu", cpu))
    }


def _top_ops(agent, batch, count: int = 15) -> list[dict]:
    """The ops that take the most time in one update (self CPU time, the autograd profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        agent.update(batch)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000.0}
        for e in rows[:count]
    ]


def _spaces(config) -> tuple:
    """The env's (observation space, action space), from one throwaway env."""
    env = _training_env(config, config.seed)
    try:
        return env.single_observation_space, env.single_action_space
    finally:
        env.close()


def _compile_cache_counters() -> dict:
    """Hits and misses of inductor's FX graph cache and the AOTAutograd cache so far."""
    from torch._dynamo.utils import counters

    return {
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "aot_autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "aot_autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
    }


def _act_seconds(config, device, env_counts=(1, 16), steps: int = 50) -> dict:
    """Seconds per ``act`` call (one vector step) for ``n`` envs, on observations drawn from
    the env's observation space; the same agent acts for every ``n``."""
    import gymnasium as gym
    import numpy as np
    import torch

    from imagine_rl import agents

    space, action_space = _spaces(config)
    agent = agents.make_agent(config, space, action_space)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    for n in env_counts:
        batched = gym.vector.utils.batch_space(space, n)
        batched.seed(config.seed)
        observations = [batched.sample() for _ in range(8)]
        for obs in observations:
            obs["is_first"] = np.zeros(n, dtype=bool)
        state = agent.initial_state(n)
        for obs in observations[:3]:
            _, state = agent.act(obs, state, explore=True)
        sync()
        start = time.perf_counter()
        for i in range(steps):
            _, state = agent.act(observations[i % len(observations)], state, explore=True)
        sync()
        out[str(n)] = (time.perf_counter() - start) / steps
    return out


def _single_main(config, options) -> int:
    import dataclasses

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from imagine_rl.runtime.accelerator import (
        configure_threads,
        resolve_device,
        resolve_precision,
        seed_everything,
    )
    from imagine_rl.runtime.config import to_dict

    configure_threads(config.accelerator)
    device = resolve_device(config.accelerator)
    cfg = config.replay
    if options["compile"] == "both":
        modes = {"eager": False, "compiled": True}
    else:
        modes = {"run": config.agent.compile}
    # One replay fill, the same batches for every mode.
    seed_everything(config.seed)
    _, batches = _agent_and_batches(config, options["warmup"] + options["updates"] + 1, config.seed)
    timings = {}
    for name, choice in modes.items():
        seed_everything(config.seed)
        mode_config = dataclasses.replace(
            config, agent=dataclasses.replace(config.agent, compile=choice)
        )
        timings[name] = _time_mode(mode_config, batches, options, device)
    first = next(iter(timings.values()))
    # FLOPs of the same math in either mode, counted on an eager update (a compiled update runs
    # graphs that a FlopCounterMode does not see, and fullgraph=True refuses to run uncompiled).
    eager = timings.get("eager", first)
    counted = eager["agent"]
    if eager["compiled"]:
        from imagine_rl import agents

        seed_everything(config.seed)
        eager_config = dataclasses.replace(
            config, agent=dataclasses.replace(config.agent, compile=False)
        )
        counted = agents.make_agent(eager_config, *_spaces(config))
    with FlopCounterMode(display=False) as counter:
        counted.update(eager["batch"])
    flops = counter.get_total_flops()
    precision = resolve_precision(config)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    limit = matmul_flops_per_s(device, dtype)
    steps_per_update = cfg.batch_size * cfg.batch_length

    def summary(timing: dict) -> dict:
        out = {k: v for k, v in timing.items() if k not in ("agent", "batch")}
        out["mfu"] = flops / timing["seconds_per_update"] / limit
        if config.run.replay_ratio > 0:
            out["env_steps_per_s"] = (
                timing["updates_per_s"]
                * steps_per_update
                / config.run.replay_ratio
                * config.env.action_repeat
            )
        else:
            out["env_steps_per_s"] = None
        return out

    summaries = {name: summary(t) for name, t in timings.items()}
    # The top-level fields describe the compiled update when both ran, else the one that ran.
    main = summaries.get("compiled", summaries.get("run"))
    agent = first["agent"]
    result = {
        "env": config.env.id,
        "agent": config.agent.name,
        "preset": config.preset,
        "obs": config.env.obs,
        "device": str(device),
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": precision,
        "batch": [cfg.batch_size, cfg.batch_length],
        "replay_ratio": config.run.replay_ratio,
        **{k: main[k] for k in ("seconds_per_update", "updates_per_s", "env_steps_per_s")},
        "flops_per_update": flops,
        "matmul_flops_per_s": limit,
        "mfu": main["mfu"],
        "parameters": sum(
            p.numel() for m in (agent.wm, agent.actor, agent.critic) for p in m.parameters()
        )
        if hasattr(agent, "wm")
        else None,
    }
    if options["compile"] == "both":
        result["eager"] = summaries["eager"]
        result["compiled"] = summaries["compiled"]
        result["speedup"] = (
            summaries["eager"]["seconds_per_update"] / summaries["compiled"]["seconds_per_update"]
        )
    else:
        result["update"] = summaries["run"]
    if options["act"]:
        result["act_seconds_per_vector_step"] = _act_seconds(config, device)
    result["config"] = to_dict(config)
    _write(result, options["json"])
    return 0


def _spawn(argv: list[str], world_size: int) -> int:
    """Run this script as ``world_size`` local ranks, as torchrun would (one node)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        mp.start_processes(
            _spawned_rank, args=(world_size, port, argv), nprocs=world_size, start_method="spawn"
        )
    except mp.ProcessRaisedException as error:
        print(f"error: a rank failed:\n{error}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _spawned_rank(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    code = main(argv)
    if code:
        raise SystemExit(code)


def _rank_main(config, options) -> int:
    """One rank of a data-parallel benchmark (see the module docstring)."""
    import torch

    from imagine_rl.runtime import distributed
    from imagine_rl.runtime.accelerator import configure_threads, resolve_device, seed_everything
    from imagine_rl.runtime.config import to_dict

    configure_threads(config.accelerator)
    device = resolve_device(config.accelerator)
    world_size = distributed.launch_world_size()
    rank = int(os.environ.get("RANK", "0"))
    updates, warmup = options["updates"], options["warmup"]
    cfg = config.replay
    steps_per_batch = cfg.batch_size * cfg.batch_length
    baseline = None
    if rank == 0 and options["baseline"]:
        # Alone, before the others join (they wait in the rendezvous): the world-size-1 rate.
        seed_everything(config.seed)
        agent, batches = _agent_and_batches(config, warmup + updates, config.seed)
        seconds = _seconds_per_update(agent, batches, warmup, device)
        baseline = {
            "seconds_per_update": seconds,
            "updates_per_s": 1.0 / seconds,
            "samples_per_s": steps_per_batch / seconds,
        }
        del agent, batches

    ctx = distributed.init_distributed(
        config.distributed.backend, config.distributed.timeout, device.type
    )
    try:
        seed = distributed.rank_seed(config.seed, rank)
        seed_everything(seed)
        agent, batches = _agent_and_batches(config, warmup + updates, seed)
        comm = {"seconds": 0.0}
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def timed(fn):
            def wrapper(*args, **kwargs):
                sync()
                tick = time.perf_counter()
                out = fn(*args, **kwargs)
                sync()
                comm["seconds"] += time.perf_counter() - tick
                return out

            return wrapper

        for name in ("all_reduce_mean_", "all_gather_cat"):
            setattr(distributed, name, timed(getattr(distributed, name)))
        distributed.all_reduce_sums([0.0])  # every rank ready: start together
        for batch in batches[:warmup]:
            agent.update(batch)
        sync()
        comm["seconds"] = 0.0
        start = time.perf_counter()
        for batch in batches[warmup:]:
            agent.update(batch)
        sync()
        elapsed = time.perf_counter() - start
        # Ranks run in lockstep, so the slowest one sets the pace.
        per_rank = _gather_floats(elapsed)
        seconds = max(per_rank) / updates
        if not ctx.is_main:
            return 0
        updates_per_s = 1.0 / seconds
        samples_per_s = updates_per_s * steps_per_batch * world_size
        result = {
            "env": config.env.id,
            "agent": config.agent.name,
            "preset": config.preset,
            "device": str(device),
            "device_name": _device_name(device),
            "threads_per_rank": torch.get_num_threads(),
            "world_size": world_size,
            "backend": ctx.backend,
            "batch_per_rank": [cfg.batch_size, cfg.batch_length],
            "seconds_per_update": seconds,
            "rank_seconds_per_update": [t / updates for t in per_rank],
            "updates_per_s_per_rank": updates_per_s,
            "samples_per_s": samples_per_s,
            "comm_fraction": comm["seconds"] / elapsed,
            "baseline": baseline,
            "scaling_efficiency": samples_per_s / (world_size * baseline["samples_per_s"])
            if baseline
            else None,
            "env_steps_per_s": samples_per_s / config.run.replay_ratio * config.env.action_repeat
            if config.run.replay_ratio > 0
            else None,
            "config": to_dict(config),
        }
        _write(result, options["json"])
        return 0
    except BaseException:
        distributed.abort()  # the other ranks stop at their next collective
        raise
    finally:
        distributed.shutdown()


def _gather_floats(value: float) -> list[float]:
    """``value`` of every rank, in rank order (a sum of one-hot slots on the control group)."""
    from imagine_rl.runtime import distributed

    ctx = distributed.context()
    slots = [0.0] * ctx.world_size
    slots[ctx.rank] = value
    return distributed.all_reduce_sums(slots)


if __name__ == "__main__":
    from imagine_rl.runtime.config import run_script

    sys.exit(run_script(main, sys.argv[1:]))
