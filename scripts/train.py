"""Train an agent: ``python scripts/train.py [key=value ...]``.

Examples::

    python scripts/train.py                                  # the default short run
    python scripts/train.py env=dmc:walker-walk preset=xs run.steps=5000 run.dir=runs/x
    python scripts/train.py resume=runs/x                    # continue where it stopped
    python scripts/train.py resume=runs/x run.steps=20000    # ...and train longer
    python scripts/train.py agent=<name> init=runs/pre run.dir=runs/z
                                                             # a new run from runs/pre's weights
    python scripts/train.py preset=<staged> run.dir=runs/s   # a preset with run.stages: its
                                                             # stages, one after another
    torchrun --standalone --nproc_per_node=2 scripts/train.py preset=debug run.dir=runs/y
                                                             # data parallel, 2 processes

Writes ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_<N>/``, ``videos/`` and wandb
files (offline by default) under ``run.dir``. SIGINT/SIGTERM save a checkpoint before exit.

A config with ``run.stages`` (a preset may set it) runs each stage preset as a whole run of its
own: the command's presets with the stage's appended, then the command line; stage i starts
from stage i-1's weights (``init=``). Every stage but the last writes ``<run.dir>/<stage>/``,
the last writes ``run.dir``. Re-running the same command skips the finished stages and
resumes a stopped one.

``--help`` lists the config sections, ``--help <section>`` that section's keys.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any, Literal, NamedTuple

# Rendering backend before anything imports mujoco; harmless when already set.
os.environ.setdefault("MUJOCO_GL", "egl")
# wandb's own console capture and prompts would block a headless run.
os.environ.setdefault("WANDB_SILENT", "true")


def main(argv: list[str]) -> int:
    import agents  # noqa: F401 (registers the built-in agents: runtime.registry)
    from runtime.config import ConfigError, describe, parse_overrides

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
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return _run(overrides, shlex.join(["python", "scripts/train.py", *argv]))


class Stage(NamedTuple):
    """One entry of ``run.stages`` as this command runs it (planned by ``_plan_stages``). A
    NamedTuple, not a dataclass: a dataclass needs its module in ``sys.modules``, and tests
    load this script by path."""

    number: int  # 1-based
    count: int
    name: str  # the preset, as run.stages lists it
    run_dir: Path
    # train: a new run (from the previous stage's weights); resume: continue its checkpoint;
    # skip: its checkpoint is at its final step already.
    action: Literal["train", "resume", "skip"]
    # What _run gets: the stage's flat key=values with init=, or resume= and the settings a
    # resume may change.
    overrides: dict[str, Any]
    step: int | None  # env step of its newest checkpoint, if any
    steps: int  # its run.steps
    command: str  # the whole command line, for the hints it prints

    @property
    def last(self) -> bool:
        return self.number == self.count


def _run(overrides: dict[str, Any], command: str, stage: Stage | None = None) -> int:
    """One training run from parsed ``key=value`` overrides (``resume=`` and ``init=``
    included), or, when the config has ``run.stages``, each of its stages through here again
    (``stage`` set)."""
    import agents
    from runtime import registry
    from runtime.checkpoint import (
        CheckpointError,
        is_weights_only,
        list_checkpoints,
        load_checkpoint,
    )
    from runtime.config import ConfigError, build_config, load_yaml, to_dict

    overrides = dict(overrides)
    stages = None
    try:
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
            started = sorted(p.parent.name for p in run_dir.glob("*/config.yaml"))
            if started and not (config_path.exists() and list_checkpoints(run_dir)):
                # A staged run stopped before its last stage (which writes run.dir itself)
                # saved a checkpoint: only the command knows the stages still to run.
                raise ConfigError(
                    f"resume={run_dir}: a staged run (run.stages) whose last stage has no "
                    f"checkpoint yet (stages here: {', '.join(started)}); continue it by "
                    "re-running the same command that started it"
                )
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
            if config.run.stages:
                # Every stage's config and state, checked before any stage trains.
                stages = _plan_stages(config, overrides, init, command)
            else:
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
                            f"init={init}: that checkpoint holds an agent={source} agent, this "
                            f"run trains agent={config.agent.name}"
                        )
                    init_weights = loaded.agent_state["weights"]
                # What a new run of this agent needs (its registry entry says).
                entry = registry.agent_entry(config.agent.name)
                if entry.check_new_run is not None:
                    entry.check_new_run(config, init_weights is not None)
    except (ConfigError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if stages is not None:
        return _run_stages(stages)

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
        code = _train(config, run_dir, checkpoint, ctx, agents, init_weights, stage)
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
    if code != 0:
        distributed.abort()
    elif stage is not None and not stage.last:
        # Keep the process group for the next stage, and wait here until rank 0 has written
        # this stage's final checkpoint: the next stage starts from it on every rank.
        distributed.all_reduce_sums([0.0])
    else:
        distributed.shutdown()
    return code


def _is_main_process() -> bool:
    """Rank 0 under torchrun (before the process group exists), or a plain process."""
    return os.environ.get("RANK", "") in ("", "0")


def _newest_step(run_dir: Path) -> int | None:
    """The env step of the checkpoint a resume of ``run_dir`` would load; None without one."""
    from runtime.checkpoint import list_checkpoints, load_checkpoint

    return load_checkpoint(run_dir).step if list_checkpoints(run_dir) else None


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plan_stages(config, overrides: dict[str, Any], init: Any, command: str) -> list[Stage]:
    """What each of ``config.run.stages`` will do, with every stage's config built and
    checked first (a bad one is a one-line ``ConfigError`` before anything trains).

    A stage's config: this command's presets with the stage's appended, then the command line
    (``overrides``: it wins over every preset, in every stage), with ``run.stages=[]`` and its
    own ``run.dir``. A stage that already has a checkpoint keeps the settings it was trained
    with: a change the command makes to one that ``resume=`` cannot change is refused.
    """
    from runtime import registry
    from runtime.config import ConfigError, build_config, load_yaml, stage_dir_name, to_dict

    root = Path(config.run.dir)
    names = list(config.run.stages)
    stages: list[Stage] = []
    previous: Path | None = None
    for number, name in enumerate(names, start=1):
        run_dir = root if number == len(names) else root / stage_dir_name(name)
        stage_overrides = {
            **overrides,
            "preset": [*config.preset, name],
            "run.stages": [],
            "run.dir": str(run_dir),
        }
        where = f"stage {number}/{len(names)} {name} ({run_dir})"
        try:
            stage_config = build_config(stage_overrides)
        except ConfigError as error:
            raise ConfigError(f"run.stages: {where}: {error}") from None
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"{where}: {run_dir} is an existing file; pick another run.dir")
        step = _newest_step(run_dir)
        steps = stage_config.run.steps
        action: Literal["train", "resume", "skip"] = "train"
        if step is not None:
            unfinished = [s for s in stages if s.action != "skip"]
            if unfinished:
                raise ConfigError(
                    f"run.dir={root}: stage {unfinished[0].name} is not finished but the later "
                    f"{where} already holds checkpoints, trained from other weights; continue "
                    f"a single stage with resume=<its dir>, or start over in a new run.dir"
                )
            config_path = run_dir / "config.yaml"
            if not config_path.exists():
                raise ConfigError(
                    f"{where} holds checkpoints but no config.yaml; restore it, or pick a new "
                    f"run.dir"
                )
            trained = _flat(to_dict(load_yaml(config_path)))
            wanted = _flat(to_dict(stage_config))
            changed = {
                key: value
                for key, value in wanted.items()
                if key != "run.dir" and trained.get(key) != value
            }
            refused = [key for key in changed if not _resume_allows(key)]
            if refused:
                key = refused[0]
                more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
                raise ConfigError(
                    f"run.dir={root}: {where} was trained with {key}={trained.get(key)!r}, "
                    f"this command (its presets and key=values) gives {changed[key]!r}{more}; "
                    f"re-run the command it was started with, or pick a new run.dir"
                )
            action = "skip" if step >= steps else "resume"
            # Only what resume= may change goes with it (eval, log and checkpoint cadence,
            # run.steps, logging, threads); the rest comes from the stage's own config.yaml.
            stage_overrides = {"resume": str(run_dir), **changed}
        else:
            source = previous if previous is not None else init
            if source is not None:
                stage_overrides["init"] = str(source)
            # What a new run of this agent needs (e.g. weights from init=).
            entry = registry.agent_entry(stage_config.agent.name)
            if entry.check_new_run is not None:
                try:
                    entry.check_new_run(stage_config, source is not None)
                except ConfigError as error:
                    raise ConfigError(f"run.stages: {where}: {error}") from None
        stages.append(
            Stage(
                number=number,
                count=len(names),
                name=name,
                run_dir=run_dir,
                action=action,
                overrides=stage_overrides,
                step=step,
                steps=steps,
                command=command,
            )
        )
        previous = run_dir
    return stages


def _run_stages(stages: list[Stage]) -> int:
    """Run the planned stages in order, each a whole ``_run``; stop at the first that fails
    or is stopped by a signal (its checkpoint is where the same command goes on)."""
    from runtime import distributed

    main = _is_main_process()
    for stage in stages:
        where = f"stage {stage.number}/{stage.count} {stage.name}"
        if stage.action == "skip":
            if main:
                print(
                    f"{where}: done ({stage.run_dir} holds env step {stage.step} of "
                    f"{stage.steps}), skipped",
                    flush=True,
                )
            continue
        if main:
            going_on = f" (resuming at env step {stage.step})" if stage.action == "resume" else ""
            print(f"{where} -> {stage.run_dir}{going_on}", flush=True)
        code = _run(stage.overrides, stage.command, stage)
        if code != 0:
            return code
        if stage.last:
            break
        step = _newest_step(stage.run_dir)
        if step is None or step < stage.steps:
            distributed.shutdown()  # stopped by a signal; _train said how to go on
            return 0
    return 0


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


def _resume_allows(key: str) -> bool:
    """Whether ``resume=`` may change the setting ``key`` (``RESUME_OVERRIDABLE``)."""
    return any(
        key == pattern or (pattern.endswith(".*") and key.startswith(pattern[:-1]))
        for pattern in RESUME_OVERRIDABLE
    )


def _check_resume_overrides(overrides: dict, run_dir: Path) -> None:
    """Refuse, in one line, an override that ``resume=`` cannot apply safely."""
    from runtime.config import ConfigError

    refused = [key for key in overrides if not _resume_allows(key)]
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


def _train(
    config, run_dir: Path, checkpoint, ctx, agents, init_weights=None, stage: Stage | None = None
) -> int:
    """Everything after the config: seed, logger, ``runtime.loop.train``, the final report.
    Under torchrun every rank runs it; only rank 0 writes files and prints. ``init_weights``
    (``init=``): the new agent starts from them, with fresh optimizers and counters. ``stage``:
    this run is that stage of a staged run (how to go on after a signal is its command)."""
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
        if stage is not None:
            print(f"continue with the same command (it skips finished stages): {stage.command}")
        else:
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
