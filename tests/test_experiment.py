"""The experiments harness (runtime/experiment.py, `imagine-rl experiment`): records, skipping
recorded runs, resuming a stopped one, the report's numbers, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from imagine_rl.runtime import experiment as harness
from imagine_rl.runtime.checkpoint import list_checkpoints
from imagine_rl.runtime.experiment import ExperimentError, load_experiment, run_experiment
from imagine_rl.runtime.run import train_main
from imagine_rl.scripts.experiment import main as experiment_main

BASE = {
    "preset": "debug",
    "env": "gym:Pendulum-v1",
    "run.steps": 300,
    "run.eval_every": 150,
    "run.checkpoint_every": 150,
    "run.log_every": 100,
    "run.video": False,
    "logging.wandb": False,
    "logging.console": False,
}


def write(tmp_path, name="tiny", **changes):
    spec = {
        "name": name,
        "base": dict(BASE),
        "variants": {"dense": {}, "cpc": {"world_model.representation": "cpc"}},
        "seeds": [0, 1],
        "workers": 2,
        "threshold": -1300,
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def load(tmp_path, path):
    return load_experiment(path, tmp_path / "results", tmp_path / "runs")


@pytest.mark.slow
def test_runs_are_recorded_skipped_resumed_and_reported(tmp_path):
    path = write(tmp_path)
    experiment = load(tmp_path, path)
    assert [run.key for run in experiment.runs] == ["dense-s0", "dense-s1", "cpc-s0", "cpc-s1"]
    # A stopped run: cpc-s1 trained to env step 150 (its first checkpoint), then stopped.
    stopped = experiment.runs[3]
    args = [a if not a.startswith("run.steps=") else "run.steps=150" for a in stopped.args]
    assert train_main(args) == 0
    assert harness.run_state(stopped) == "stopped at 150"

    lines: list[str] = []
    # The workers' default train_main: runtime.run.train_main.
    assert run_experiment(experiment, echo=lines.append) == 0
    assert lines[0] == "experiment tiny: 4 runs, 0 recorded, 4 to run on 2 worker(s)"
    assert len(lines) == 5 and all("updates/s" in line for line in lines[1:])
    for run in experiment.runs:
        header, rows = harness.read_record(run.record)
        assert header["file_sha256"] == experiment.sha256
        assert (header["variant"], header["seed"]) == (run.variant, run.seed)
        assert header["config"]["seed"] == run.seed and header["env_steps"] == 300
        assert len(header["commit"]) == 40 or header["commit"] == "unknown"
        assert [row["step"] for row in rows if "eval/return_mean" in row] == [150, 300]
    # The resumed run went on from its checkpoint: its record holds both sessions' rows.
    console = (stopped.run_dir / "console.log").read_text()
    assert f"resume={stopped.run_dir}" in console
    assert json.loads(stopped.record.read_text().splitlines()[0])["env_steps"] == 300
    assert (tmp_path / "results/tiny/experiment.yaml").read_bytes() == path.read_bytes()

    # Re-running skips every recorded run and touches no record.
    stamps = [run.record.stat().st_mtime_ns for run in experiment.runs]
    again: list[str] = []
    assert run_experiment(load(tmp_path, path), train_main, echo=again.append) == 0
    assert again == ["experiment tiny: 4 runs, 4 recorded, 0 to run on 1 worker(s)"]
    assert [run.record.stat().st_mtime_ns for run in experiment.runs] == stamps

    summary_path, png = harness.report(experiment)
    summary = json.loads(summary_path.read_text())
    assert png.stat().st_size > 0
    assert summary["experiment"] == "tiny" and summary["file_sha256"] == experiment.sha256
    # The report's numbers by hand, from the records.
    for variant in ("dense", "cpc"):
        evals = []
        for seed in (0, 1):
            _, rows = harness.read_record(tmp_path / f"results/tiny/runs/{variant}-s{seed}.jsonl")
            evals.append(
                [(r["step"], r["eval/return_mean"]) for r in rows if "eval/return_mean" in r]
            )
        final = [e[-1][1] for e in evals]
        best = [max(v for _, v in e) for e in evals]
        auc = [np.mean([v for _, v in e]) for e in evals]
        entry = summary["variants"][variant]
        assert entry["n"] == 2 and entry["seeds"] == [0, 1]
        assert entry["final_return"]["mean"] == pytest.approx(np.mean(final))
        # IQM of two values keeps both (trim_mean cuts int(0.25 * 2) = 0 from each end).
        assert entry["final_return"]["iqm"] == pytest.approx(np.mean(final))
        low, high = entry["final_return"]["ci95"]
        assert min(final) <= low <= high <= max(final)
        assert entry["best_return"]["mean"] == pytest.approx(np.mean(best))
        assert entry["auc"]["mean"] == pytest.approx(np.mean(auc))
        reached = [next((s for s, v in e if v >= -1300), None) for e in evals]
        assert entry["steps_to_threshold"]["reached"] == sum(r is not None for r in reached)
        got = [r for r in reached if r is not None]
        assert entry["steps_to_threshold"]["mean"] == (pytest.approx(np.mean(got)) if got else None)
        assert entry["updates_per_second"]["mean"] > 0 and entry["wall_seconds"]["mean"] > 0
    # The summary is a pure function of what is committed beside it.
    assert harness.summarize(tmp_path / "results/tiny") == summary


def test_aggregate_against_hand_computation():
    values = [1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0]
    got = harness.aggregate(values)
    assert got["n"] == 8 and got["mean"] == pytest.approx(13.75)
    assert got["iqm"] == pytest.approx(np.mean([3.0, 4.0, 10.0, 20.0]))  # middle half
    low, high = got["ci95"]
    assert 1.0 < low < 13.75 < high < 40.0
    assert harness.aggregate([5.0]) == {"n": 1, "mean": 5.0, "iqm": 5.0, "ci95": [5.0, 5.0]}
    assert harness.aggregate([])["mean"] is None


def test_run_metrics_against_hand_computation():
    rows = [
        {"step": 0, "eval/return_mean": -10.0},
        {"step": 100, "train/updates": 40, "perf/update_seconds": 8.0, "perf/wall_seconds": 20},
        {"step": 200, "eval/return_mean": 5.0, "perf/wall_seconds": 30.0},
        {"step": 300, "eval/return_mean": 2.0, "train/updates": 90, "perf/update_seconds": 18.0},
    ]
    got = harness.run_metrics(rows, threshold=4.0)
    assert got == {
        "final_return": 2.0,
        "best_return": 5.0,
        "auc": pytest.approx(-1.0),
        "steps_to_threshold": 200.0,
        "wall_seconds": 30.0,
        "updates_per_second": 5.0,
    }
    assert harness.run_metrics(rows, threshold=6.0)["steps_to_threshold"] is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"repeats": 3}, "unknown key(s) repeats"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"variants": {"bad": {"sparse.density": 2}}}, "variant bad: sparse.density"),
        ({"variants": {"bad": {"no.such.key": 1}}}, "variant bad:"),
        ({"base": {**BASE, "seed": 3}}, "seed is set by the experiment per run"),
        ({"workers": 0}, "workers must be a positive integer"),
    ],
)
def test_bad_files_are_refused_in_one_line(tmp_path, change, message):
    path = write(tmp_path, **change)
    with pytest.raises(ExperimentError) as error:
        load(tmp_path, path)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_init_goes_to_train_and_not_to_the_config(tmp_path):
    """``init=`` (a new run from another run's weights, e.g. one shared pretrained perception)
    is train's argument: each run's command carries it, the config check does not see it."""
    source = tmp_path / "pretrained"
    source.mkdir()
    path = write(tmp_path, variants={"warm": {"init": str(source)}, "cold": {}})
    experiment = load(tmp_path, path)
    args = {run.key: run.args for run in experiment.runs}
    assert args["warm-s0"][-1] == f"init={source}" and args["warm-s1"][-1] == f"init={source}"
    assert not any(arg.startswith("init=") for arg in args["cold-s0"])
    # A missing init= directory stops `run` before anything starts; status and report, which
    # read records only, do not need it.
    missing = write(tmp_path, name="missing", variants={"warm": {"init": "no/such/run"}})
    experiment = load(tmp_path, missing)
    with pytest.raises(ExperimentError, match="warm-s0: init=no/such/run is not a run directory"):
        run_experiment(experiment, echo=lambda line: None)
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_a_staged_run_is_finished_at_its_last_stage_length(tmp_path):
    """preset=op3 runs two stages: its own run.steps (10,000) is not the run's length, the last
    stage's (op3_dynamics: 25,000) is, so a run stopped past 10,000 is not recorded."""
    path = write(tmp_path, base={"preset": "op3", "logging.wandb": False}, variants={"op3": {}})
    run = load(tmp_path, path).runs[0]
    assert run.staged and run.steps == 25000
    single = write(tmp_path, name="single", variants={"dense": {}})
    assert [r.steps for r in load(tmp_path, single).runs] == [300, 300]


def test_a_results_folder_of_another_file_is_refused(tmp_path):
    path = write(tmp_path)
    folder = tmp_path / "results" / "tiny"
    folder.mkdir(parents=True)
    (folder / "experiment.yaml").write_text("name: tiny\nseeds: [7]\n")
    with pytest.raises(ExperimentError, match="holds runs of another experiment file") as error:
        load(tmp_path, path)
    assert "\n" not in str(error.value)


def test_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    path = write(tmp_path, seeds=[])
    assert experiment_main(["status", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "seeds" in err and "\n" not in err
    assert experiment_main(["launch", str(path)]) == 2
    assert experiment_main(["run", str(path), "threads=3"]) == 2


def test_report_draws_the_reference_and_refuses_an_unknown_one(tmp_path):
    """A report from records alone (written here, no training), with DreamerV3's curve."""
    reference = {"task": "cartpole-balance", "obs": "proprio"}
    path = write(tmp_path, reference=reference)
    experiment = load(tmp_path, path)
    experiment.results_dir.mkdir(parents=True)
    (experiment.results_dir / "experiment.yaml").write_bytes(path.read_bytes())
    for run in experiment.runs:
        header = {"file_sha256": experiment.sha256, "variant": run.variant, "seed": run.seed}
        header |= {"commit": "abc", "env_steps": 300}
        rows = [
            {"step": step, "eval/return_mean": float(run.seed * 10 + step)} for step in (150, 300)
        ]
        run.record.parent.mkdir(parents=True, exist_ok=True)
        run.record.write_text("\n".join(json.dumps(x) for x in [header, *rows]) + "\n")
    summary_path, png = harness.report(experiment)
    summary = json.loads(summary_path.read_text())
    assert summary["variants"]["dense"]["final_return"]["mean"] == pytest.approx(305.0)
    assert summary["variants"]["cpc"]["best_return"]["ci95"] == [300.0, 310.0]
    assert summary["commits"] == ["abc"] and png.stat().st_size > 0
    bad = write(tmp_path, name="bad", reference={"task": "no-such-task", "obs": "proprio"})
    with pytest.raises(ExperimentError, match="no published DreamerV3 curve"):
        load(tmp_path, bad)


def test_a_second_run_of_the_same_experiment_is_refused(tmp_path):
    experiment = load(tmp_path, write(tmp_path))
    experiment.runs_root.mkdir(parents=True)
    held = harness._lock(experiment.runs_root / ".lock")
    try:
        with pytest.raises(ExperimentError, match="in use by another `experiment run`"):
            run_experiment(experiment, train_main, echo=lambda line: None)
    finally:
        held.close()


def test_the_progress_line_of_a_run_without_updates(tmp_path):
    """A baseline that never updates (agent=random with no learning) has no update rate."""
    experiment = load(tmp_path, write(tmp_path))
    record = tmp_path / "record.jsonl"
    rows = [{"step": 1000, "eval/return_mean": -1250.0, "perf/wall_seconds": 20.0}]
    record.write_text("\n".join(json.dumps(x) for x in [{"variant": "dense"}, *rows]) + "\n")
    assert harness._run_line(record, experiment) == "final -1250.0, best -1250.0, no updates"


def _proc_status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as a mapping ({} once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _alive(pid: int) -> bool:
    state = _proc_status(pid).get("State", "")
    return bool(state) and not state.startswith(("Z", "X"))  # a zombie has exited


def _pending(pid: int, signum: int) -> bool:
    """``signum`` is sent to ``pid`` and not yet delivered (it is stopped)."""
    status = _proc_status(pid)
    mask = int(status.get("ShdPnd", "0"), 16) | int(status.get("SigPnd", "0"), 16)
    return bool(mask >> (signum - 1) & 1)


def _until(condition, parent: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` (every 20 ms) until it holds; fail if ``parent`` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if parent.poll() is not None:
            out, err = parent.communicate()
            pytest.fail(f"`experiment run` exited ({parent.returncode}) before {what}:\n{out}{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_sigterm_to_the_parent_stops_every_worker_with_a_checkpoint(tmp_path):
    """SIGTERM to `experiment run` alone (as `kill <pid>` or a session's end sends it, not to
    its process group) reaches every worker: each checkpoints and exits, the parent exits with
    143 and no traceback, and the next `experiment run` resumes the runs and records them.

    Synchronisation, by polling files and /proc with generous timeouts (no fixed sleeps): each
    worker (the pid in its run directory's ``.lock``) is paused with SIGSTOP as soon as its run
    directory holds its first checkpoint, so neither can finish before the signal; once both
    are stopped, the parent's SIGTERM to them stays pending (/proc/<pid>/status, ShdPnd) until
    the test lets them go on (SIGCONT)."""
    base = {**BASE, "run.steps": 300, "run.eval_every": 300, "run.checkpoint_every": 100}
    path = write(tmp_path, name="stop", base=base, variants={"dense": {}})
    command = [sys.executable, "-m", "imagine_rl.scripts.cli", "experiment", "run", path.name]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dirs = [tmp_path / f"runs/experiments/stop/dense-s{seed}" for seed in (0, 1)]
    parent = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    workers: dict[int, Path] = {}  # pid -> run directory

    def pause_each_at_its_first_checkpoint() -> bool:
        for run_dir in set(run_dirs) - set(workers.values()):
            if list_checkpoints(run_dir):
                pid = int((run_dir / ".lock").read_text())  # the trainer holding the run dir
                os.kill(pid, signal.SIGSTOP)
                workers[pid] = run_dir
        return len(workers) == len(run_dirs)

    try:
        _until(pause_each_at_its_first_checkpoint, parent, "both runs' first checkpoint")
        # Paused, not only asked to pause: a signal that comes before the stop is delivered.
        _until(
            lambda: all(_proc_status(pid).get("State", "").startswith("T") for pid in workers),
            parent,
            "both workers to pause",
            timeout=30,
        )
        for pid in workers:  # the workers are the parent's own processes
            assert _proc_status(pid)["PPid"] == str(parent.pid), _proc_status(pid)
        parent.send_signal(signal.SIGTERM)  # the parent only
        _until(
            lambda: all(_pending(pid, signal.SIGTERM) for pid in workers),
            parent,
            "the parent to forward SIGTERM to both workers",
            timeout=30,
        )
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        out, err = parent.communicate(timeout=60)
    finally:  # after a failure: nothing is left running (the workers hold the parent's pipes)
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert parent.returncode == 128 + signal.SIGTERM, out + err
    assert "Traceback" not in err, err
    assert not [pid for pid in workers if _alive(pid)]
    lines = out.splitlines()
    assert lines[0] == "experiment stop: 2 runs, 0 recorded, 2 to run on 2 worker(s)"
    assert lines[1].startswith("SIGTERM: stopping 2 running run(s)")
    assert "a second Ctrl-C or SIGTERM kills them at once (SIGKILL)" in lines[1]
    experiment = load_experiment(path, tmp_path / "results", tmp_path / "runs/experiments")
    stopped_at = {}
    for run in experiment.runs:
        # Stopped where it was paused (at or past its first checkpoint), with a checkpoint there.
        step = stopped_at[run.key] = int(list_checkpoints(run.run_dir)[-1].name.split("_")[1])
        assert 100 <= step < 300 and not run.record.exists()
        assert harness.run_state(run) == f"stopped at {step}"
        assert f"stopped {run.key} at env step {step}: resumes on the next `experiment run`" in (
            lines
        )
    assert lines[-1].startswith("stopped by SIGTERM: 0 of 2 runs recorded, 2 stopped")

    # The next `experiment run` resumes both (the run directories are kept) and records them.
    again = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    pid_of = {run_dir: pid for pid, run_dir in workers.items()}
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines()[0] == lines[0]
    assert sum("updates/s" in line for line in again.stdout.splitlines()) == 2
    for run in experiment.runs:
        header, rows = harness.read_record(run.record)
        assert header["env_steps"] == 300
        sessions = (run.run_dir / "console.log").read_text().split("\n== ")[1:]
        assert len(sessions) == 2
        assert sessions[0].split(" train ")[0].endswith(f"pid {pid_of[run.run_dir]}")
        assert (
            sessions[1]
            .splitlines()[0]
            .endswith(f"train resume=runs/experiments/stop/{run.key} run.steps=300")
        )
        # The first session's rows are in the record: 100, then its stop, then the resumed ones.
        steps = [row["step"] for row in rows]
        assert steps[:1] == [100] and stopped_at[run.key] in steps and steps[-1] == 300


def _stubborn_train(args: list[str]) -> int:
    """A worker's training that ignores SIGTERM (a run stuck in an env step, say): it marks its
    run directory ``ready``, then ``sigterm`` at each SIGTERM, and waits 60 s to be killed."""
    run_dir = Path(next(arg for arg in args if arg.startswith("run.dir=")).split("=", 1)[1])
    signal.signal(signal.SIGTERM, lambda *_: (run_dir / "sigterm").touch())
    (run_dir / "ready").touch()
    time.sleep(60)  # resumed after each handler; SIGKILL ends it
    return 1


@pytest.mark.slow
def test_a_second_signal_kills_the_workers_and_the_handlers_are_restored(tmp_path):
    """In-process: the first SIGTERM is forwarded (the workers ignore it), the second kills
    them (SIGKILL); ``run_experiment`` raises ``ExperimentStopped`` (status 143) and leaves the
    signal handlers as it found them. The signals are sent to this process from another thread
    (as a signal may land on any thread) once the workers' files say they are due."""
    experiment = load(tmp_path, write(tmp_path, variants={"dense": {}}))
    run_dirs = [run.run_dir for run in experiment.runs]
    sent: list[int] = []

    def signal_twice() -> None:
        for due in ("ready", "sigterm"):
            deadline = time.monotonic() + 120
            while not all((run_dir / due).exists() for run_dir in run_dirs):
                if time.monotonic() > deadline:
                    return  # no signal: the workers end by themselves and the test fails
                time.sleep(0.02)
            sent.append(due)
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=signal_twice, daemon=True)
    thread.start()
    lines: list[str] = []
    with pytest.raises(harness.ExperimentStopped) as stopped:
        run_experiment(experiment, _stubborn_train, echo=lines.append)
    thread.join(timeout=10)
    assert sent == ["ready", "sigterm"]
    assert stopped.value.code == 128 + signal.SIGTERM and stopped.value.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert lines[0] == "experiment tiny: 2 runs, 0 recorded, 2 to run on 2 worker(s)"
    assert lines[1].startswith("SIGTERM: stopping 2 running run(s)")
    assert lines[2] == (
        "SIGTERM again: killed 2 run(s) (SIGKILL); each resumes from its last checkpoint"
    )
    assert sorted(lines[3:5]) == [
        f"stopped dense-s{seed} before its first checkpoint: starts over on the next "
        "`experiment run`"
        for seed in (0, 1)
    ]
    assert lines[5].startswith("stopped by SIGTERM: 0 of 2 runs recorded, 2 stopped")
    assert len(lines) == 6 and not list(experiment.records_dir.glob("*.jsonl"))
    held = harness._lock(experiment.runs_root / ".lock")  # released: a next `run` may start
    held.close()


def test_summarize_without_the_experiment_file_says_what_to_copy(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a-s0.jsonl").write_text("{}\n")
    with pytest.raises(harness.ExperimentError, match="no experiment.yaml beside the run"):
        harness.summarize(tmp_path)
