"""Train an agent: ``python scripts/train.py [key=value ...]``.

Examples::

    python scripts/train.py                                  # the default short run
    python scripts/train.py env=dmc:walker-walk agent=random preset=debug run.steps=5000 \
        seed=1 run.dir=runs/x
    python scripts/train.py resume=runs/x                    # continue where it stopped
    python scripts/train.py resume=runs/x run.steps=20000    # ...and train longer

Writes ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_<N>/``, ``videos/`` and wandb
files (offline by default) under ``run.dir``. SIGINT/SIGTERM save a checkpoint before exit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Rendering backend before anything imports mujoco; harmless when already set.
os.environ.setdefault("MUJOCO_GL", "egl")
# wandb's own console capture and prompts would block a headless run.
os.environ.setdefault("WANDB_SILENT", "true")


def main(argv: list[str]) -> int:
    from runtime.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
    from runtime.config import (
        ConfigError,
        build_config,
        load_yaml,
        parse_overrides,
        save_yaml,
        to_dict,
    )

    try:
        overrides = parse_overrides(argv)
        resume = overrides.pop("resume", None)
        checkpoint = None
        if resume is not None:
            run_dir = Path(str(resume))
            config_path = run_dir / "config.yaml"
            if not config_path.exists():
                raise CheckpointError(
                    f"resume={run_dir}: no config.yaml there; pass the run directory "
                    f"(the run.dir of the run to continue)"
                )
            checkpoint = load_checkpoint(run_dir)
            base = to_dict(load_yaml(config_path))
            config = build_config(overrides, base=base)
            config.run.dir = str(run_dir)
        else:
            config = build_config(overrides)
            run_dir = Path(config.run.dir)
            if list_checkpoints(run_dir):
                raise ConfigError(
                    f"run.dir={run_dir} already holds checkpoints: continue it with "
                    f"resume={run_dir}, or pick a new run.dir"
                )
    except (ConfigError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import agents
    from runtime.accelerator import (
        AcceleratorError,
        configure_threads,
        resolve_device,
        seed_everything,
    )
    from runtime.factories import make_env_factory, make_replay_factory
    from runtime.logging import make_logger
    from runtime.loop import TrainingError, train

    configure_threads(config.accelerator)
    seed_everything(config.seed, config.accelerator.deterministic)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(config, run_dir / "config.yaml")

    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    try:
        # Validate the env id before the logger starts a wandb run.
        make_env = make_env_factory(config)
        import envs

        envs.check_env_id(config.env.id)
        resolve_device(config.accelerator)  # e.g. accelerator=cuda on a machine without one
        logger = make_logger(config, run_dir, wandb_run_id=run_id)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if logger.wandb_run_id:
        id_file.write_text(logger.wandb_run_id)

    built = {}  # the agent, for its accelerator's report at the end

    def make_agent(obs_space, action_space):
        built["agent"] = agents.make_agent(config, obs_space, action_space)
        return built["agent"]

    print(f"run dir: {run_dir}  env: {config.env.id}  agent: {config.agent.name}", flush=True)
    try:
        summary = train(
            config,
            make_env,
            make_agent,
            make_replay_factory(config, run_dir),
            logger,
            run_dir,
            checkpoint=checkpoint,
        )
    except (TrainingError, AcceleratorError) as error:
        # AcceleratorError: e.g. ipu-sim's memory budget or a static-shape change, one line.
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    finally:
        logger.close()

    _accelerator_report(built.get("agent"), run_dir)
    steps = summary["counters"]["env_steps"]
    if summary["interrupted"]:
        print(f"\nstopped by signal at env step {steps}; checkpoint: {summary['checkpoint']}")
        print(f"resume with: python scripts/train.py resume={run_dir}")
        return 0
    result = summary["eval"]
    if result:
        print(
            f"\ndone: {steps} env steps, eval return "
            f"{result['eval/return_mean']:.1f} +- {result['eval/return_std']:.1f} "
            f"over {int(result['eval/episodes'])} episodes"
        )
    print(f"checkpoint: {summary['checkpoint']}")
    return 0


def _accelerator_report(agent, run_dir: Path) -> None:
    """Print the accelerator's end-of-run report (ipu-sim: its estimates) and write it to
    ``<run dir>/ipu_report.json``; ``scripts/ipu_report.py run=<run dir>`` prints it again."""
    accelerator = getattr(agent, "accelerator", None)
    report = accelerator.report() if accelerator is not None else {}
    if not report:
        return
    import json

    from runtime.ipu_sim import format_report

    (run_dir / "ipu_report.json").write_text(json.dumps(report, indent=2))
    print("\n" + format_report(report, constants=False))
    print(f"(full report with the device constants: {run_dir / 'ipu_report.json'})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
