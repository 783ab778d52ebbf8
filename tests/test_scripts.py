"""The user-facing scripts, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SECRET = "imagine-rl-test-secret-0123456789abcdef"


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MUJOCO_GL": env.get("MUJOCO_GL", "egl"),
            # A key in the environment must never end up in any file of the run.
            "WANDB_API_KEY": SECRET,
            "WANDB_MODE": "offline",
        }
    )
    return env


def run_script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        capture_output=True,
        text=True,
        env=script_env(),
        cwd=ROOT,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def train_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "env=gym:Pendulum-v1",
        "agent=random",
        "preset=debug",
        f"run.dir={run_dir}",
        "run.steps=400",
        "run.eval_every=200",
        "run.eval_episodes=1",
        "env.time_limit=100",
        "logging.console=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "pendulum"
    run_script("train.py", *train_args(run_dir))
    return run_dir


def test_train_writes_run_directory(trained_run):
    assert (trained_run / "config.yaml").exists()
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert all("step" in row for row in rows)
    assert any("eval/return_mean" in row for row in rows)
    assert (trained_run / "checkpoints" / "step_400" / "manifest.json").exists()
    assert (trained_run / "checkpoints" / "latest").read_text().strip() == "step_400"


def test_wandb_offline_run_has_config_and_video(trained_run):
    runs = list((trained_run / "wandb").glob("offline-run-*"))
    assert runs, "no offline wandb run directory"
    files = [p for p in runs[0].rglob("*") if p.is_file()]
    names = [p.name for p in files]
    assert "imagine_rl_config.yaml" in names
    assert any(p.suffix in (".mp4", ".gif") for p in files), names
    # The config is the resolved run config.
    wandb_files = [p for p in files if p.suffix == ".wandb"]
    assert wandb_files and b"Pendulum-v1" in wandb_files[0].read_bytes()


def test_no_secret_written_anywhere(trained_run):
    for path in trained_run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"API key written to {path}"


def test_evaluate_json_and_video(trained_run, tmp_path):
    out = tmp_path / "eval.json"
    video = tmp_path / "eval.mp4"
    run_script(
        "evaluate.py",
        f"checkpoint={trained_run}",
        "episodes=2",
        "video=true",
        f"json={out}",
        f"video_path={video}",
    )
    result = json.loads(out.read_text())
    for key in ("env", "agent", "step", "episodes", "return_mean", "return_std", "returns"):
        assert key in result
    assert result["env"] == "gym:Pendulum-v1" and result["agent"] == "random"
    assert result["step"] == 400 and result["episodes"] == 2 and len(result["returns"]) == 2
    assert video.exists() and video.stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "missing checkpoint="),
        (["checkpoint=x", "episode=2"], "unknown argument 'episode': did you mean 'episodes'?"),
        (["checkpoint=x", "episodes=0"], "episodes must be >= 1, got 0"),
        (["checkpoint=x", "num_envs=0"], "num_envs must be >= 1, got 0"),
        (["checkpoint=x", "episodes=two"], "episodes: expected int"),
        (["checkpoint=x", "video=often"], "video: expected bool"),
        (["checkpoint=/nonexistent/run"], "/nonexistent/run"),
    ],
)
def test_evaluate_bad_argument_one_line_error(args, expected):
    result = run_script("evaluate.py", *args, check=False)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plot_writes_png(trained_run, tmp_path):
    out = tmp_path / "curve.png"
    run_script("plot.py", str(trained_run), f"out={out}")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_init_from_another_agents_run_is_refused(trained_run, tmp_path):
    result = run_script(
        "train.py",
        "agent=op3",
        "preset=debug",
        "env=blocks:push-2",
        f"init={trained_run}",
        f"run.dir={tmp_path / 'x'}",
        check=False,
    )
    assert result.returncode == 2
    assert "holds an agent=random agent" in result.stderr and "Traceback" not in result.stderr


def test_second_process_on_a_busy_run_dir_is_refused(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a+") as held:  # as a running train.py holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        result = run_script(
            "train.py", f"run.dir={run_dir}", "logging.wandb=false", "preset=debug", check=False
        )
    assert result.returncode == 2
    assert "in use by another training process (pid 4242)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_refuses_to_overwrite_a_run(trained_run):
    result = run_script("train.py", *train_args(trained_run), check=False)
    assert result.returncode == 2
    assert "resume=" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["env=dmc:walker-wlak"], "walker-walk"),
        (["run.stpes=5"], "did you mean run.steps"),
        (["run.steps=-3"], "run.steps: must be >= 1"),
        (["resume=/nonexistent/run"], "no config.yaml"),
        (["accelerator=cuda"], "accelerator=cpu"),
        (["env=dmc:cartpole-balance", "env.intervention=body_mass:pole_9*2@step=5"], "pole_1"),
        (["init=/nonexistent/run"], "/nonexistent/run"),
        (["init=/nonexistent/run", "resume=/nonexistent/run"], "pass one of them"),
        (["preset=op3,op3_dynamics"], "init=<run dir>"),
    ],
)
def test_bad_input_one_line_error(tmp_path, args, expected):
    if args == ["accelerator=cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_script(
        "train.py", f"run.dir={tmp_path / 'x'}", "logging.wandb=false", *args, check=False
    )
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sigterm_then_resume_reaches_same_final_step(tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(
        run_dir,
        "run.steps=4000",
        "run.eval_every=100000",
        "run.checkpoint_every=100000",
        "logging.wandb=false",
    )
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=script_env(),
        cwd=ROOT,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped by signal" in stdout
    from imagine_rl.runtime.checkpoint import load_checkpoint

    stopped = load_checkpoint(run_dir)
    assert 0 < stopped.step < 4000

    run_script("train.py", f"resume={run_dir}")
    final = load_checkpoint(run_dir)
    assert final.step == 4000
    counters = final.train_state["counters"]
    assert counters["env_steps"] == 4000
    assert counters["policy_steps"] == 4000 // 2  # action_repeat 2, one env
    # Every policy step is in replay exactly once, across the interruption.
    from imagine_rl.runtime.replay import SequenceReplay

    config = final.config["replay"]
    replay = SequenceReplay(
        capacity=config["capacity"],
        batch_size=config["batch_size"],
        batch_length=config["batch_length"],
        chunk_size=config["chunk_size"],
        directory=run_dir / "replay",
    )
    replay.load(final.replay_path)
    assert replay.inserted == counters["policy_steps"]
    assert len(replay) == counters["policy_steps"]
