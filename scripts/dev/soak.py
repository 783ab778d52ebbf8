"""Soak test: does a long training run stay bounded in memory and disk?

    python scripts/dev/soak.py minutes=60 every=60 json=runs/soak/soak.json \\
        preset=dreamer_tiny env=dmc:cartpole-balance env.obs=pixels replay.capacity=20000

Starts ``scripts/train.py`` with the given config overrides (``run.steps`` defaults to a value
it never reaches, ``run.dir`` to ``runs/soak``) as a subprocess and, every ``every`` seconds,
records the resident memory (RSS) of its whole process tree, the size of ``<run.dir>/replay``
on disk and the env steps reached (``metrics.jsonl``). After ``minutes`` it sends SIGTERM (the
run checkpoints and exits) and writes ``json``: the samples, the replay's in-memory size at
capacity (``replay_bytes_at_capacity``, from the run's first observation shapes) and the
growth of RSS over the second half of the run (``rss_growth_second_half_mb``). A bounded run
fills its replay, then holds RSS at about replay bytes plus a constant.

Keys of this script: ``minutes`` (60), ``every`` (60 s), ``json`` (``<run.dir>/soak.json``),
``threads`` (``OMP_NUM_THREADS`` of the run, 1); every other ``key=value`` goes to train.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness

DEFAULTS: dict[str, Any] = {"minutes": 60.0, "every": 60.0, "json": None, "threads": 1}
TRAIN_DEFAULTS = {"run.steps": 10**9, "run.dir": "runs/soak"}


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, in bytes (0 for a process that is gone)."""
    total = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def directory_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def last_env_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    step = 0
    for line in path.read_text().splitlines():
        try:
            step = max(step, int(json.loads(line).get("step", 0)))
        except (ValueError, AttributeError):
            continue
    return step


def replay_bytes_at_capacity(config: Any) -> int:
    """What the replay holds in memory when full: capacity x bytes of one stored step."""
    import numpy as np

    from imagine_rl.runtime.factories import make_env_factory

    env = make_env_factory(config, video=False)("train", 1, config.seed)
    step = 4 + 3  # reward float32, three bool flags
    for space in env.single_observation_space.spaces.values():
        step += int(np.prod(space.shape)) * np.dtype(space.dtype).itemsize
    action = env.single_action_space
    step += int(np.prod(action.shape or (1,))) * np.dtype(action.dtype).itemsize
    env.close()
    return step * config.replay.capacity


def main(argv: list[str]) -> int:
    from imagine_rl.runtime.config import ConfigError, build_config, parse_overrides

    try:
        options, train_args = harness.parse_with_rest(argv, DEFAULTS, __doc__)
        given = parse_overrides(train_args)
        train_args += [f"{k}={v}" for k, v in TRAIN_DEFAULTS.items() if k not in given]
        from imagine_rl import agents  # noqa: F401 - registers the agents the config names

        config = build_config(train_args)
    except (ConfigError, ValueError) as error:
        return harness.error(error)
    run_dir = Path(config.run.dir)
    out = Path(options["json"] or run_dir / "soak.json")
    capacity_bytes = replay_bytes_at_capacity(config)
    env = {**os.environ, "OMP_NUM_THREADS": str(options["threads"])}
    command = [sys.executable, str(harness.ROOT / "scripts" / "train.py"), *train_args]
    print(" ".join(command), flush=True)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.time()
    samples: list[dict[str, float]] = []
    try:
        while process.poll() is None:
            elapsed = time.time() - start
            sample = {
                "minute": round(elapsed / 60, 2),
                "rss_mb": rss_bytes(process.pid) / 2**20,
                "replay_dir_mb": directory_bytes(run_dir / "replay") / 2**20,
                "env_steps": last_env_step(run_dir),
            }
            samples.append(sample)
            print(
                f"{sample['minute']:6.1f} min  RSS {sample['rss_mb']:7.1f} MB  replay dir "
                f"{sample['replay_dir_mb']:7.1f} MB  env steps {sample['env_steps']}",
                flush=True,
            )
            if elapsed >= 60 * options["minutes"]:
                process.send_signal(signal.SIGTERM)
                break
            time.sleep(max(0.0, options["every"] - (time.time() - start - elapsed)))
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = process.stderr.read().decode() if process.stderr else ""
    half = [s for s in samples if s["minute"] >= options["minutes"] / 2]
    result = {
        "command": command,
        "options": options,
        "exit_code": process.returncode,
        "replay_capacity": config.replay.capacity,
        "replay_bytes_at_capacity_mb": capacity_bytes / 2**20,
        "rss_growth_second_half_mb": half[-1]["rss_mb"] - half[0]["rss_mb"] if half else None,
        "samples": samples,
        "stderr_tail": stderr[-2000:],
    }
    harness.write_json(out, result)
    print(f"exit code {process.returncode}")
    return 0 if process.returncode == 0 else 1


if __name__ == "__main__":
    harness.run(main)
