"""Print the simulated-IPU report (estimates, never measurements).

Three ways::

    python scripts/dev/ipu_report.py run=runs/x                       # the report train.py saved
    python scripts/dev/ipu_report.py preset=debug ipu.preset=bow      # one Dreamer update, estimated
    python scripts/dev/ipu_report.py gim=true ipu.num_ipus=4          # a 4-module Greedy-InfoMax-style
                                                                  # encoder, 1 IPU vs N pipelined

``run=<dir>`` reads ``<dir>/ipu_report.json`` (written by ``train.py`` with
``accelerator=ipu-sim``). Otherwise the arguments are ``train.py``'s ``key=value`` overrides
(``accelerator=ipu-sim`` is implied): the agent is built for the config's env, a batch is
sampled from a replay of random-policy steps, ``updates=`` updates run on the host (default 1),
and the report of the estimate is printed. ``gim=true`` instead estimates a pipeline of
``gim.modules=`` (default 4) convolutional modules with detached boundaries (each with its own
local loss) on 1 IPU and on ``ipu.num_ipus`` IPUs, ``gim.micro_batches=`` micro-batches of
``gim.batch=`` 64x64 frames (defaults 8 and 16), and with end-to-end backprop for comparison.
Common: ``json=<path>`` writes the report as JSON, ``constants=false`` drops the constants table.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import harness

os.environ.setdefault("MUJOCO_GL", "egl")

# This script's keys; every other key=value is a config override.
DEFAULTS: dict[str, Any] = {
    "run": None,
    "json": None,
    "constants": True,
    "updates": 1,
    "gim": False,
    "gim.modules": 4,
    "gim.micro_batches": 8,
    "gim.batch": 16,
}


def _gim_stages(modules: int):
    """A stack of ``modules`` conv blocks (3x64x64 input), each one pipeline stage."""
    from torch import nn

    stages, channels = [], 3
    for i in range(modules):
        out = 32 * 2 ** min(i, 2)
        stride = 2 if i < 4 else 1
        stages.append(
            nn.Sequential(nn.Conv2d(channels, out, 4, stride, 1), nn.GroupNorm(1, out), nn.SiLU())
        )
        channels = out
    return stages


def _gim_report(config, args: dict) -> dict:
    import torch

    from imagine_rl.runtime.ipu_sim import estimate_pipeline

    modules, micro, batch = args["gim.modules"], args["gim.micro_batches"], args["gim.batch"]
    ipu = config.ipu
    torch.manual_seed(config.seed)
    stages = _gim_stages(modules)
    x = torch.randn(batch, 3, 64, 64)
    precision = config.accelerator.resolved_precision
    common = {"preset": ipu.preset, "micro_batches": micro, "precision": precision}
    rows = {}
    for label, n, detached in (
        ("gim_1_ipu", 1, True),
        (f"gim_{ipu.num_ipus}_ipus", ipu.num_ipus, True),
        (f"backprop_{ipu.num_ipus}_ipus", ipu.num_ipus, False),
    ):
        est = estimate_pipeline(stages, x, num_ipus=n, detach_boundaries=detached, **common)
        rows[label] = est.to_dict()
    return {"kind": "ipu-sim pipeline estimate (host emulation; nothing measured)", **rows}


def _print_gim(report: dict) -> None:
    from imagine_rl.runtime.ipu_sim.report import fmt_seconds

    print(report["kind"])
    for label, est in report.items():
        if label == "kind":
            continue
        mem = est["memory"]
        print(
            f"{label:>18}: estimated step {fmt_seconds(est['step_time_s'])} for "
            f"{est['micro_batches']} micro-batches on {est['num_ipus']} IPU(s) ({est['schedule']}); "
            f"estimated inter-IPU {est['inter_ipu_bytes'] / 2**20:.2f} MiB; estimated memory "
            f"{mem['max_fraction_of_budget']:.1%} of the busiest IPU's budget"
        )


def main(argv: list[str]) -> int:
    from imagine_rl.runtime.config import ConfigError, build_config, parse_overrides

    try:
        script, rest = harness.parse_with_rest(argv, DEFAULTS, __doc__)
        args = parse_overrides(rest)
        if script["run"] is not None:
            path = Path(str(script["run"])) / "ipu_report.json"
            if not path.exists():
                raise ConfigError(
                    f"run={script['run']}: no ipu_report.json there; train with "
                    f"accelerator=ipu-sim first, or pass config overrides instead of run="
                )
            report = json.loads(path.read_text())
            config = None
        else:
            args["accelerator"] = "ipu-sim"
            args.setdefault("agent", "dreamer")
            config = build_config(args)
    except (ConfigError, ValueError) as error:
        return harness.error(error)

    from imagine_rl.runtime.accelerator import AcceleratorError
    from imagine_rl.runtime.ipu_sim import format_report

    try:
        if config is not None and script["gim"]:
            report = _gim_report(config, script)
            _print_gim(report)
        else:
            if config is not None:
                report = _dreamer_report(config, script["updates"])
            print(format_report(report, constants=script["constants"]))
    except AcceleratorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if script["json"]:
        harness.write_json(script["json"], report)
    return 0


def _dreamer_report(config, updates: int) -> dict:
    """The estimate of ``updates`` Dreamer updates on batches of random-policy steps of one
    training env of ``config`` (its ``env`` settings, as ``train.py`` builds them)."""
    from imagine_rl import agents, envs
    from imagine_rl.runtime.accelerator import configure_threads, seed_everything
    from imagine_rl.runtime.factories import make_env_factory
    from imagine_rl.runtime.replay import SequenceReplay, fill_with_random_policy

    envs.check_env_id(config.env.id)
    configure_threads(config.accelerator)
    seed_everything(config.seed)
    cfg = config.replay
    # In this process: a worker process would only slow a one-env fill.
    env = make_env_factory(config, video=False, asynchronous=False)("train", 1, config.seed)
    agent = agents.make_agent(config, env.single_observation_space, env.single_action_space)
    replay = SequenceReplay(
        capacity=4 * cfg.batch_length, batch_size=cfg.batch_size, batch_length=cfg.batch_length
    )
    fill_with_random_policy(replay, env, config.seed)
    env.close()
    for _ in range(max(1, updates)):
        agent.update(replay.sample())
    return agent.accelerator.report()


if __name__ == "__main__":
    harness.run(main)
