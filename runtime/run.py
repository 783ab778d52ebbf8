"""The run layer: train, resume, staged runs (``run.stages``), the run-directory lock, and
evaluating a checkpoint. The commands (``imagine-rl train``, ``imagine-rl evaluate``), the
experiments harness and the tests all go through here; the commands only parse arguments.

::

    from imagine_rl.runtime import run

    result = run.train({"preset": "debug", "env": "gym:Pendulum-v1", "run.dir": "runs/x"})
    result = run.train(["preset=debug", "run.dir=runs/x"])      # key=value strings, as typed
    result = run.resume("runs/x", {"run.steps": 20000})        # continue it, and train longer
    scores = run.evaluate("runs/x", episodes=5)                 # its newest checkpoint, greedy
    agent = run.rebuild_agent("runs/x/checkpoints/step_400").agent

``train`` and ``resume`` print what a command prints (progress, ``error: ...`` lines on stderr)
and return a ``RunResult`` whose ``status`` is the command's exit status: 0 trained (or stopped
by SIGINT/SIGTERM with a checkpoint to resume from), 1 training failed, 2 refused before
anything trained (a bad setting, a busy run directory). Bad input is never an exception here.
``evaluate`` and ``rebuild_agent`` raise ``ConfigError`` / ``CheckpointError`` (one-line
messages) instead, and print nothing.

A run writes ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_<N>/``, ``videos/`` and
wandb files (offline by default) under ``run.dir``, holding ``<run.dir>/.lock`` while it
trains. A config with ``run.stages`` runs each stage preset as a whole run of its own: the
command's presets with the stage's appended, then the command's key=values; stage i starts from
stage i-1's weights (``init=``). Every stage but the last writes ``<run.dir>/<stage>/``, the last
writes ``run.dir``; the same command again skips finished stages and resumes a stopped one.

Agents are found through ``runtime.registry`` (the ``imagine_rl.agents`` entry points of the
installed packages): this module never imports an agent.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

# The installed command: the hints printed here name it (never a script path).
COMMAND = "imagine-rl train"


@dataclass(frozen=True)
class RunResult:
    """What ``train``/``resume`` did. ``status``: the command's exit status (0 trained or
    stopped by a signal with a checkpoint, 1 training failed, 2 refused before training);
    ``run_dir``, ``step`` (env steps reached), ``checkpoint`` (the newest one) and ``eval``
    (the final evaluation's ``eval/*`` metrics) are set where a run got that far; ``error`` is
    the message printed for a status other than 0."""

    status: int
    run_dir: Path | None = None
    step: int | None = None
    checkpoint: Path | None = None
    interrupted: bool = False
    eval: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Trained to the end (not refused, failed or stopped by a signal)."""
        return self.status == 0 and not self.interrupted


def train(
    overrides: Mapping[str, Any] | Sequence[str] = (), *, command: str | None = None
) -> RunResult:
    """One training run from ``key=value`` overrides (a mapping, or strings as on the command
    line; ``resume=``, ``resume.replay=fresh`` and ``init=`` included), or each stage of a
    config with ``run.stages``. ``command``: the command line a stopped staged run is continued
    with (printed in its hint); default ``imagine-rl train <the overrides>``.

    Under ``torchrun`` every rank calls it with the same overrides; only rank 0 writes and
    prints. Returns a ``RunResult`` (see the module doc for its statuses)."""
    from imagine_rl.runtime.config import ConfigError, format_override, parse_overrides

    # wandb's own console capture and prompts would block a headless run.
    os.environ.setdefault("WANDB_SILENT", "true")
    if isinstance(overrides, str):
        raise TypeError("train: pass a mapping or a list of key=value strings, not one string")
    if isinstance(overrides, Mapping):
        # Paths as their text (run.dir=, resume=, init=), as the command line gives them.
        parsed = {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}
        args = [format_override(key, value) for key, value in parsed.items()]
    else:
        args = list(overrides)
        try:
            parsed = parse_overrides(args)
        except ConfigError as error:
            return _refused(error)
    try:
        return _run(parsed, command or shlex.join([*COMMAND.split(), *args]))
    except ConfigError as error:  # a setting found bad only when something is built from it
        return _refused(error)


def resume(
    run_dir: str | Path, changes: Mapping[str, Any] | None = None, *, fresh_replay: bool = False
) -> RunResult:
    """Continue the run in ``run_dir`` from its newest checkpoint (weights, optimizers,
    counters, RNG and replay). ``changes``: settings that may change when a run goes on
    (``RESUME_OVERRIDABLE``, e.g. ``{"run.steps": 20000}``); any other is refused.
    ``fresh_replay``: start with an empty replay instead of the saved one (``resume.replay=
    fresh``; the old replay files are moved aside). A staged run whose last stage has no
    checkpoint yet is continued with ``train`` and the overrides that started it."""
    overrides: dict[str, Any] = {"resume": str(run_dir), **(changes or {})}
    if fresh_replay:
        overrides["resume.replay"] = "fresh"
    return train(overrides)


def train_main(argv: list[str]) -> int:
    """``train(argv).status``: the training command's body for callers that want an exit
    status (``imagine-rl train`` after ``--help``, the experiments harness's workers)."""
    return train(argv).status


# ---------------------------------------------------------------------------- resume rules

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


def resume_allows(key: str) -> bool:
    """Whether ``resume=`` may change the setting ``key`` (``RESUME_OVERRIDABLE``)."""
    return any(
        key == pattern or (pattern.endswith(".*") and key.startswith(pattern[:-1]))
        for pattern in RESUME_OVERRIDABLE
    )


def check_resume_overrides(overrides: Mapping[str, Any], run_dir: Path) -> None:
    """Refuse, in one line (``ConfigError``), an override that ``resume=`` cannot apply."""
    from imagine_rl.runtime.config import ConfigError

    refused = [key for key in overrides if not resume_allows(key)]
    if refused:
        raise ConfigError(
            f"resume={run_dir}: {', '.join(refused)} cannot change when a run goes on (it "
            f"changes what was trained); allowed: {', '.join(RESUME_OVERRIDABLE)}; for other "
            f"settings start a new run from its weights with init={run_dir}"
        )


# ---------------------------------------------------------------------------- the lock


class RunDirInUse(RuntimeError):
    """Another process trains in this run directory (it holds ``<run.dir>/.lock``)."""


def lock_run_dir(run_dir: str | Path):
    """Take ``<run_dir>/.lock`` (an advisory ``flock``, the holder's pid written in it), so a
    second training process on the same run dir (a double start, a resume while the run still
    runs) fails at once instead of interleaving metrics and checkpoints. Returns the open file:
    the lock lasts until it is closed (``train`` closes it when the run ends). Raises
    ``RunDirInUse`` naming the holder's pid; a no-op (None) where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    run_dir = Path(run_dir)
    handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 (kept open on purpose)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirInUse(
            f"run.dir={run_dir} is in use by another training process (pid {holder}): wait "
            "for it to finish (or stop it), or pick another run.dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


# ---------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One entry of ``run.stages`` as ``train`` runs it (planned by ``plan_stages``)."""

    number: int  # 1-based
    count: int
    name: str  # the preset, as run.stages lists it
    run_dir: Path
    # train: a new run (from the previous stage's weights); resume: continue its checkpoint;
    # skip: its checkpoint is at its final step already.
    action: Literal["train", "resume", "skip"]
    # What the stage's run gets: its flat key=values with init=, or resume= and the settings
    # a resume may change.
    overrides: dict[str, Any]
    step: int | None  # env step of its newest checkpoint, if any
    steps: int  # its run.steps
    command: str  # the whole command line, for the hint printed after a signal

    @property
    def last(self) -> bool:
        return self.number == self.count


def plan_stages(config, overrides: Mapping[str, Any], init: Any, command: str) -> list[Stage]:
    """What each of ``config.run.stages`` will do, with every stage's config built and
    checked first (a bad one is a one-line ``ConfigError`` before anything trains).

    A stage's config: this command's presets with the stage's appended, then the command line
    (``overrides``: it wins over every preset, in every stage), with ``run.stages=[]`` and its
    own ``run.dir``. A stage that already has a checkpoint keeps the settings it was trained
    with: a change the command makes to one that ``resume=`` cannot change is refused.
    """
    from imagine_rl.runtime import registry
    from imagine_rl.runtime.config import (
        ConfigError,
        build_config,
        load_yaml,
        stage_dir_name,
        to_dict,
    )

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
            refused = [key for key in changed if not resume_allows(key)]
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


def run_stages(stages: list[Stage]) -> RunResult:
    """Run the planned stages in order, each a whole run; stop at the first that fails or is
    stopped by a signal (its checkpoint is where the same command goes on)."""
    from imagine_rl.runtime import distributed

    main = _is_main_process()
    result = RunResult(0)
    for stage in stages:
        where = f"stage {stage.number}/{stage.count} {stage.name}"
        if stage.action == "skip":
            if main:
                print(
                    f"{where}: done ({stage.run_dir} holds env step {stage.step} of "
                    f"{stage.steps}), skipped",
                    flush=True,
                )
            result = RunResult(0, run_dir=stage.run_dir, step=stage.step)
            continue
        if main:
            going_on = f" (resuming at env step {stage.step})" if stage.action == "resume" else ""
            print(f"{where} -> {stage.run_dir}{going_on}", flush=True)
        result = _run(stage.overrides, stage.command, stage)
        if result.status != 0:
            return result
        if stage.last:
            break
        step = _newest_step(stage.run_dir)
        if step is None or step < stage.steps:
            distributed.shutdown()  # stopped by a signal; the stage's run said how to go on
            return RunResult(0, run_dir=stage.run_dir, step=step, interrupted=True)
    return result


# ---------------------------------------------------------------------------- one run


def _run(overrides: dict[str, Any], command: str, stage: Stage | None = None) -> RunResult:
    """One training run from parsed overrides (``resume=`` and ``init=`` included), or, when
    the config has ``run.stages``, each of its stages through here again (``stage`` set)."""
    from imagine_rl.runtime import registry
    from imagine_rl.runtime.checkpoint import (
        CheckpointError,
        is_weights_only,
        list_checkpoints,
        load_checkpoint,
    )
    from imagine_rl.runtime.config import ConfigError, build_config, load_yaml, to_dict

    overrides = dict(overrides)
    stages = None
    try:
        resume_at = overrides.pop("resume", None)
        resume_replay = overrides.pop("resume.replay", None)
        init = overrides.pop("init", None)
        checkpoint = init_weights = None
        if resume_replay is not None and resume_replay != "fresh":
            raise ConfigError(
                f"resume.replay={resume_replay}: the only value is fresh (keep the weights, "
                "optimizers and counters, start with an empty replay)"
            )
        if resume_replay is not None and resume_at is None:
            raise ConfigError(
                "resume.replay=fresh needs resume=<run dir>: it continues that run with its "
                "weights, optimizers and counters and an empty replay"
            )
        if init is not None and resume_at is not None:
            raise ConfigError(
                "init= starts a new run from another run's weights and resume= continues a "
                "run: pass one of them"
            )
        if resume_at is not None:
            run_dir = Path(str(resume_at))
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
            check_resume_overrides(overrides, run_dir)
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
                stages = plan_stages(config, overrides, init, command)
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
        return _refused(error)
    if stages is not None:
        return run_stages(stages)

    from imagine_rl.runtime import distributed
    from imagine_rl.runtime.accelerator import resolve_device

    try:
        device = resolve_device(config.accelerator)  # e.g. accelerator=cuda without a GPU
        # Under torchrun (WORLD_SIZE > 1) join the other ranks; otherwise a no-op.
        ctx = distributed.init_distributed(
            config.distributed.backend, config.distributed.timeout, device.type
        )
    except (ConfigError, distributed.DistributedError) as error:
        return _refused(error)
    if resume_replay == "fresh" and ctx.is_main:
        _fresh_replay(run_dir, checkpoint)
    try:
        result = _train(config, run_dir, checkpoint, ctx, init_weights, stage)
    except BaseException as error:
        # Tear the process group down now: the other ranks' next collective fails at once
        # instead of waiting for distributed.timeout.
        distributed.abort()
        if ctx.enabled and distributed.is_peer_failure(error):
            message = (
                f"rank {ctx.rank}: another rank failed or stopped answering; its own output "
                f"says why ({type(error).__name__}: {str(error).splitlines()[0]})"
            )
            return _refused(message, status=1, lead="\n", run_dir=run_dir)
        raise
    if result.status != 0:
        distributed.abort()
    elif stage is not None and not stage.last:
        # Keep the process group for the next stage, and wait here until rank 0 has written
        # this stage's final checkpoint: the next stage starts from it on every rank.
        distributed.all_reduce_sums([0.0])
    else:
        distributed.shutdown()
    return result


def _train(config, run_dir: Path, checkpoint, ctx, init_weights=None, stage=None) -> RunResult:
    """Everything after the config: seed, lock, logger, ``runtime.loop.train``, the final
    report. Under torchrun every rank runs it; only rank 0 writes files and prints.
    ``init_weights`` (``init=``): the new agent starts from them, with fresh optimizers and
    counters. ``stage``: this run is that stage of a staged run (how to go on after a signal
    is its command)."""
    from imagine_rl.runtime import distributed
    from imagine_rl.runtime.accelerator import configure_threads, seed_everything
    from imagine_rl.runtime.factories import make_env_factory

    where = f"rank {ctx.rank}: " if ctx.enabled else ""
    configure_threads(config.accelerator)
    # Each rank its own stream of exploration noise and imagination samples (its own seed).
    seed_everything(distributed.rank_seed(config.seed, ctx.rank), config.accelerator.deterministic)
    make_env = make_env_factory(config)
    try:
        from imagine_rl import envs

        envs.check_env_id(config.env.id)
        # Some settings are checked only when an env is built (camera, size, the body and
        # actuator names of env.intervention): build one now, before the run directory or a
        # wandb run exists, so a bad one is a one-line error that leaves nothing behind.
        make_env("train", 1, config.seed).close()
    except (ValueError, ImportError) as error:
        return _refused(f"{where}{error}")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = None
    if ctx.is_main:
        try:
            lock = lock_run_dir(run_dir)
        except RunDirInUse as error:
            return _refused(error, run_dir=run_dir)
    try:  # the lock is held until the run has written its last file
        return _train_locked(config, run_dir, checkpoint, ctx, make_env, init_weights, stage)
    finally:
        if lock is not None:
            lock.close()


def _train_locked(config, run_dir, checkpoint, ctx, make_env, init_weights, stage) -> RunResult:
    """``_train`` once the run directory is locked: config.yaml, logger, the loop, the report."""
    from imagine_rl.runtime import distributed, registry
    from imagine_rl.runtime.accelerator import AcceleratorError
    from imagine_rl.runtime.config import save_yaml
    from imagine_rl.runtime.factories import make_replay_factory
    from imagine_rl.runtime.logging import Logger, make_logger
    from imagine_rl.runtime.loop import TrainingError, planned_updates
    from imagine_rl.runtime.loop import train as train_loop

    main = ctx.is_main
    where = f"rank {ctx.rank}: " if ctx.enabled else ""
    if main:
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
        return _refused(f"{where}{error}", run_dir=run_dir)
    if main and logger.wandb_run_id:
        id_file.write_text(logger.wandb_run_id)

    built = {}  # the agent, for its accelerator's report at the end

    def make_agent(obs_space, action_space):
        try:
            built["agent"] = registry.build_agent(
                config, obs_space, action_space, planned_updates(config)
            )
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
        summary = train_loop(
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
        return _refused(f"{where}{error}", status=1, lead="\n", run_dir=run_dir)
    finally:
        logger.close()

    steps = summary["counters"]["env_steps"]
    result = RunResult(
        0,
        run_dir=run_dir,
        step=steps,
        checkpoint=Path(summary["checkpoint"]) if summary.get("checkpoint") else None,
        interrupted=bool(summary["interrupted"]),
        eval=dict(summary["eval"] or {}),
    )
    if not main:
        return result
    _accelerator_report(built.get("agent"), run_dir)
    if summary["interrupted"]:
        print(f"\nstopped by signal at env step {steps}; checkpoint: {summary['checkpoint']}")
        if stage is not None:
            print(f"continue with the same command (it skips finished stages): {stage.command}")
        else:
            print(f"resume with: {COMMAND} resume={run_dir}")
        return result
    scores = summary["eval"]
    if scores:
        print(
            f"\ndone: {steps} env steps, eval return "
            f"{scores['eval/return_mean']:.1f} +- {scores['eval/return_std']:.1f} "
            f"over {int(scores['eval/episodes'])} episodes"
        )
    print(f"checkpoint: {summary['checkpoint']}")
    return result


def _refused(
    error: BaseException | str, status: int = 2, lead: str = "", run_dir: Path | None = None
) -> RunResult:
    """Print ``error: <message>`` on stderr (``lead`` first) and return that ``RunResult``."""
    message = str(error)
    print(f"{lead}error: {message}", file=sys.stderr)
    return RunResult(status, run_dir=run_dir, error=message)


def _is_main_process() -> bool:
    """Rank 0 under torchrun (before the process group exists), or a plain process."""
    return os.environ.get("RANK", "") in ("", "0")


def _newest_step(run_dir: Path) -> int | None:
    """The env step of the checkpoint a resume of ``run_dir`` would load; None without one."""
    from imagine_rl.runtime.checkpoint import list_checkpoints, load_checkpoint

    return load_checkpoint(run_dir).step if list_checkpoints(run_dir) else None


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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


def _accelerator_report(agent, run_dir: Path) -> None:
    """Print the accelerator's end-of-run report (ipu-sim: its estimates) and write it to
    ``<run dir>/ipu_report.json``, where the IPU report command reads it again."""
    accelerator = getattr(agent, "accelerator", None)
    report = accelerator.report() if accelerator is not None else {}
    if not report:
        return
    import json

    from imagine_rl.runtime.ipu_sim import format_report

    (run_dir / "ipu_report.json").write_text(json.dumps(report, indent=2))
    print("\n" + format_report(report, constants=False))
    print(f"(full report with the device constants: {run_dir / 'ipu_report.json'})")


# ---------------------------------------------------------------------------- checkpoints


class RebuiltAgent(NamedTuple):
    """An agent rebuilt from a checkpoint, with the config it was built from."""

    agent: Any
    config: Any  # runtime.config.Config
    checkpoint: Any  # runtime.checkpoint.LoadedCheckpoint


def rebuild_agent(
    checkpoint: str | Path | Any,
    obs_space: Any = None,
    action_space: Any = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> RebuiltAgent:
    """The agent of ``checkpoint`` (a checkpoint directory ``<run>/checkpoints/step_<N>``, a run
    directory (its newest checkpoint) or a ``LoadedCheckpoint``) with its weights loaded, built
    from the checkpoint's config plus ``overrides`` (e.g. ``{"accelerator": "cpu"}``).
    ``obs_space``/``action_space``: one env's spaces; default: those of one eval env built from
    the config. Raises ``CheckpointError`` (the agent cannot be rebuilt or its weights do not
    fit) or ``ConfigError`` in one line."""
    from imagine_rl.runtime.checkpoint import LoadedCheckpoint, load_checkpoint
    from imagine_rl.runtime.config import build_config

    loaded = (
        checkpoint
        if isinstance(checkpoint, LoadedCheckpoint)
        else load_checkpoint(Path(str(checkpoint)))
    )
    config = build_config(dict(overrides or {}), base=loaded.config)
    if obs_space is None or action_space is None:
        env = _eval_env(config, 1, config.seed)
        obs_space, action_space = env.single_observation_space, env.single_action_space
        env.close()
    return RebuiltAgent(_load_agent(loaded, config, obs_space, action_space), config, loaded)


def _eval_env(config, num_envs: int, seed: int, video: bool = False):
    from imagine_rl.runtime.config import ConfigError
    from imagine_rl.runtime.factories import make_env_factory

    try:
        return make_env_factory(config, video=video)("eval", num_envs, seed)
    except ValueError as error:  # a setting the env build rejects (task, camera, size)
        raise ConfigError(f"env '{config.env.id}' cannot be built: {error}") from None


def _load_agent(loaded, config, obs_space, action_space):
    from imagine_rl.runtime import registry
    from imagine_rl.runtime.checkpoint import CheckpointError
    from imagine_rl.runtime.loop import planned_updates

    def refused(error: Exception) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {loaded.path}: agent={config.agent.name} cannot be rebuilt for it: "
            f"{str(error).splitlines()[0]}"
        )

    try:
        # Sizes or spaces the model cannot be built with (the models raise ValueError or
        # TypeError naming them); anything else is a bug and keeps its traceback.
        agent = registry.build_agent(config, obs_space, action_space, planned_updates(config))
    except (ValueError, TypeError) as error:
        raise refused(error) from None
    try:
        agent.load_state_dict(loaded.agent_state)
    except (ValueError, RuntimeError) as error:  # weights that do not fit (names the tensors)
        raise refused(error) from None
    return agent


def evaluate(
    checkpoint: str | Path,
    episodes: int = 10,
    *,
    seed: int = 12345,
    num_envs: int = 1,
    accelerator: str | None = None,
    video: bool = False,
    video_path: str | Path | None = None,
    ari_frames: int = 256,
) -> dict[str, Any]:
    """Run the agent of ``checkpoint`` (a checkpoint or run directory, as ``rebuild_agent``)
    greedily (the policy's mode) for ``episodes`` episodes on ``num_envs`` eval envs rebuilt
    from its config, seeded with ``seed``; ``accelerator``: default the checkpoint's.

    Returns ``{"env", "agent", "step", "episodes", "return_mean", "return_std", "returns",
    "lengths", "checkpoint"}``, plus ``success_rate`` (the fraction of episodes that ended in
    success) on envs that report ``info["is_success"]``; ``ari`` and ``ari_frames`` for agents
    that segment frames (an ``agent.segment`` method) on envs with ground-truth
    ``info["masks"]``: the foreground adjusted Rand index of the slot masks (argmax over slots)
    against the true object masks, over the first ``ari_frames`` evaluated frames; and
    ``video``, the mp4 of the first episode, when ``video`` (``video_path``, default
    ``<run>/videos/evaluate_step_<N>.mp4``). Raises ``ConfigError``/``CheckpointError`` in one
    line for bad input; prints nothing."""
    import numpy as np

    from imagine_rl.runtime.accelerator import configure_threads, seed_everything
    from imagine_rl.runtime.checkpoint import load_checkpoint
    from imagine_rl.runtime.config import ConfigError, build_config
    from imagine_rl.runtime.logging import write_video
    from imagine_rl.runtime.loop import SuccessCounter, evaluate_policy

    for key, value in (("episodes", episodes), ("num_envs", num_envs)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    loaded = load_checkpoint(Path(str(checkpoint)))
    overrides: dict[str, Any] = {"env.eval_num_envs": num_envs, "run.video": video}
    if accelerator is not None:
        overrides["accelerator"] = accelerator
    config = build_config(overrides, base=loaded.config)

    configure_threads(config.accelerator)
    seed_everything(seed)
    env = _eval_env(config, num_envs, seed, video=video)
    try:
        agent = _load_agent(loaded, config, env.single_observation_space, env.single_action_space)
    except BaseException:
        env.close()
        raise
    successes = SuccessCounter()
    segment = getattr(agent, "segment", None)
    seg_pixels: list[np.ndarray] = []
    seg_masks: list[np.ndarray] = []

    def on_step(obs, info, ended) -> None:
        successes(obs, info, ended)
        if segment is None or "masks" not in info or "pixels" not in obs:
            return
        if sum(len(p) for p in seg_pixels) < ari_frames:
            present = info.get("_masks", np.ones(len(ended), dtype=bool))
            seg_pixels.append(obs["pixels"][present])
            seg_masks.append(info["masks"][present])

    try:
        returns, lengths, frames = evaluate_policy(
            agent, env, episodes, seed, record_video=video, on_step=on_step
        )
    finally:
        env.close()

    result: dict[str, Any] = {
        "env": config.env.id,
        "agent": config.agent.name,
        "step": loaded.step,
        "episodes": len(returns),
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),
        "returns": returns,
        "lengths": lengths,
        "checkpoint": str(loaded.path),
    }
    if successes.outcomes:
        result["success_rate"] = successes.rate
    if seg_pixels and ari_frames > 0:
        from imagine_rl.runtime.metrics import foreground_ari

        pixels = np.concatenate(seg_pixels)[:ari_frames]
        truth = np.concatenate(seg_masks)[:ari_frames]
        result["ari"] = foreground_ari(truth, segment(pixels).argmax(1))
        result["ari_frames"] = len(pixels)
    if video and frames is not None:
        run_dir = loaded.path.parent.parent
        default = run_dir / "videos" / f"evaluate_step_{loaded.step}.mp4"
        path = write_video(video_path or default, frames, config.logging.video_fps)
        result["video"] = str(path)
    return result


__all__ = [
    "COMMAND",
    "RESUME_OVERRIDABLE",
    "RebuiltAgent",
    "RunDirInUse",
    "RunResult",
    "Stage",
    "check_resume_overrides",
    "evaluate",
    "lock_run_dir",
    "plan_stages",
    "rebuild_agent",
    "resume",
    "resume_allows",
    "run_stages",
    "train",
    "train_main",
]
