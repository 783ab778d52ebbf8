"""The development tools in ``scripts/dev``: not installed, and one argument/JSON harness.

The benchmarks other than ``imagine-rl bench`` and the research checks live in ``scripts/dev``,
which has no ``__init__.py`` and is not in pyproject's package list, so ``pip install`` leaves
it out; each tool parses its ``key=value`` arguments, prints its ``--help`` and writes its JSON
through ``harness.py``.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT / "scripts" / "dev"
sys.path.insert(0, str(DEV))

import harness  # noqa: E402

from imagine_rl.runtime.config import ConfigError  # noqa: E402

TOOLS = sorted(p.stem for p in DEV.glob("*.py") if p.stem != "harness")


def test_the_folder_is_not_a_package_and_is_left_out_of_the_install():
    assert not (DEV / "__init__.py").exists()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    # The packages are listed one by one (tests/test_namespace.py: every folder with an
    # __init__.py, under imagine_rl); scripts/dev is not among them.
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    assert "imagine_rl.scripts" in packages
    assert not [p for p in packages if p.startswith("imagine_rl.scripts.dev")]
    # The installed scripts are the commands behind `imagine-rl` (and their package).
    installed = sorted(p.stem for p in (ROOT / "scripts").glob("*.py"))
    assert installed == [
        "__init__",
        "bench_train_step",
        "cli",
        "evaluate",
        "experiment",
        "plot",
        "train",
    ]


def test_the_tools_moved_here():
    assert set(TOOLS) >= {
        "bench_adaptation",
        "bench_blocks",
        "bench_gim_memory",
        "bench_planner",
        "bench_render",
        "bench_replay",
        "bench_sheeprl",
        "bench_sparse",
        "cpc_checks",
        "ipu_report",
        "op3_checks",
        "soak",
        "sparse_sanity",
    }


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_uses_the_harness(tool):
    source = (DEV / f"{tool}.py").read_text()
    assert "import harness" in source
    assert "harness.run(main)" in source
    # What the harness does is not done again by hand.
    for repeated in ("parse_script_args", "run_script", "write_text(json.dumps", "json.dump("):
        assert repeated not in source, f"{tool}: {repeated}"


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_help_prints_its_docstring_and_keys(tool, capsys):
    module = importlib.import_module(tool)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(module.__doc__.strip().splitlines()[0])
    assert "keys (default):" in out
    assert f"scripts/dev/{tool}.py" in module.__doc__


def test_parse_types_values_like_defaults_and_refuses_unknown_keys():
    defaults = {"sizes": [1, 2], "steps": 3, "json": None, "name": "a"}
    args = harness.parse(
        ["size=4,5", "steps=7", "json=out.json"], defaults, "doc", {"size": "sizes"}
    )
    assert args == {"sizes": [4, 5], "steps": 7, "json": "out.json", "name": "a"}
    with pytest.raises(ConfigError, match="unknown argument 'stesp': did you mean 'steps'"):
        harness.parse(["stesp=1"], defaults, "doc")
    with pytest.raises(ConfigError):
        harness.parse(["steps=many"], defaults, "doc")


def test_parse_with_rest_keeps_the_other_arguments_in_order():
    defaults = {"updates": 20, "json": None}
    args, rest = harness.parse_with_rest(
        ["preset=debug", "updates=3", "+json=x.json", "env.obs=pixels"], defaults, "doc"
    )
    assert args == {"updates": 3, "json": "x.json"} and rest == ["preset=debug", "env.obs=pixels"]
    ours = harness.parse_with_rest(
        ["updates=1", "--", "exp=dreamer_v3", "updates=9"], defaults, "doc", ours=lambda k: True
    )
    assert ours == ({"updates": 1, "json": None}, ["exp=dreamer_v3", "updates=9"])


def test_help_lists_the_keys_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        harness.parse_with_rest(["preset=debug", "-h"], {"steps": 3}, "The tool.")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == "The tool.\n\nkeys (default):\n  steps=3\n"


def test_write_json_makes_the_folder_and_prints_the_path(tmp_path, capsys):
    path = harness.write_json(tmp_path / "a" / "b.json", {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    assert capsys.readouterr().out == f"json: {path}\n"
    harness.write_json(path, [1], quiet=True)
    assert capsys.readouterr().out == "" and json.loads(path.read_text()) == [1]
    assert harness.error("bad") == 2
    assert capsys.readouterr().err == "error: bad\n"
