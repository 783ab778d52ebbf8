"""The experiments harness (runtime/experiment.py, `imagine-rl experiment`): records, skipping
recorded runs, resuming a stopped one, the report's numbers, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from imagine_rl.runtime import experiment as harness
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
