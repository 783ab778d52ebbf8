"""Train an agent: ``python scripts/train.py [key=value ...]``.

Examples::

    python scripts/train.py                                  # the default short run
    python scripts/train.py env=dmc:walker-walk preset=xs run.steps=5000 run.dir=runs/x
    python scripts/train.py resume=runs/x                    # continue where it stopped
    python scripts/train.py resume=runs/x run.steps=20000    # ...and train longer
    python scripts/train.py agent=<name> init=runs/pre run.dir=runs/z
                                                             # a new run from runs/pre's weights
    torchrun --standalone --nproc_per_node=2 scripts/train.py preset=debug run.dir=runs/y
                                                             # data parallel, 2 processes

Writes ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_<N>/``, ``videos/`` and wandb
files (offline by default) under ``run.dir``. SIGINT/SIGTERM save a checkpoint before exit.

``--help`` lists the config sections, ``--help <section>`` that section's keys.
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
    import agents  # registers the built-in agents (runtime.registry)
    from runtime import registry
    from runtime.checkpoint import (
        CheckpointError,
        is_weights_only,
        list_checkpoints,
        load_checkpoint,
    )
    from runtime.config import (
        ConfigError,
        build_config,
        describe,
        load_yaml,
        parse_overrides,
        to_dict,
    )

    flags = [i for i, arg in enumerate(argv) if arg in ("-h", "--help")]
    if flags:
        # The sections, or one section's keys with type, default and doc (from the config
        # classes themselves; agents' sections included): `--help [section]`, anywhere.
        after = argv[flags[0] + 1 : flags[0] + 2]
        section = after[0] if after and "=" not in after[0] else None
        try:
            print(__doc__ if section is None else "")
            print(describe(section))
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    try:
        overrides = parse_overrides(argv)
        resume = overrides.pop("resume", None)
        resume_replay = overrides.pop("resume.replay", None)
        init = overrides.pop("init", None)
        checkpoint = init_weights = None
        if resume_replay is not None and resume_replay != "fresh":
            raise ConfigError(
                f"resume.replay={resume_replay}: the only value is fresh (keep the weights, "
                "optimizers and counters, start with an empty replay)"
            )
        if resume_replay is not None and resume is None:
            raise ConfigError(
                "resume.replay=fresh needs resume=<run dir>: it continues that run with its "
                "weights, optimizers and counters and an empty replay"
            )
        if init is not None and resume is not None:
            raise ConfigError(
                "init= starts a new run from another run's weights and resume= continues a "
                "run: pass one of them"
            )
        if resume is not None:
            run_dir = Path(str(resume))
            config_path = run_dir / "config.yaml"
            if not config_path.exists():
                raise CheckpointError(
                    f"resume={run_dir}: no config.yaml there; pass the run directory "
                    f"(the run.dir of the run to continue)"
                )
            checkpoint = load_checkpoint(run_dir)
            if is_weights_only(checkpoint):
                raise CheckpointError(
                    f"resume={run_dir}: {checkpoint.path} holds weights only (no counters, RNG "
                    f"or replay to continue); start a new run from it with init={run_dir}"
                )
            _check_resume_overrides(overrides, run_dir)
            base = to_dict(load_yaml(config_path))
            config = build_config(overrides, base=base)
            config.run.dir = str(run_dir)
        else:
            config = build_config(overrides)
            run_dir = Path(config.run.dir)
            if run_dir.exists() and not run_dir.is_dir():
                raise ConfigError(
                    f"run.dir={run_dir} is an existing file, not a directory; pick another run.dir"
                )
            if list_checkpoints(run_dir):
                raise ConfigError(
                    f"run.dir={run_dir} already holds checkpoints: continue it with "
                    f"resume={run_dir}, or pick a new run.dir"
                )
            if init is not None:
                loaded = load_checkpoint(Path(str(init)))
                source = loaded.config.get("agent", {}).get("name")
                if source != config.agent.name:
                    raise ConfigError(
                        f"init={init}: that checkpoint holds an agent={source} agent, this run "
                        f"trains agent={config.agent.name}"
                    )
                init_weights = loaded.agent_state["weights"]
            # What a new run of this agent needs (its registry entry says).
            entry = registry.agent_entry(config.agent.name)
            if entry.check_new_run is not None:
                entry.check_new_run(config, init_weights is not None)
    except (ConfigError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from runtime import distributed
    from runtime.accelerator import resolve_device

    try:
        device = resolve_device(config.accelerator)  # e.g. accelerator=cuda without a GPU
        # Under torchrun (WORLD_SIZE > 1) join the other ranks; otherwise a no-op.
        ctx = distributed.init_distributed(
            config.distributed.backend, config.distributed.timeout, device.type
        )
    except (ConfigError, distributed.DistributedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if resume_replay == "fresh" and ctx.is_main:
        _fresh_replay(run_dir, checkpoint)
    try:
        code = _train(config, run_dir, checkpoint, ctx, agents, init_weights)
    except BaseException as error:
        # Tear the process group down now: the other ranks' next collective fails at once
        # instead of waiting for distributed.timeout.
        distributed.abort()
        if ctx.enabled and distributed.is_peer_failure(error):
            print(
                f"\nerror: rank {ctx.rank}: another rank failed or stopped answering; its own "
                f"output says why ({type(error).__name__}: {str(error).splitlines()[0]})",
                file=sys.stderr,
            )
            return 1
        raise
    if code == 0:
        distributed.shutdown()
    else:
        distributed.abort()
    return code


def _lock_run_dir(run_dir: Path):
    """Hold ``<run>/.lock`` (an advisory ``flock``) for the life of the process, so a second
    ``train.py`` on the same run dir (a double start, a resume while the run still runs)
    fails at once instead of interleaving metrics and checkpoints. Returns the open file
    (the lock lasts while it is open); a no-op where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 (kept open on purpose)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RuntimeError(
            f"run.dir={run_dir} is in use by another training process (pid {holder}): wait "
            "for it to finish (or stop it), or pick another run.dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


# What may change when a run goes on (resume=): how long it runs, how it logs, evaluates and
# checkpoints, and host threads. Anything else (env, agent, model sizes, replay layout, seed)
# would change what was trained, or could not load the checkpoint.
RESUME_OVERRIDABLE = (
    "run.steps",
    "run.eval_every",
    "run.eval_episodes",
    "run.video",
    "run.log_every",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "logging.*",
    "accelerator.threads",
    "distributed.*",
)


def _check_resume_overrides(overrides: dict, run_dir: Path) -> None:
    """Refuse, in one line, an override that ``resume=`` cannot apply safely."""
    from runtime.config import ConfigError

    def allowed(key: str) -> bool:
        return any(
            key == pattern or (pattern.endswith(".*") and key.startswith(pattern[:-1]))
            for pattern in RESUME_OVERRIDABLE
        )

    refused = [key for key in overrides if not allowed(key)]
    if refused:
        raise ConfigError(
            f"resume={run_dir}: {', '.join(refused)} cannot change when a run goes on (it "
            f"changes what was trained); allowed: {', '.join(RESUME_OVERRIDABLE)}; for other "
            f"settings start a new run from its weights with init={run_dir}"
        )


def _fresh_replay(run_dir: Path, checkpoint) -> None:
    """``resume.replay=fresh``: the checkpoint's replay is not restored; its files are moved
    aside (``replay.unused-<time>/``, nothing deleted) so the new replay starts clean."""
    import datetime
    import warnings

    checkpoint.replay_path = None
    replay_dir = run_dir / "replay"
    moved = ""
    if replay_dir.exists():
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        target = run_dir / f"replay.unused-{stamp}"
        replay_dir.rename(target)
        moved = f"; the old replay files are kept in {target}"
    warnings.warn(
        f"resume.replay=fresh: continuing {run_dir} from env step {checkpoint.step} with its "
        f"weights, optimizers and counters and an empty replay; learning waits until it holds "
        f"a batch{moved}",
        stacklevel=2,
    )


def _train(config, run_dir: Path, checkpoint, ctx, agents, init_weights=None) -> int:
    """Everything after the config: seed, logger, ``runtime.loop.train``, the final report.
    Under torchrun every rank runs it; only rank 0 writes files and prints. ``init_weights``
    (``init=``): the new agent starts from them, with fresh optimizers and counters."""
    from runtime import distributed
    from runtime.accelerator import AcceleratorError, configure_threads, seed_everything
    from runtime.config import save_yaml
    from runtime.factories import make_env_factory, make_replay_factory
    from runtime.logging import Logger, make_logger
    from runtime.loop import TrainingError, train

    main = ctx.is_main
    where = f"rank {ctx.rank}: " if ctx.enabled else ""
    configure_threads(config.accelerator)
    # Each rank its own stream of exploration noise and imagination samples (its own seed).
    seed_everything(distributed.rank_seed(config.seed, ctx.rank), config.accelerator.deterministic)
    make_env = make_env_factory(config)
    try:
        import envs

        envs.check_env_id(config.env.id)
        # Some settings are checked only when an env is built (camera, size, the body and
        # actuator names of env.intervention): build one now, before the run directory or a
        # wandb run exists, so a bad one is a one-line error that leaves nothing behind.
        make_env("train", 1, config.seed).close()
    except (ValueError, ImportError) as error:
        print(f"error: {where}{error}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        try:
            lock = _lock_run_dir(run_dir)  # noqa: F841 (held until the process exits)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        save_yaml(config, run_dir / "config.yaml")

    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    try:
        # Only rank 0 logs (its metrics are averaged over ranks by the loop).
        resume_step = checkpoint.step if checkpoint is not None else None
        logger = (
            make_logger(config, run_dir, wandb_run_id=run_id, resume_step=resume_step)
            if main
            else Logger(run_dir, [])
        )
    except (ValueError, ImportError, TrainingError) as error:
        print(f"error: {where}{error}", file=sys.stderr)
        return 2
    if main and logger.wandb_run_id:
        id_file.write_text(logger.wandb_run_id)

    built = {}  # the agent, for its accelerator's report at the end

    def make_agent(obs_space, action_space):
        try:
            built["agent"] = agents.make_agent(config, obs_space, action_space)
        except (ValueError, TypeError) as error:
            # Models raise ValueError/TypeError for settings they cannot be built with (sizes,
            # spaces) and name the setting; other exceptions are bugs and keep the traceback.
            raise TrainingError(
                f"agent={config.agent.name} cannot be built for env '{config.env.id}' "
                f"({config.env.obs}): {str(error).splitlines()[0]}"
            ) from error
        if init_weights is not None:
            try:
                built["agent"].load_weights(init_weights)
            except NotImplementedError as error:
                raise TrainingError(str(error)) from error
            except RuntimeError as error:  # load_state_dict: missing/unexpected/mis-sized
                raise TrainingError(
                    "init=: the checkpoint's weights do not fit this agent; use the sizes it "
                    f"was trained with ({str(error).splitlines()[0]})"
                ) from error
        return built["agent"]

    if main:
        ranks = f"  ranks: {ctx.world_size} ({ctx.backend})" if ctx.enabled else ""
        print(
            f"run dir: {run_dir}  env: {config.env.id}  agent: {config.agent.name}{ranks}",
            flush=True,
        )
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
    except (TrainingError, AcceleratorError, distributed.DistributedError) as error:
        # AcceleratorError: e.g. ipu-sim's memory budget or a static-shape change, one line.
        print(f"\nerror: {where}{error}", file=sys.stderr)
        return 1
    finally:
        logger.close()

    if not main:
        return 0
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
    from runtime.config import run_script

    sys.exit(run_script(main, sys.argv[1:]))
