"""One namespace (issue 29, item 1): the folders install and import as one package, ``imagine_rl``.

``pyproject.toml`` maps each top-level folder under the namespace (``imagine_rl.sparse`` is
``sparse/``); ``imagine_rl`` itself has no folder (PEP 420). So a package named ``sparse`` (the
pydata one), ``agents`` or ``envs`` installed beside ours shadows nothing, in the wheel and in
the editable install alike. The clash test builds the wheel, installs it into a folder of its
own, puts stand-ins named ``sparse``, ``agents`` and ``envs`` first on the path and trains the
debug preset from outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("agents", "envs", "runtime", "scripts", "sparse", "worldmodels")
# Names of ours that other projects use too: the stand-ins of the clash test.
CLASHING = ("sparse", "agents", "envs")


def _setuptools_config() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 240):
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def test_the_package_list_is_every_folder_with_an_init_under_the_namespace():
    """The explicit ``packages`` list is every folder with an ``__init__.py``, as
    ``imagine_rl.<dotted path>``; ``scripts/dev`` (no ``__init__.py``) is left out."""
    config = _setuptools_config()
    expected = sorted(
        "imagine_rl." + ".".join(init.parent.relative_to(ROOT).parts)
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
        if "__pycache__" not in init.parts
    )
    assert sorted(config["packages"]) == expected
    assert config["package-dir"] == {f"imagine_rl.{folder}": folder for folder in FOLDERS}
    assert not (ROOT / "imagine_rl").exists()  # a namespace: no folder, no __init__.py
    assert not [p for p in config["packages"] if p.startswith("imagine_rl.scripts.dev")]
    assert set(config["package-data"]) <= set(config["packages"])


def test_the_installed_package_is_this_checkout_and_no_old_name_is_loaded(tmp_path):
    """From outside the checkout (no folder of ours on the path): ``imagine_rl`` imports from
    this tree (the editable install), the old top-level names are not importable, and
    importing the commands and every agent loads no module under an old name."""
    code = (
        "import importlib.util, json, sys\n"
        "import imagine_rl.sparse, imagine_rl.scripts.train, imagine_rl.scripts.cli\n"
        "from imagine_rl import agents\n"
        "from imagine_rl.runtime import registry\n"
        f"old = {FOLDERS!r}\n"
        "print(json.dumps({\n"
        "  'sparse': imagine_rl.sparse.__file__,\n"
        "  'agents': registry.agent_names(),\n"
        "  'loaded_old': sorted(m for m in sys.modules if m.split('.')[0] in old),\n"
        "  'importable_old': {n: getattr(importlib.util.find_spec(n), 'origin', None)\n"
        "                     for n in old if importlib.util.find_spec(n) is not None},\n"
        "}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = json.loads(_run([sys.executable, "-c", code], tmp_path, env).stdout.splitlines()[-1])
    installed = Path(out["sparse"]).resolve()
    if installed.parent != ROOT / "sparse":
        pytest.skip(
            f"imagine_rl is installed from {installed}, not this checkout (pip install -e .)"
        )
    assert {"dreamer", "op3", "random"} <= set(out["agents"])
    assert out["loaded_old"] == []
    # An old name finds another project's package (a pydata `sparse`) or nothing; never ours.
    for name, origin in out["importable_old"].items():
        assert origin and not Path(origin).resolve().is_relative_to(ROOT), (name, origin)


def test_wheel_trains_beside_packages_named_sparse_agents_and_envs(tmp_path):
    """The clash test: the wheel in a --target folder, stand-ins named sparse, agents and envs
    first on PYTHONPATH, the debug preset trained from outside the checkout; every module of
    ours comes from the wheel, the stand-ins are never imported, and the agents' entry-point
    group still finds dreamer."""
    # Build from a copy of the sources, so that build/ and *.egg-info stay out of the checkout
    # (and a stale build/ cannot leak into the wheel).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)]
    try:
        import setuptools  # noqa: F401 - present: build without fetching it
        import wheel  # noqa: F401

        build.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    _run(build, tmp_path)
    (wheel_path,) = dist.glob("imagine_rl-*.whl")
    names = zipfile.ZipFile(wheel_path).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"imagine_rl", wheel_path.name.split("-py")[0] + ".dist-info"}, tops
    assert "imagine_rl/__init__.py" not in names  # a PEP 420 namespace
    assert "imagine_rl/runtime/reference/README.md" in names
    assert any(n.startswith("imagine_rl/agents/presets/") for n in names)
    assert not [n for n in names if n.startswith("imagine_rl/scripts/dev/")]

    site = tmp_path / "site"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel_path),
        ],
        tmp_path,
    )
    # Stand-ins that fail loudly when imported (as a pydata `sparse` would fail our code).
    standins = tmp_path / "standins"
    for name in CLASHING:
        (standins / name).mkdir(parents=True)
        (standins / name / "__init__.py").write_text(
            f"MARKER = 'stand-in {name}'\n"
            f"raise ImportError('the stand-in {name} package was imported')\n"
        )
    work = tmp_path / "work"  # outside the checkout: no folder of ours beside the cwd
    work.mkdir()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(standins), str(site)]),
        OMP_NUM_THREADS="1",
        MUJOCO_GL=env.get("MUJOCO_GL", "egl"),
        WANDB_MODE="offline",
    )
    run_dir = work / "run"
    code = (
        "import importlib.util, json, sys\n"
        f"clashing = {CLASHING!r}\n"
        "found = {n: importlib.util.find_spec(n).origin for n in clashing}\n"
        "from imagine_rl.scripts import train\n"
        "rc = train.main(sys.argv[1:])\n"
        "from importlib.metadata import entry_points\n"
        "from imagine_rl.runtime import registry\n"
        "ours = {m: getattr(sys.modules[m], '__file__', None) for m in sys.modules\n"
        "        if m.startswith('imagine_rl.')}\n"
        "print(json.dumps({'rc': rc, 'found': found, 'ours': ours,\n"
        "  'standins': [n for n in clashing if n in sys.modules],\n"
        "  'entry_points': sorted({ep.value for ep in entry_points(group='imagine_rl.agents')}),\n"
        "  'agents': registry.agent_names()}))\n"
    )
    args = [
        "agent=dreamer",
        "preset=debug",
        "env=gym:Pendulum-v1",
        f"run.dir={run_dir}",
        "run.steps=300",
        "run.eval_every=300",
        "run.eval_episodes=1",
        "env.time_limit=100",
        "logging.console=false",
    ]
    result = _run([sys.executable, "-c", code, *args], work, env, timeout=300)
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["rc"] == 0, result.stderr[-3000:]
    # The stand-ins would have been found first by those names, and were never imported.
    for name in CLASHING:
        assert Path(out["found"][name]).parent == standins / name
    assert out["standins"] == []
    # Every module of ours came from the wheel's install, none from the checkout.
    assert "imagine_rl.sparse" in out["ours"] and "imagine_rl.agents.dreamer" in out["ours"]
    for module, file in out["ours"].items():
        if file is not None:
            assert Path(file).resolve().is_relative_to(site.resolve()), (module, file)
    assert Path(out["ours"]["imagine_rl.sparse"]).parent == site / "imagine_rl" / "sparse"
    assert out["entry_points"] == ["imagine_rl.agents.registry"]
    assert "dreamer" in out["agents"]
    # It trained: updates logged, the final checkpoint written.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("world_model/kl" in row for row in rows), rows[-1]  # the world model updated
    assert (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())

    # The entry-point group alone (no explicit import of the agents) finds dreamer.
    code = (
        "import sys\n"
        "from imagine_rl.runtime import registry\n"
        "assert 'imagine_rl.agents' not in sys.modules\n"
        "print(registry.agent_names())\n"
    )
    names = _run([sys.executable, "-c", code], work, env).stdout
    assert "dreamer" in names
