"""Experiments: every (variant, seed) of an experiment file is an ordinary training run, run in
parallel worker processes and recorded under ``results/<name>/`` so that an experiment carries
over from one working session to the next.

An experiment file (YAML)::

    name: sparse-pendulum                   # results/<name>/, runs/experiments/<name>/
    description: what it asks               # optional
    base: {env: gym:Pendulum-v1, run.steps: 5000}       # overrides, as on the command line
    variants:                               # variant name -> its overrides (may be empty)
      dense: {}
      rigl-0.1: {sparse.enabled: true, sparse.density: 0.1, sparse.method: rigl}
    seeds: [0, 1, 2]
    workers: 2                              # optional: parallel runs (default: one per core)
    threshold: -400                         # optional: for steps_to_threshold
    metric: eval/return_mean                # optional: the return the summary is about
    reference: {task: cartpole-swingup, obs: proprio}   # optional: DreamerV3's curve

What lasts (commit it): ``results/<name>/experiment.yaml`` (a copy of the file the runs came
from), ``runs/<variant>-s<seed>.jsonl`` (one per finished run: a header with the resolved
config, the commit and the file's sha256, then one row of metrics per logged env step),
``summary.json`` and ``curves.png``. Run directories (checkpoints, replay, videos) live under
``runs/experiments/<name>/`` and only serve to resume a stopped run.

Re-running ``run`` skips recorded runs, resumes a stopped run whose run directory still holds a
checkpoint, and starts the rest. Each run trains in a worker process of its own (at most
``workers`` at a time) with one torch thread; its console output goes to ``<run dir>/console.log``.

SIGINT or SIGTERM to ``run`` (Ctrl-C, ``kill <pid>``, a session's end) stops it: it starts no
further run, sends SIGTERM to every running worker (each checkpoints at its next step and exits),
waits for them, prints where each stopped and exits with status 130 (SIGINT) or 143 (SIGTERM). A
second signal while it waits kills the workers at once (SIGKILL): they resume from their last
checkpoint instead.

Statistics: across seeds, per variant and metric, the mean, the interquartile mean
(``scipy.stats.trim_mean(x, 0.25)``, rliable's IQM) and a 95% percentile-bootstrap interval of
the mean (``scipy.stats.bootstrap``, fixed random state so a summary is reproducible).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import connection, get_context
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from imagine_rl.runtime.checkpoint import list_checkpoints
from imagine_rl.runtime.config import ConfigError, build_config, format_override

REQUIRED_KEYS = ("name", "base", "variants", "seeds")
OPTIONAL_KEYS = ("description", "workers", "threshold", "metric", "reference")
DEFAULT_METRIC = "eval/return_mean"
SUCCESS_METRIC = "eval/success_rate"
# Per-run numbers the summary aggregates (``success`` and ``best_success`` join them when the
# runs evaluate a success rate; ``steps_to_threshold`` needs ``threshold``).
RUN_METRICS = (
    "final_return",
    "best_return",
    "auc",
    "steps_to_threshold",
    "wall_seconds",
    "updates_per_second",
)
BOOTSTRAP_RESAMPLES = 2000
TrainMain = Callable[[list[str]], int]


class ExperimentError(ValueError):
    """A bad experiment file or results folder; the message is one line naming the fix."""


class ExperimentStopped(SystemExit):
    """``run_experiment`` was stopped by SIGINT/SIGTERM after its workers stopped: a
    ``SystemExit`` with status 128 + the signal's number (130, 143), so that the command exits
    with it and no traceback."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


@dataclass(frozen=True)
class RunSpec:
    """One (variant, seed): its command-line arguments, run directory and record path."""

    variant: str
    seed: int
    args: list[str]
    run_dir: Path
    record: Path
    staged: bool  # a run.stages config: re-running its command resumes it
    steps: int
    init: str | None = None  # init= (another run's weights), the last of args when given

    @property
    def key(self) -> str:
        return f"{self.variant}-s{self.seed}"


@dataclass
class Experiment:
    name: str
    path: Path
    sha256: str
    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    seeds: list[int]
    workers: int
    threshold: float | None = None
    metric: str = DEFAULT_METRIC
    reference: dict[str, str] | None = None
    description: str = ""
    results_dir: Path = Path("results")
    runs_root: Path = Path("runs/experiments")
    runs: list[RunSpec] = field(default_factory=list)

    @property
    def records_dir(self) -> Path:
        return self.results_dir / "runs"


def _overrides(value: Any, where: str, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ExperimentError(
            f"{path}: {where} must be a mapping of config keys to values "
            "(e.g. {run.steps: 5000}), got " + type(value).__name__
        )
    return dict(value)


def load_experiment(
    path: str | Path,
    results_root: str | Path = "results",
    runs_root: str | Path = "runs/experiments",
) -> Experiment:
    """Read and check an experiment file: every key, every variant's config (built as the run
    would build it) and the results folder. Raises ``ExperimentError`` (one line) before
    anything runs."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"{path}: no such experiment file")
    text = path.read_bytes()
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ExperimentError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ExperimentError(f"{path}: expected a mapping with keys {', '.join(REQUIRED_KEYS)}")
    unknown = sorted(set(spec) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ExperimentError(
            f"{path}: unknown key(s) {', '.join(unknown)}; the keys are "
            f"{', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in spec]
    if missing:
        raise ExperimentError(f"{path}: missing key(s) {', '.join(missing)}")
    name = spec["name"]
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ExperimentError(f"{path}: name must be a folder name such as 'sparse-pendulum'")
    seeds = spec["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise ExperimentError(f"{path}: seeds must be a non-empty list of integers, e.g. [0, 1, 2]")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ExperimentError(f"{path}: seeds must be integers, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"{path}: seeds repeat: {seeds}")
    variants = spec["variants"]
    if not isinstance(variants, dict) or not variants:
        raise ExperimentError(f"{path}: variants must map variant names to overrides")
    workers = spec.get("workers")
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ExperimentError(f"{path}: workers must be a positive integer, got {workers!r}")
    threshold = spec.get("threshold")
    if threshold is not None and not isinstance(threshold, int | float):
        raise ExperimentError(f"{path}: threshold must be a number, got {threshold!r}")
    reference = spec.get("reference")
    if reference is not None and not (
        isinstance(reference, dict) and set(reference) == {"task", "obs"}
    ):
        raise ExperimentError(
            f"{path}: reference must be {{task: <dmc task, e.g. cartpole-swingup>, "
            "obs: proprio|vision}}"
        )
    if reference is not None:
        from imagine_rl.runtime.reference import load_dreamerv3_curves

        if load_dreamerv3_curves(str(reference["task"]), str(reference["obs"])) is None:
            raise ExperimentError(
                f"{path}: reference {reference}: no published DreamerV3 curve for that task "
                "and observation type (runtime/reference/dreamerv3_curves.csv lists them)"
            )
    experiment = Experiment(
        name=name,
        path=path,
        sha256=hashlib.sha256(text).hexdigest(),
        base=_overrides(spec["base"], "base", path),
        variants={},
        seeds=list(seeds),
        workers=workers,
        threshold=None if threshold is None else float(threshold),
        metric=spec.get("metric") or DEFAULT_METRIC,
        reference=reference,
        description=spec.get("description") or "",
        results_dir=Path(results_root) / name,
        runs_root=Path(runs_root) / name,
    )
    for variant, overrides in variants.items():
        variant = str(variant)
        if not variant or "/" in variant or variant.startswith("."):
            raise ExperimentError(f"{path}: variant name {variant!r} must be a file-name part")
        experiment.variants[variant] = _overrides(overrides, f"variant {variant}", path)
    experiment.runs = [_run_spec(experiment, v, s) for v in experiment.variants for s in seeds]
    _check_results_folder(experiment)
    return experiment


def _run_spec(experiment: Experiment, variant: str, seed: int) -> RunSpec:
    run_dir = experiment.runs_root / f"{variant}-s{seed}"
    merged = {**experiment.base, **experiment.variants[variant]}
    # init= (a new run from another run's weights, e.g. one shared stage-1 perception) may
    # be given; resume= is the harness's own business.
    for key in ("seed", "run.dir", "resume"):
        if key in merged:
            raise ExperimentError(
                f"{experiment.path}: {key} is set by the experiment per run; remove it from "
                f"{'base' if key in experiment.base else 'variant ' + variant}"
            )
    merged.setdefault("accelerator.threads", 1)  # one torch thread per worker
    init = merged.pop("init", None)  # train's argument, not a config key
    args = [format_override(k, v) for k, v in merged.items()]
    args += [f"seed={seed}", f"run.dir={run_dir}"]
    try:
        config = build_config(args)
    except ConfigError as error:
        raise ExperimentError(
            f"{experiment.path}: variant {variant}: {str(error).splitlines()[0]}"
        ) from None
    steps = config.run.steps
    if config.run.stages:
        # A staged run ends with its last stage, whose preset sets its length (runtime.run's
        # plan_stages builds each stage's config the same way).
        last = [a for a in args if not a.startswith("preset=")]
        last += [f"preset={','.join([*config.preset, config.run.stages[-1]])}", "run.stages=[]"]
        steps = build_config(last).run.steps
    if init is not None:
        args.append(f"init={init}")
    return RunSpec(
        variant=variant,
        seed=seed,
        args=args,
        run_dir=run_dir,
        record=experiment.records_dir / f"{variant}-s{seed}.jsonl",
        staged=bool(config.run.stages),
        steps=steps,
        init=None if init is None else str(init),
    )


def _check_results_folder(experiment: Experiment) -> None:
    """A results folder holds the runs of one version of one experiment file."""
    copy = experiment.results_dir / "experiment.yaml"
    shas = set()
    if copy.exists():
        shas.add(hashlib.sha256(copy.read_bytes()).hexdigest())
    for record in sorted(experiment.records_dir.glob("*.jsonl")):
        shas.add(read_record(record)[0].get("file_sha256"))
    other = shas - {experiment.sha256}
    if other:
        raise ExperimentError(
            f"{experiment.results_dir} holds runs of another experiment file (sha256 "
            f"{sorted(map(str, other))[0][:12]}, this file {experiment.sha256[:12]}): restore "
            "that file, or move the folder away (or rename the experiment) to start afresh"
        )


# -- records -----------------------------------------------------------------------------


def read_record(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(header, rows)`` of a run record."""
    lines = path.read_text().splitlines()
    if not lines:
        raise ExperimentError(f"{path}: empty run record; delete it to run that run again")
    header = json.loads(lines[0])
    return header, [json.loads(line) for line in lines[1:] if line.strip()]


def _metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` as one row per env step: rows of the same step merged, later ones
    winning (a killed session logs rows after its last checkpoint that its resume logs
    again). Media paths are left out: the record keeps numbers only."""
    by_step: dict[int, dict[str, Any]] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        step = int(row.pop("step"))
        numbers = {
            k: v
            for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        by_step.setdefault(step, {}).update(numbers)
    return [{"step": step, **by_step[step]} for step in sorted(by_step)]


def git_commit(cwd: Path | None = None) -> dict[str, Any]:
    """The commit the runs come from, and the tracked files changed on top of it."""
    try:
        run = lambda *args: subprocess.run(  # noqa: E731
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        commit = run("rev-parse", "HEAD")
        changed = [
            line[3:] for line in run("status", "--porcelain", "--untracked-files=no").splitlines()
        ]
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "changed_files": []}
    return {"commit": commit, "changed_files": changed}


def _finished_step(run_dir: Path) -> int:
    rows = _metric_rows(run_dir)
    return rows[-1]["step"] if rows else 0


def write_record(experiment: Experiment, run: RunSpec, source: dict[str, Any]) -> Path:
    """Write ``results/<name>/runs/<variant>-s<seed>.jsonl`` from a finished run directory
    (atomically: a record exists only whole)."""
    config_path = run.run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    rows = _metric_rows(run.run_dir)
    header = {
        "experiment": experiment.name,
        "file_sha256": experiment.sha256,
        "variant": run.variant,
        "seed": run.seed,
        "args": run.args,
        **source,
        "env_steps": rows[-1]["step"] if rows else 0,
        "config": config,
    }
    run.record.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.record.with_suffix(".tmp")
    tmp.write_text("\n".join(json.dumps(x, sort_keys=True) for x in [header, *rows]) + "\n")
    tmp.replace(run.record)
    return run.record


# -- running ----------------------------------------------------------------------------


def run_state(run: RunSpec) -> str:
    """``recorded``, ``stopped at <step>`` (a checkpoint to resume from) or ``not started``."""
    if run.record.exists():
        return "recorded"
    checkpoints = list_checkpoints(run.run_dir) if run.run_dir.exists() else []
    if checkpoints:
        state = f"stopped at {checkpoints[-1].name.removeprefix('step_')}"
        logged = _finished_step(run.run_dir)
        return f"{state} (logged to {logged})" if logged > int(state.split()[-1]) else state
    return "not started"


def _command(run: RunSpec) -> list[str]:
    """The arguments that start ``run`` or continue it where it stopped."""
    if run.staged or not list_checkpoints(run.run_dir):
        # A staged run resumes by its own command (it skips finished stages); a run that
        # stopped before its first checkpoint starts over (its directory is cleared).
        return run.args
    return [f"resume={run.run_dir}", f"run.steps={run.steps}"]


def _worker(train_main: TrainMain, args: list[str], console: str) -> tuple[int, str, float]:
    """One training run in a worker process, its output appended to ``console``: ``(exit
    status, the last line of an exception or "", seconds it took)``."""
    start = time.time()
    rc, error = _train_logged(train_main, args, console)
    return rc, error, time.time() - start


def _worker_process(
    train_main: TrainMain, args: list[str], console: str, result: connection.Connection
) -> None:
    """A worker process's target: ``_worker``, its result sent back on ``result`` (a line of
    at most 2,000 characters: the result fits the pipe's buffer, so the worker can exit
    before the parent reads it)."""
    rc, error, seconds = _worker(train_main, args, console)
    result.send((rc, error[:2000], seconds))
    result.close()


def _train_logged(train_main: TrainMain, args: list[str], console: str) -> tuple[int, str]:
    import torch

    torch.set_num_threads(1)
    with open(console, "a", buffering=1) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"\n== {stamp} pid {os.getpid()} train {' '.join(args)}", flush=True)
        try:
            return int(train_main(args) or 0), ""
        except BaseException:  # the parent reports it and goes on with the other runs
            text = traceback.format_exc()
            print(text, flush=True)
            return 1, text.strip().splitlines()[-1]


def _lock(path: Path):
    """An advisory ``flock`` on ``path`` for as long as the returned file stays open: a second
    ``run`` of the same experiment would clear and restart the first one's fresh runs."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    handle = open(path, "a+")  # noqa: SIM115 (kept open on purpose)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ExperimentError(
            f"{path.parent} is in use by another `experiment run` of this experiment: wait for "
            "it to finish (or stop it), then run again"
        ) from None
    return handle


class _StopSignals:
    """SIGINT/SIGTERM while an experiment runs (installed from the main thread only; the
    previous handlers are restored on exit). The first signal sends SIGTERM to every registered
    worker (each checkpoints at its next step and exits), a later one SIGKILL. The handler only
    records and signals; ``wake`` (the signal module's wakeup fd, written whichever thread the
    signal lands on) wakes the loop waiting on its workers, which does the printing."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.workers: dict[int, int] = {}  # live worker pid -> the signal sent to it (0: none)
        self.previous: dict[int, Any] = {}
        self.previous_wakeup: int | None = None
        self.wake, self._wake_write = os.pipe()
        os.set_blocking(self.wake, False)
        os.set_blocking(self._wake_write, False)

    def __enter__(self) -> _StopSignals:
        try:
            self.previous_wakeup = signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: signals are left as they are
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):  # as the workers' own (runtime/loop.py)
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.previous_wakeup is not None:
            signal.set_wakeup_fd(self.previous_wakeup)
        os.close(self.wake)
        os.close(self._wake_write)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        self.forward()

    def forward(self) -> None:
        """After a signal: SIGTERM (after the first) or SIGKILL (after a later one) to every
        registered worker not yet sent it."""
        if not self.received:
            return
        sig = signal.SIGTERM if len(self.received) == 1 else signal.SIGKILL
        for pid, sent in list(self.workers.items()):
            if sent not in (sig, signal.SIGKILL):
                self.workers[pid] = sig
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake, 4096):
                pass


@dataclass
class _Job:
    """A run in a worker process of its own; its result comes back on ``result``."""

    run: RunSpec
    process: Any  # multiprocessing.context.SpawnProcess
    result: connection.Connection
    started: float


def _start(context: Any, run: RunSpec, train_main: TrainMain) -> _Job:
    state = run_state(run)
    if state == "not started" and run.run_dir.exists() and not run.staged:
        shutil.rmtree(run.run_dir)  # stopped before its first checkpoint
    run.run_dir.mkdir(parents=True, exist_ok=True)
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=_worker_process,
        args=(train_main, _command(run), str(run.run_dir / "console.log"), send),
        name=f"experiment-{run.key}",
    )
    process.start()
    send.close()  # the worker holds the other end: EOF here once it is gone
    return _Job(run, process, receive, time.time())


def _outcome(job: _Job) -> tuple[int, str, float]:
    """``_worker``'s result for a worker that has exited; for one that died without sending it
    (killed), its exit status (minus the signal's number) and a line saying so."""
    job.process.join()
    try:
        if job.result.poll():
            return job.result.recv()
    except (EOFError, OSError):
        pass
    finally:
        job.result.close()
    code = job.process.exitcode
    why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return code if code != 0 else 1, why, time.time() - job.started


def _checkpoint_step(run: RunSpec) -> int | None:
    checkpoints = list_checkpoints(run.run_dir) if run.run_dir.exists() else []
    return int(checkpoints[-1].name.removeprefix("step_")) if checkpoints else None


def run_experiment(
    experiment: Experiment,
    train_main: TrainMain | None = None,
    workers: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Run every unrecorded (variant, seed) of ``experiment``, at most ``workers`` at a time
    (default the file's ``workers``) each in a worker process of its own, recording each as it
    finishes. ``train_main``: ``(argv) -> exit status`` run in each worker (a picklable
    module-level function: workers are spawned); default ``runtime.run.train_main``. ``echo``:
    where progress lines go (default: printed, flushed). Returns the number of runs that failed
    (0 when all are recorded).

    Called from the main thread, SIGINT/SIGTERM stop it: no further run starts, every running
    worker gets SIGTERM (it checkpoints and exits; a second signal sends SIGKILL), and once they
    are gone, with the runs that finished recorded, it raises ``ExperimentStopped`` (a
    ``SystemExit`` with status 130 or 143). The previous signal handlers are restored."""
    if train_main is None:
        from imagine_rl.runtime.run import train_main
    if echo is None:
        echo = lambda line: print(line, flush=True)  # noqa: E731
    workers = workers or experiment.workers
    source = git_commit()
    pending = [run for run in experiment.runs if run_state(run) != "recorded"]
    done = len(experiment.runs) - len(pending)
    total = len(experiment.runs)
    echo(
        f"experiment {experiment.name}: {total} runs, {done} recorded, "
        f"{len(pending)} to run on {min(workers, max(1, len(pending)))} worker(s)"
    )
    if not pending:
        return 0
    # init= is needed by the runs still to start only (status and report read records).
    for run in pending:
        if run.init is not None and not Path(run.init).is_dir():
            raise ExperimentError(
                f"{experiment.path}: {run.key}: init={run.init} is not a run directory; train "
                "that run first or fix the path"
            )
    experiment.results_dir.mkdir(parents=True, exist_ok=True)
    experiment.runs_root.mkdir(parents=True, exist_ok=True)
    lock = _lock(experiment.runs_root / ".lock")  # held while this runs
    copy = experiment.results_dir / "experiment.yaml"
    if not copy.exists():
        shutil.copyfile(experiment.path, copy)
    # The workers inherit one thread each before they import torch.
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    context = get_context("spawn")
    queue = list(pending)
    jobs: dict[int, _Job] = {}  # by the worker process's sentinel
    failures = stopped = 0
    stopped_by: int | None = None
    try:
        with _StopSignals() as stop:
            try:
                announced = 0
                while queue or jobs:
                    while queue and len(jobs) < workers and not stop.received:
                        job = _start(context, queue.pop(0), train_main)
                        jobs[job.process.sentinel] = job
                        stop.workers[job.process.pid] = 0
                        stop.forward()  # a signal that came while it started
                    if not jobs:
                        break
                    ready = connection.wait([*jobs, stop.wake])
                    if stop.wake in ready:
                        stop.drain()
                    if len(stop.received) > announced:
                        name = signal.Signals(stop.received[-1]).name
                        if announced == 0:
                            echo(
                                f"{name}: stopping {len(jobs)} running run(s) at their next step, "
                                f"each with a checkpoint ({len(queue)} not started); a second "
                                "Ctrl-C or SIGTERM kills them at once (SIGKILL), losing their "
                                "steps since their last checkpoint"
                            )
                        if len(stop.received) > 1 and announced < 2:
                            echo(
                                f"{name} again: killed {len(jobs)} run(s) (SIGKILL); each "
                                "resumes from its last checkpoint"
                            )
                        announced = len(stop.received)
                    for sentinel in [item for item in ready if item in jobs]:
                        job = jobs.pop(sentinel)
                        stop.workers.pop(job.process.pid, None)  # before its pid is reaped
                        rc, error, seconds = _outcome(job)
                        run = job.run
                        step = _finished_step(run.run_dir)
                        if rc == 0 and step >= run.steps:
                            write_record(experiment, run, source)
                            done += 1
                            echo(
                                f"[{done}/{total}] {run.key}: "
                                f"{_run_line(run.record, experiment)} ({seconds / 60:.1f} min)"
                            )
                        elif stop.received and (
                            rc == 0 or job.process.exitcode < 0 or error == "KeyboardInterrupt"
                        ):  # stopped by the signal we sent it (or Ctrl-C's own)
                            stopped += 1
                            at = _checkpoint_step(run)
                            echo(
                                f"stopped {run.key} at env step {at}: resumes on the next "
                                "`experiment run`"
                                if at is not None
                                else f"stopped {run.key} before its first checkpoint: starts "
                                "over on the next `experiment run`"
                            )
                        elif rc == 0:  # stopped by a signal sent to it: it checkpointed
                            failures += 1
                            echo(
                                f"[{done + failures}/{total}] {run.key}: stopped at env step "
                                f"{step} of {run.steps}; run the command again to resume it"
                            )
                        else:
                            failures += 1
                            why = error or f"exit status {rc}, at env step {step}"
                            echo(
                                f"[{done + failures}/{total}] {run.key}: FAILED ({why}); "
                                f"see {run.run_dir / 'console.log'}"
                            )
            finally:
                # Only after an error in this loop: its workers still stop with a checkpoint.
                for job in jobs.values():
                    job.process.terminate()
                for job in jobs.values():
                    job.process.join()
                    stop.workers.pop(job.process.pid, None)
            if stop.received:
                stopped_by = stop.received[0]
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if lock is not None:  # now, not when a caller drops the exception's traceback
            lock.close()
    if stopped_by is not None:
        echo(
            f"stopped by {signal.Signals(stopped_by).name}: {done} of {total} runs recorded, "
            f"{stopped} stopped, {len(queue)} not started; run `imagine-rl experiment run "
            f"{experiment.path}` again to go on"
        )
        raise ExperimentStopped(stopped_by)
    return failures


def _run_line(record: Path, experiment: Experiment) -> str:
    values = run_metrics(read_record(record)[1], experiment.metric, experiment.threshold)
    rate = values["updates_per_second"]
    speed = f"{rate:.2f} updates/s" if rate is not None else "no updates"
    return f"final {values['final_return']:.1f}, best {values['best_return']:.1f}, {speed}"


def status_lines(experiment: Experiment) -> list[str]:
    lines = [f"experiment {experiment.name} ({experiment.path}, sha256 {experiment.sha256[:12]})"]
    for run in experiment.runs:
        lines.append(f"  {run.key:<32} {run_state(run)}")
    return lines


# -- summary -----------------------------------------------------------------------------


def run_metrics(
    rows: list[dict[str, Any]], metric: str = DEFAULT_METRIC, threshold: float | None = None
) -> dict[str, float | None]:
    """The per-run numbers of a record's rows: eval ``metric`` at the last eval, its best and
    its mean over the evals (``auc``), the env step it first reached ``threshold`` (None if
    never), wall seconds, and updates per second of update time."""
    evals = [(row["step"], row[metric]) for row in rows if metric in row]
    if not evals:
        raise ExperimentError(f"a run record has no {metric} rows: did the run evaluate?")
    values = [value for _, value in evals]
    reached = [step for step, value in evals if threshold is not None and value >= threshold]
    updates = max((row.get("train/updates", 0) for row in rows), default=0)
    update_seconds = max((row.get("perf/update_seconds", 0.0) for row in rows), default=0.0)
    out: dict[str, float | None] = {
        "final_return": values[-1],
        "best_return": max(values),
        "auc": float(np.mean(values)),
        "steps_to_threshold": float(reached[0]) if reached else None,
        "wall_seconds": max(row.get("perf/wall_seconds", 0.0) for row in rows),
        "updates_per_second": updates / update_seconds if update_seconds > 0 else None,
    }
    successes = [row[SUCCESS_METRIC] for row in rows if SUCCESS_METRIC in row]
    if successes:
        out["success"] = successes[-1]
        out["best_success"] = max(successes)
    return out


def aggregate(values: list[float]) -> dict[str, Any]:
    """Mean, IQM and a 95% bootstrap interval of the mean over seeds (``n`` values)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"n": 0, "mean": None, "iqm": None, "ci95": None}
    mean = float(x.mean())
    if x.size < 2 or np.all(x == x[0]):
        low = high = mean  # a resample of one value (or equal values) is that value
    else:
        result = stats.bootstrap(
            (x,),
            np.mean,
            confidence_level=0.95,
            n_resamples=BOOTSTRAP_RESAMPLES,
            method="percentile",
            random_state=np.random.default_rng(0),
        )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return {
        "n": int(x.size),
        "mean": mean,
        "iqm": float(stats.trim_mean(x, 0.25)),
        "ci95": [low, high],
    }


def summarize(results_dir: str | Path) -> dict[str, Any]:
    """``summary.json``'s content, from ``results_dir``'s ``experiment.yaml`` and run records
    alone (a committed summary can be recomputed from what is committed beside it)."""
    results_dir = Path(results_dir)
    if not (results_dir / "experiment.yaml").is_file():
        raise ExperimentError(
            f"{results_dir}: no experiment.yaml beside the run records (the harness writes it "
            "with the first record); copy it with the records"
        )
    spec = yaml.safe_load((results_dir / "experiment.yaml").read_text())
    sha = hashlib.sha256((results_dir / "experiment.yaml").read_bytes()).hexdigest()
    metric = spec.get("metric") or DEFAULT_METRIC
    threshold = spec.get("threshold")
    by_variant: dict[str, list[tuple[int, dict]]] = {str(v): [] for v in spec["variants"]}
    commits: set[str] = set()
    for path in sorted((results_dir / "runs").glob("*.jsonl")):
        header, rows = read_record(path)
        if header["file_sha256"] != sha:
            raise ExperimentError(f"{path} comes from another experiment file than {results_dir}")
        commits.add(header.get("commit", "unknown"))
        by_variant.setdefault(header["variant"], []).append(
            (header["seed"], run_metrics(rows, metric, threshold))
        )
    variants: dict[str, Any] = {}
    for variant, runs in by_variant.items():
        runs.sort(key=lambda item: item[0])
        entry: dict[str, Any] = {"n": len(runs), "seeds": [seed for seed, _ in runs]}
        names = list(RUN_METRICS)
        if any("success" in values for _, values in runs):
            names += ["success", "best_success"]
        for name in names:
            got = [values.get(name) for _, values in runs]
            entry[name] = aggregate([v for v in got if v is not None])
        if threshold is not None:
            entry["steps_to_threshold"]["reached"] = sum(
                values["steps_to_threshold"] is not None for _, values in runs
            )
        variants[variant] = entry
    return {
        "experiment": spec["name"],
        "file_sha256": sha,
        "metric": metric,
        "threshold": threshold,
        "commits": sorted(commits),
        "variants": variants,
    }


def curves(results_dir: Path, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per variant: the env steps and the ``[seeds, steps]`` eval ``metric`` of its runs, each
    run interpolated onto the steps all of them evaluated at (their common range)."""
    runs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for path in sorted((results_dir / "runs").glob("*.jsonl")):
        header, rows = read_record(path)
        points = [(row["step"], row[metric]) for row in rows if metric in row]
        if points:
            steps, values = map(np.asarray, zip(*points))
            runs.setdefault(header["variant"], []).append((steps, values))
    out = {}
    for variant, items in runs.items():
        grid = np.unique(np.concatenate([steps for steps, _ in items]))
        end = min(steps[-1] for steps, _ in items)
        grid = grid[grid <= end]
        out[variant] = (grid, np.stack([np.interp(grid, s, v) for s, v in items]))
    return out


def plot_curves(results_dir: Path, summary: dict[str, Any], reference: dict | None) -> Path:
    """``curves.png``: per variant the mean over seeds with its 95% bootstrap band, and the
    reference curve where the experiment names one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xmax = 0
    for variant, (steps, values) in curves(results_dir, summary["metric"]).items():
        mean = values.mean(0)
        (line,) = ax.plot(steps, mean, label=f"{variant} (n={values.shape[0]})")
        if values.shape[0] > 1 and np.ptp(values, axis=0).max() > 0:
            band = stats.bootstrap(
                (values,),
                np.mean,
                axis=0,
                confidence_level=0.95,
                n_resamples=BOOTSTRAP_RESAMPLES,
                method="percentile",
                random_state=np.random.default_rng(0),
            ).confidence_interval
            low, high = np.nan_to_num(band.low, nan=0.0), np.nan_to_num(band.high, nan=0.0)
            same = np.ptp(values, axis=0) == 0  # no spread: the band is the mean itself
            low, high = np.where(same, mean, low), np.where(same, mean, high)
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        xmax = max(xmax, int(steps[-1]))
    if reference is not None:
        _plot_reference(ax, reference, xmax)
    ax.set_xlabel("env steps")
    ax.set_ylabel(summary["metric"])
    ax.set_title(f"{summary['experiment']}: mean over seeds, 95% bootstrap band")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = results_dir / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_reference(ax: Any, reference: dict, xmax: int) -> None:
    """DreamerV3's published curve for the task (training episodes of its stochastic policy,
    per 8k-step window, mean over its seeds with the lowest and highest seed mean) within the
    runs' range, from the reference data shipped with the package."""
    from imagine_rl.runtime.reference import load_dreamerv3_curves

    curve = load_dreamerv3_curves(reference["task"], reference["obs"])
    if curve is None:
        return
    keep = curve.steps <= xmax  # the axis keeps to the runs' range (as scripts/plot.py)
    label = f"DreamerV3, published ({curve.seeds} seeds; training episodes, not greedy evals)"
    if keep.any():
        ax.plot(curve.steps[keep], curve.mean[keep], "k--", marker=".", label=label)
        ax.fill_between(curve.steps[keep], curve.low[keep], curve.high[keep], color="k", alpha=0.08)
    else:  # its first window ends past the runs: named in the legend only
        first = f"@{curve.steps[0] / 1000:.0f}k: {curve.mean[0]:.0f}"
        ax.plot([], [], "k--", label=f"{label} {first} (beyond axis)")


def report(experiment: Experiment) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``curves.png`` from the records."""
    if not list(experiment.records_dir.glob("*.jsonl")):
        raise ExperimentError(
            f"{experiment.records_dir}: no recorded runs yet; run `imagine-rl experiment run "
            f"{experiment.path}` first"
        )
    summary = summarize(experiment.results_dir)
    path = experiment.results_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return path, plot_curves(experiment.results_dir, summary, experiment.reference)


def summary_table(summary: dict[str, Any]) -> list[str]:
    """The summary as Markdown table rows (for the console, the README and closing notes)."""

    def cell(entry: dict[str, Any] | None, digits: int = 1) -> str:
        if not entry or entry.get("mean") is None:
            return "-"
        low, high = entry["ci95"]
        return f"{entry['iqm']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    names = ["final_return", "best_return", "auc", "updates_per_second"]
    if any("success" in v for v in summary["variants"].values()):
        names.append("success")
    lines = [
        "| variant | n | " + " | ".join(names) + " |",
        "|---" * (len(names) + 2) + "|",
    ]
    for variant, entry in summary["variants"].items():
        cells = [
            cell(entry.get(n), 2 if n in ("updates_per_second", "success") else 1) for n in names
        ]
        lines.append(f"| {variant} | {entry['n']} | " + " | ".join(cells) + " |")
    return lines
