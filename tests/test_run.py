"""The run layer (``runtime.run``) called as a library, not through a command: train, stop,
resume, evaluate and rebuild a checkpoint, a staged run that skips its finished stages, the
run-directory lock against a second process, and no script path in what the runtime prints."""

from __future__ import annotations

import ast
import inspect
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from imagine_rl.agents.random_agent import RandomAgent
from imagine_rl.runtime import registry, run
from imagine_rl.runtime.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from imagine_rl.runtime.config import ConfigError, describe
from imagine_rl.runtime.experiment import run_experiment

ROOT = Path(__file__).resolve().parent.parent

# The tiny settings of tests/test_scripts.py's train_args, as a mapping.
TINY = {
    "env": "gym:Pendulum-v1",
    "preset": "debug",
    "run.steps": 400,
    "run.eval_every": 200,
    "run.eval_episodes": 1,
    "run.checkpoint_every": 200,
    "env.time_limit": 100,
    "logging.wandb": False,
    "logging.console": False,
}


class Toy(RandomAgent):
    """The random agent, two ways: its 10th update sends this process SIGTERM once (``stop``,
    the run stops there with a checkpoint, as after a Ctrl-C), and it may start from another
    run's weights (``init=``; the weights it was given are kept in ``loaded``)."""

    stop = False
    loaded: list[dict] = []

    def update(self, batch):
        metrics = super().update(batch)
        if self.updates == 10 and Toy.stop:
            Toy.stop = False
            signal.raise_signal(signal.SIGTERM)
        return metrics

    def load_weights(self, weights):
        Toy.loaded.append(weights)


@pytest.fixture
def toy():
    """Registers the ``toy`` agent for one test."""
    Toy.stop, Toy.loaded = False, []
    entry = registry.AgentEntry(
        name="toy", make=lambda config, obs, action: Toy(action, seed=config.seed)
    )
    with registry.registered(entry):
        yield entry.name


def test_train_stop_resume_evaluate_and_rebuild(tmp_path, capsys, toy):
    run_dir = tmp_path / "run"
    settings = {**TINY, "agent": toy, "run.dir": str(run_dir)}
    Toy.stop = True
    stopped = run.train(settings)
    out = capsys.readouterr().out
    assert stopped.status == 0 and stopped.interrupted and not stopped.ok
    assert stopped.run_dir == run_dir and 0 < stopped.step < 400
    assert stopped.checkpoint == list_checkpoints(run_dir)[-1]
    # How to go on names the installed command.
    assert f"resume with: imagine-rl train resume={run_dir}\n" in out
    assert "scripts/" not in out

    # The same run again is refused (status 2, one line on stderr, nothing written).
    again = run.train({**settings, "run.steps": 600})
    err = capsys.readouterr().err.strip()
    assert again.status == 2 and again.error and err == f"error: {again.error}"
    assert "already holds checkpoints" in again.error and f"resume={run_dir}" in again.error
    # resume may not change what was trained...
    refused = run.resume(run_dir, {"seed": 3})
    assert refused.status == 2 and f"resume={run_dir}: seed cannot change" in refused.error
    capsys.readouterr()

    # ...and goes on to the end, in the same directory, from the stopped checkpoint.
    resumed = run.resume(run_dir)
    assert resumed.ok and resumed.step == 400 and resumed.run_dir == run_dir
    assert resumed.checkpoint == run_dir / "checkpoints" / "step_400"
    assert "eval/return_mean" in resumed.eval
    assert load_checkpoint(run_dir).train_state["counters"]["env_steps"] == 400
    assert "run dir:" in capsys.readouterr().out

    # Evaluate the newest checkpoint; rebuild its agent with the weights loaded.
    scores = run.evaluate(run_dir, episodes=2, seed=1)
    assert (scores["env"], scores["agent"], scores["step"]) == ("gym:Pendulum-v1", toy, 400)
    assert scores["episodes"] == 2 and len(scores["returns"]) == len(scores["lengths"]) == 2
    assert scores["checkpoint"] == str(run_dir / "checkpoints" / "step_400")
    assert capsys.readouterr().out == ""  # the library prints nothing; the command does
    rebuilt = run.rebuild_agent(stopped.checkpoint)
    assert isinstance(rebuilt.agent, Toy) and rebuilt.checkpoint.step == stopped.step
    saved = load_checkpoint(stopped.checkpoint).agent_state
    assert rebuilt.agent.updates == saved["updates"] > 0
    assert rebuilt.config.env.id == "gym:Pendulum-v1"

    with pytest.raises(ConfigError, match="episodes must be >= 1, got 0"):
        run.evaluate(run_dir, episodes=0)
    with pytest.raises(CheckpointError, match="nowhere"):
        run.evaluate(tmp_path / "nowhere")


def test_train_takes_key_value_strings_and_refuses_bad_ones_in_one_line(tmp_path, capsys):
    result = run.train(["run.stpes=5", f"run.dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert result.status == 2 and len(err) == 1 and "did you mean run.steps" in err[0]
    assert run.train(["not-a-key-value"]).status == 2
    assert run.resume(tmp_path / "none").error.endswith(
        "no config.yaml there; pass the run directory (the run.dir of the run to continue)"
    )
    assert not (tmp_path / "x").exists()
    with pytest.raises(TypeError):
        run.train("preset=debug")


def test_a_staged_run_skips_its_finished_stages(tmp_path, capsys, toy):
    # Two stage presets given as files (a stage is named after its file); the command's
    # key=values win over them in every stage; stage 2 starts from stage 1's weights.
    for name, size in (("first", 16), ("second", 32)):
        (tmp_path / f"{name}.yaml").write_text(f"replay:\n  chunk_size: {size}\n")
    stages = [str(tmp_path / "first.yaml"), str(tmp_path / "second.yaml")]
    run_dir = tmp_path / "staged"
    settings = {
        **TINY,
        "agent": toy,
        "run.stages": stages,
        "run.steps": 60,
        "run.learning_starts": 40,
        "run.replay_ratio": 4,
        "run.eval_episodes": 0,
        "run.checkpoint_every": 60,
        "run.log_every": 20,
        "run.video": False,
        "replay.batch_length": 4,
        "run.dir": str(run_dir),
    }
    first = run.train(settings)
    out = capsys.readouterr().out
    assert first.ok and first.run_dir == run_dir and first.step == 60, out
    assert f"stage 1/2 {stages[0]} -> {run_dir / 'first'}\n" in out
    assert f"stage 2/2 {stages[1]} -> {run_dir}\n" in out
    assert load_checkpoint(run_dir / "first").step == load_checkpoint(run_dir).step == 60
    assert Toy.loaded == [load_checkpoint(run_dir / "first").agent_state["weights"]]
    chunks = [
        load_checkpoint(d).config["replay"]["chunk_size"] for d in (run_dir / "first", run_dir)
    ]
    assert chunks == [16, 32]  # each stage its own preset

    metrics = (run_dir / "metrics.jsonl").read_text()
    checkpoints = list_checkpoints(run_dir) + list_checkpoints(run_dir / "first")
    again = run.train(settings)
    out = capsys.readouterr().out
    assert again.ok and again.run_dir == run_dir and again.step == 60
    assert out.count("skipped") == 2 and "run dir:" not in out and len(Toy.loaded) == 1
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert list_checkpoints(run_dir) + list_checkpoints(run_dir / "first") == checkpoints


HOLD_THE_LOCK = """
import sys
from imagine_rl.runtime.run import lock_run_dir

handle = lock_run_dir(sys.argv[1])
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin
"""


def test_the_lock_refuses_a_second_process(tmp_path, capsys):
    pytest.importorskip("fcntl")
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run.train({**TINY, "agent": "random", "run.dir": run_dir})  # a Path will do
        err = capsys.readouterr().err.strip().splitlines()
        assert result.status == 2 and len(err) == 1
        assert f"in use by another training process (pid {holder.pid})" in err[0]
        assert not (run_dir / "metrics.jsonl").exists() and not list_checkpoints(run_dir)
        with pytest.raises(run.RunDirInUse, match=f"pid {holder.pid}"):
            run.lock_run_dir(run_dir)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    run.lock_run_dir(run_dir).close()  # free again once the holder is gone


def test_the_harness_defaults_to_the_run_layer():
    """Experiment workers are spawned processes: the default is a module-level function."""
    assert inspect.signature(run_experiment).parameters["train_main"].default is None
    assert pickle.loads(pickle.dumps(run.train_main)) is run.train_main
    source = (ROOT / "scripts" / "experiment.py").read_text()
    assert "scripts.train" not in source


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal (f-string parts included) but docstrings."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_the_runtime_prints_no_script_path():
    """Messages name the installed command (``imagine-rl train ...``), never a script."""
    found = []
    for path in sorted(ROOT.glob("runtime/**/*.py")):
        for line, text in _strings(ast.parse(path.read_text(), filename=str(path))):
            if "scripts/" in text or ("python " in text and ".py" in text):
                found.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not found, "script paths in runtime messages:\n" + "\n".join(found)
    # The --help texts come from the config classes' docstrings and field comments.
    sections = [line.split()[0] for line in describe().splitlines()[1:-1]]
    assert "distributed" in sections and "run" in sections
    for section in [None, *sections]:
        assert "scripts/" not in describe(section), section
