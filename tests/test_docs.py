"""The docs and the README: the README stays short, its links and test command hold, the
generated config reference is current, and the commands of the getting-started page (and the
own-env how-to's example) run, under the debug preset with a few hundred steps.

``mkdocs build --strict`` (in the README's test command and ``.ci/run``) checks the pages'
own links and anchors."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# What a training command gets in these tests instead of its own preset and length: the debug
# preset (a tiny Dreamer), 600 env steps, an eval and a checkpoint every 300, no wandb.
DEBUG_TRAIN = [
    "preset=debug",
    "run.steps=600",
    "run.eval_every=300",
    "run.checkpoint_every=300",
    "logging.wandb=false",
]
DEBUG_RESUME_STEPS = 900
# An experiment file's base gets these (and keeps its first seed only).
DEBUG_EXPERIMENT = {
    "preset": "debug",
    "run.steps": 400,
    "run.eval_every": 200,
    "run.checkpoint_every": 200,
}
DEBUG_EVAL_EPISODES = 2


def _drop(args: list[str], *keys: str) -> list[str]:
    return [a for a in args if a.partition("=")[0] not in keys]


def debug_args(args: list[str]) -> list[str]:
    """``imagine-rl`` arguments, shrunk to the debug preset: a training command trains the
    debug preset for a few hundred steps (a resume a few hundred more), an evaluation runs
    two episodes, and an experiment file is rewritten in place (once) to the debug preset and
    its first seed. Everything else passes through."""
    if not args:
        return args
    command, rest = args[0], args[1:]
    if command == "train" and not {"-h", "--help"} & set(rest):
        if any(a.startswith("resume=") for a in rest):
            return [command, *_drop(rest, "run.steps"), f"run.steps={DEBUG_RESUME_STEPS}"]
        return [command, *_drop(rest, "preset", "run.steps"), *DEBUG_TRAIN]
    if command == "evaluate":
        return [command, *_drop(rest, "episodes"), f"episodes={DEBUG_EVAL_EPISODES}"]
    if command == "experiment" and len(rest) >= 2 and rest[0] in ("run", "status", "report"):
        path = Path(rest[1])
        spec = yaml.safe_load(path.read_text())
        if spec["base"].get("preset") != "debug":
            spec["base"].update(DEBUG_EXPERIMENT)
            spec["seeds"] = spec["seeds"][:1]
            path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return args


def _real_command() -> str:
    found = shutil.which("imagine-rl", path=str(Path(sys.executable).parent)) or shutil.which(
        "imagine-rl"
    )
    if found is None:
        pytest.skip("the imagine-rl command is not installed (pip install -e .)")
    return found


def _env(bin_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MUJOCO_GL=env.get("MUJOCO_GL", "egl"),
        WANDB_MODE="offline",
    )
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
        env["IMAGINE_RL_REAL"] = _real_command()
    return env


def _shim(directory: Path) -> Path:
    """An ``imagine-rl`` first on the PATH that runs the real one with ``debug_args``."""
    directory.mkdir()
    shim = directory / "imagine-rl"
    shim.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_docs import debug_args\n"
        "real = os.environ['IMAGINE_RL_REAL']\n"
        "os.execv(real, [real, *debug_args(sys.argv[1:])])\n"
    )
    shim.chmod(0o755)
    return directory


def _run(command: list[str] | str, cwd: Path, env: dict[str, str], timeout: int = 300):
    result = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        shell=isinstance(command, str),
        executable="/bin/bash" if isinstance(command, str) else None,
    )
    assert result.returncode == 0, (
        f"{command}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
    return result


def _readme_blocks() -> list[str]:
    return [b.strip() for b in BASH_BLOCK.findall(README.read_text())]


# ------------------------------------------------------------------------------ README
def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move details into docs/"


def test_readme_python_blocks_run():
    """The README's Python examples (the parts composed by hand) run as written."""
    blocks = PYTHON_BLOCK.findall(README.read_text())
    assert blocks, "README.md has no python block"
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stderr[-2000:]


def test_readme_links_resolve():
    """Every relative link of the README names a file that exists (a docs page, mostly), and
    an anchor on a docs page is one of its headings."""
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link) or link.startswith("#"):
            continue
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
            slugs = {
                re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings
            }
            assert anchor in slugs, f"README links to {link}: no such heading in {path}"


def test_ci_runs_the_readme_test_command():
    """``.ci/run`` runs exactly the README's test command (the second command block)."""
    command = _readme_blocks()[1]
    script = (ROOT / ".ci" / "run").read_text()
    start = script.index("python3 -m venv")
    end = script.index("python -m pytest -q", start) + len("python -m pytest -q")
    chained = " ".join(script[start:end].replace("\\\n", " ").split())
    assert chained == command
    assert "mkdocs build --strict" in command


# ------------------------------------------------------------------------------ reference
def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", DOCS / "gen_config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date():
    generator = _generator()
    page = generator.PAGE.read_text() if generator.PAGE.exists() else ""
    assert page == generator.render(), (
        "docs/reference/config.md is out of date with the config fields: "
        "run python docs/gen_config_reference.py"
    )


def test_config_reference_lists_every_key_of_help():
    """Each key `--help <section>` prints is a row of the page (the same source)."""
    from imagine_rl.runtime.config import describe

    page = (DOCS / "reference" / "config.md").read_text()
    sections = re.findall(r"^  (\w+) ", describe(), re.M)
    assert "replay" in sections and "sparse" in sections
    for section in sections:
        for key in re.findall(r"^  ([\w.]+) \(", describe(section), re.M):
            assert f"| `{key}` |" in page, key


# ------------------------------------------------------------------------------ commands
def test_debug_args():
    assert debug_args(["train", "preset=xs", "run.steps=5000", "env=gym:Pendulum-v1"]) == [
        "train",
        "env=gym:Pendulum-v1",
        *DEBUG_TRAIN,
    ]
    assert debug_args(["train", "resume=runs/x", "run.steps=10000"]) == [
        "train",
        "resume=runs/x",
        f"run.steps={DEBUG_RESUME_STEPS}",
    ]
    assert debug_args(["train", "--help", "replay"]) == ["train", "--help", "replay"]
    assert debug_args(["evaluate", "checkpoint=runs/x", "episodes=10"])[-1] == "episodes=2"


@pytest.mark.slow
def test_getting_started_commands_run(tmp_path):
    """Every command block of docs/getting-started.md, in order, in one fresh directory, with
    an ``imagine-rl`` that shrinks training to the debug preset (``debug_args``). The install
    block is the README's own set-up (which CI runs), so it is checked, not re-run."""
    blocks = BASH_BLOCK.findall((DOCS / "getting-started.md").read_text())
    assert len(blocks) >= 5
    setup, blocks = blocks[0].strip(), blocks[1:]
    assert setup.startswith("python3 -m venv") and _readme_blocks()[0].startswith(setup)
    work = tmp_path / "work"
    work.mkdir()
    env = _env(_shim(tmp_path / "bin"))
    outputs = [_run("set -euo pipefail\n" + block, work, env).stdout for block in blocks]
    commands = " ".join(blocks)
    for verb in ("imagine-rl train", "imagine-rl evaluate", "imagine-rl plot", "resume="):
        assert verb in commands, verb
    for action in ("run", "status", "report"):
        assert f"imagine-rl experiment {action}" in commands, action
    assert (work / "runs" / "first" / "checkpoints" / "latest").exists()
    assert (work / "runs" / "first" / "eval.json").exists()
    assert (work / "runs" / "first" / "curves.png").exists()
    assert any("replay.capacity" in out for out in outputs)  # --help replay
    summary = list((work / "results").glob("*/summary.json"))
    assert len(summary) == 1, list((work / "results").rglob("*"))


@pytest.mark.slow
def test_own_env_example_trains(tmp_path):
    """docs/how-to/own-env.md: its Python files, then its commands (shrunk by ``debug_args``)."""
    text = (DOCS / "how-to" / "own-env.md").read_text()
    for block in PYTHON_BLOCK.findall(text):
        name = block.splitlines()[0].removeprefix("#").strip()
        assert name.endswith(".py"), name
        (tmp_path / name).write_text(block)
    (block,) = BASH_BLOCK.findall(text)
    env = _env()
    for line in block.strip().splitlines():
        python, script, *args = shlex.split(line)
        assert python == "python" and (tmp_path / script).exists(), line
        _run([sys.executable, script, *debug_args(args)], tmp_path, env)
    assert (tmp_path / "runs" / "corridor" / "checkpoints" / "latest").exists()
