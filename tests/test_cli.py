"""Everyday use from a shell: the installed ``imagine-rl`` command, ``--help``, and a resumed run
that logs every step once after a kill -9."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_scripts import ROOT, run_script, script_env, train_args

COMMAND = shutil.which("imagine-rl", path=str(Path(sys.executable).parent)) or shutil.which(
    "imagine-rl"
)


def run_command(*args: str, check: bool = True, cwd: Path | None = None):
    if COMMAND is None:
        pytest.skip("the imagine-rl command is not installed (pip install -e .)")
    result = subprocess.run(
        [COMMAND, *args],
        capture_output=True,
        text=True,
        env=script_env(),
        cwd=cwd or ROOT,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"imagine-rl {args[0]} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_installed_command_trains_evaluates_and_plots(tmp_path):
    run_dir = tmp_path / "run"
    # From another directory: nothing relies on the repository being the working directory.
    trained = run_command("train", *train_args(run_dir), cwd=tmp_path)
    assert (run_dir / "checkpoints" / "step_400").is_dir()
    # wandb's Weave integration took our `agents` package for an LLM library and said so.
    assert "Weave" not in trained.stdout + trained.stderr
    assert "Detected [" not in trained.stdout + trained.stderr
    out = tmp_path / "eval.json"
    run_command("evaluate", f"checkpoint={run_dir}", "episodes=1", f"json={out}", cwd=tmp_path)
    assert json.loads(out.read_text())["episodes"] == 1
    png = tmp_path / "curves.png"
    run_command("plot", str(run_dir), f"out={png}", cwd=tmp_path)
    assert png.stat().st_size > 0


def test_installed_command_lists_commands_and_refuses_unknown_ones():
    listing = run_command("--help")
    for name in ("train", "evaluate", "plot", "experiment", "bench"):
        assert f"  {name}" in listing.stdout
    wrong = run_command("evalute", check=False)
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == (
        "error: unknown command 'evalute': did you mean 'evaluate'? commands: train, evaluate, plot, "
        "experiment, bench"
    )


def test_bench_command_is_the_training_step_benchmark(tmp_path):
    """``imagine-rl bench`` is ``scripts/bench_train_step.py`` with its arguments: its help, a
    bad key refused in one line, and a tiny timed run writing the documented JSON."""
    from imagine_rl.scripts import bench_train_step, cli

    assert cli.COMMANDS["bench"][0] == bench_train_step.__name__
    shown = run_command("bench", "--help")
    assert shown.stdout.startswith("Time the agent's training step")
    assert "bench keys: updates, warmup, json" in shown.stdout
    bad = run_command("bench", "preset=debug", "updates=0", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: updates must be >= 1")
    out = tmp_path / "bench.json"
    args = ["preset=debug", "env=gym:Pendulum-v1", "updates=1", "warmup=0", f"json={out}"]
    run_command("bench", *args, "accelerator.threads=1", cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["updates_per_s"] > 0 and "mfu" in result


def test_help_lists_sections_and_a_sections_keys():
    sections = run_script("train.py", "--help")
    for name in ("env", "agent", "replay", "sparse", "run", "world_model", "op3"):
        assert f"\n  {name} " in sections.stdout
    keys = run_script("train.py", "--help", "sparse")
    lines = keys.stdout.splitlines()
    # Type, default and the field's own one-line doc.
    assert "  sparse.density (float) = 0.1" in lines
    index = lines.index("  sparse.density (float) = 0.1")
    assert "fraction of weights kept" in lines[index + 1]
    assert "  sparse.update_every (int >= 1) = 100" in lines
    nested = run_script("train.py", "--help", "world_model").stdout
    assert "  world_model.factored.groups (int >= 0) = 0" in nested
    assert "  world_model.deter (int >= 1) = 512" in nested
    for script in ("evaluate.py", "plot.py"):
        assert run_script(script, "--help").stdout.strip()


def test_help_for_an_unknown_section_is_one_line():
    result = run_script("train.py", "--help", "spars", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --help spars: no such section; did you mean 'sparse'? sections: env, agent, "
        "replay, sparse, accelerator, ipu, distributed, logging, run, world_model, planner, op3"
    ]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Runs scripts/train.py as `python scripts/train.py ...` does, with one change made from
# outside (no hook in the code under test): the metrics.jsonl backend, once it has written the
# log row of env step 1500, writes a marker file and blocks. The test waits for the marker
# and kills -9 there, so the kill always lands at the same place: after the checkpoint at env
# step 1000, with rows 1100..1500 logged after it, before the checkpoint at 2000, however fast
# or slow the machine.
BLOCK_AT_LOG_ROW = """
import os, runpy, sys, time
from pathlib import Path

if __name__ == "__main__":
    marker, block_at, script, *args = sys.argv[1:]
    sys.path.insert(0, str(Path(script).parent))  # as `python scripts/train.py` has it
    from imagine_rl.runtime.logging import JsonlBackend

    write = JsonlBackend.write

    def write_then_block(self, metrics, step):
        write(self, metrics, step)  # written and flushed first: the row is on disk
        if step == int(block_at) and "train/env_steps" in metrics:
            Path(marker + ".tmp").write_text(str(os.getpid()))
            os.replace(marker + ".tmp", marker)  # whole or absent when the test looks
            time.sleep(600)  # killed here by the test
            os._exit(3)  # (never reached while the test runs; no orphan outlives it long)

    JsonlBackend.write = write_then_block
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
"""


def test_kill_9_then_resume_logs_every_step_once(tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(
        run_dir,
        "run.steps=3000",
        "run.log_every=100",
        "run.checkpoint_every=1000",
        "run.eval_every=100000",
        "logging.wandb=false",
    )
    wrapper = tmp_path / "block_at_log_row.py"
    wrapper.write_text(BLOCK_AT_LOG_ROW)
    marker = tmp_path / "blocked"
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, str(wrapper), str(marker), "1500", str(ROOT / "scripts" / "train.py")]
            + args,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=script_env(),
            cwd=ROOT,
        )
    try:
        deadline = time.time() + 240
        while not marker.exists():
            # The run cannot pass step 1500 (it blocks there), so it only ends early by failing.
            assert process.poll() is None, f"train.py exited early:\n{stderr.read_text()}"
            assert time.time() < deadline, "train.py never logged env step 1500"
            time.sleep(0.05)
        assert int(marker.read_text()) == process.pid
        # Blocked at the known point: the checkpoint at 1000 is written, the one at 2000 not,
        # and the rows after the checkpoint (1100..1500) are what the resume must drop.
        assert (run_dir / "checkpoints" / "step_1000").is_dir()
        assert not (run_dir / "checkpoints" / "step_2000").exists()
        logged = [row["step"] for row in _rows(run_dir) if "train/env_steps" in row]
        assert logged == list(range(100, 1501, 100))
    finally:
        process.kill()  # SIGKILL, as kill -9 (a no-op if it already ended and was reaped)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    resumed = run_script("train.py", f"resume={run_dir}")
    assert "dropped" in resumed.stderr and "env step 1000" in resumed.stderr
    rows = _rows(run_dir)
    # Every (step, metric) once: the rows of the killed session after step 1000 are gone.
    # (perf/wall_seconds is in both the log and the eval row of a step: skip it.)
    skip = {"step", "perf/wall_seconds"}
    counts = Counter((row["step"], key) for row in rows for key in row if key not in skip)
    assert max(counts.values()) == 1
    logged = sorted({row["step"] for row in rows if "train/env_steps" in row})
    assert logged == list(range(100, 3001, 100))
    # Nothing else in the run directory was lost: both sessions' checkpoints are there.
    assert (run_dir / "checkpoints" / "step_3000").is_dir()
    assert (run_dir / "config.yaml").exists()


def test_plot_reads_older_files_with_duplicate_steps(tmp_path):
    from imagine_rl.scripts import plot

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [(100, 1.0), (200, 2.0), (300, 3.0), (200, 5.0), (300, 6.0), (400, 7.0)]
    text = "".join(json.dumps({"step": s, "eval/return_mean": v}) + "\n" for s, v in rows)
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 500, "eval/ret')
    steps, values = plot.read_curve(run_dir, "eval/return_mean")
    # One point per step, the later session's value, in step order; the cut line skipped.
    assert steps == [100, 200, 300, 400]
    assert values == [1.0, 5.0, 6.0, 7.0]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A finished short run whose replay has chunk files on disk (chunk_size 64)."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    run_script(
        "train.py",
        *train_args(run_dir, "replay.chunk_size=64", "run.checkpoint_every=400"),
        "logging.wandb=false",
    )
    return run_dir


@pytest.mark.parametrize(
    ("override", "refused"),
    [
        ("env=dmc:walker-walk", "env"),
        ("world_model.deter=64", "world_model.deter"),
        ("replay.batch_length=8", "replay.batch_length"),
        ("preset=xs", "preset"),
        ("seed=3", "seed"),
    ],
)
def test_resume_refuses_an_override_that_changes_the_run(stopped_run, override, refused):
    before = sorted(p.name for p in stopped_run.rglob("*"))
    result = run_script("train.py", f"resume={stopped_run}", override, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert f"resume={stopped_run}: {refused} cannot change" in lines[0]
    assert "allowed: run.steps, run.eval_every" in lines[0] and "init=" in lines[0]
    assert sorted(p.name for p in stopped_run.rglob("*")) == before  # nothing touched


def test_resume_may_extend_the_run_and_change_logging(stopped_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stopped_run, copy)
    run_script(
        "train.py", f"resume={copy}", "run.steps=600", "run.log_every=100", "accelerator.threads=1"
    )
    assert (copy / "checkpoints" / "step_600").is_dir()


def test_a_corrupt_replay_chunk_is_refused_and_fresh_replay_goes_on(stopped_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stopped_run, copy)
    chunk = sorted((copy / "replay").glob("*.npz"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])  # cut short, as by a full disk
    result = run_script("train.py", f"resume={copy}", "run.steps=600", check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert chunk.name in lines[0] and "resume.replay=fresh" in lines[0]
    assert f"`imagine-rl train resume={copy} resume.replay=fresh`" in lines[0]
    assert (copy / "checkpoints" / "step_400").is_dir()  # the checkpoint is still there

    fresh = run_script("train.py", f"resume={copy}", "resume.replay=fresh", "run.steps=600")
    assert "resume.replay=fresh" in fresh.stderr and "empty replay" in fresh.stderr
    assert (copy / "checkpoints" / "step_600").is_dir()
    # The old replay files were moved aside, not deleted.
    (kept,) = copy.glob("replay.unused-*")
    assert (kept / chunk.name).exists()


def test_fresh_replay_needs_resume():
    result = run_script("train.py", "resume.replay=fresh", check=False)
    assert result.returncode == 2
    assert "resume.replay=fresh needs resume=<run dir>" in result.stderr
    other = run_script("train.py", "resume=/x", "resume.replay=old", check=False)
    assert other.returncode == 2 and "the only value is fresh" in other.stderr


@pytest.mark.parametrize(
    ("args", "expected", "code"),
    [
        (["world_model.deter=100", "world_model.blocks=8"], "divisible by world_model.blocks", 2),
        (["world_model.classes=1"], "needs >= 2 classes", 2),
        (
            ["env=dmc:cartpole-balance", "env.obs=pixels", "env.size=36"],
            "env.size: the Dreamer's CNN takes square images of side 4 x a power of 2",
            2,
        ),
        (["agent=dremer"], "unknown agent 'dremer': did you mean 'dreamer'?", 2),
        (["preset=BAD_YAML"], "is not valid YAML at line 1, column 5", 2),
        (["run.dir=A_FILE"], "is an existing file, not a directory", 2),
        (
            ["env=dmc:cartpole-balance", "env.camera=7", "run.steps=20"],
            "env 'dmc:cartpole-balance' cannot be built with these env.* settings: camera",
            2,
        ),
    ],
)
def test_bad_input_is_one_line_before_anything_is_built(tmp_path, args, expected, code):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text('[[{"')
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    args = [a.replace("BAD_YAML", str(bad_yaml)).replace("A_FILE", str(a_file)) for a in args]
    run_dir = [f"run.dir={tmp_path / 'run'}"] if not any("run.dir" in a for a in args) else []
    result = run_script("train.py", *run_dir, "logging.wandb=false", *args, check=False)
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0]
    assert a_file.read_text() == "keep me"
    # Refused before anything was built: no run directory was made.
    assert not (tmp_path / "run").exists()
