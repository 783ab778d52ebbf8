"""Imports run one way (issue 18, section 4): the layering rules and no import cycles.

The rules, checked on the source (``ast``) so that an import hidden inside a function, which
runs later and so dodges a plain ``import`` at start-up, still counts:

- ``envs`` and ``sparse`` import no package of ours;
- ``worldmodels`` imports only ``sparse`` (of ours);
- ``runtime`` imports neither ``agents`` nor ``worldmodels``;
- nothing outside ``scripts`` imports ``scripts`` (``agents`` included);
- no cycle between modules;
- nothing imports our folders by their old top-level names (``import sparse``,
  ``from runtime.config import ...``): they install as one package, ``imagine_rl``
  (``imagine_rl.sparse`` is ``sparse/``), and an old name would find another project's package
  of that name (pydata's ``sparse``) or load a second copy of one of ours. The rule covers the
  packages, the tests, the development tools and the docs' scripts.

Module names carry the ``imagine_rl.`` prefix (``sparse/masks.py`` is ``imagine_rl.sparse.masks``);
the rules name the folders.

Imports under ``if TYPE_CHECKING:`` never run, so they are left out. A literal
``importlib.import_module("x")`` or ``__import__("x")`` counts as an import of ``x``.

The checker is tested on synthetic source first, so a checker that finds nothing cannot pass
for a clean tree; then every module of the importable packages is imported for real.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The one package our folders install as (pyproject.toml's package-dir).
PREFIX = "imagine_rl"

# Our folders (imagine_rl.<folder>); everything else (torch, numpy, the standard library) is
# outside.
OURS = ("agents", "worldmodels", "envs", "sparse", "runtime", "scripts")

# Where else Python files import our packages: checked for the old top-level names too.
OTHER_SOURCES = ("tests", "docs")  # (scripts/dev is under scripts)

# Packages whose modules are imported for real: scripts are entry points with side effects.
IMPORTABLE = ("agents", "envs", "runtime", "sparse", "worldmodels")

# What each package may import of ours besides itself; absent: no rule beyond the scripts one.
ALLOWED = {
    "envs": frozenset(),
    "sparse": frozenset(),
    "worldmodels": frozenset({"sparse"}),
    "runtime": frozenset({"envs", "sparse"}),
}


@dataclass(frozen=True)
class Edge:
    """One import: ``source`` imports ``target`` at ``path:line`` (``text`` as written)."""

    source: str
    target: str
    path: str
    line: int
    text: str

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.text}"


def folder_of(module: str) -> str:
    """The folder of a module of ours: ``imagine_rl.sparse.masks`` -> ``sparse``."""
    return module.split(".")[1]


def discover(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name (``imagine_rl.<folder>...``) -> file, for every ``.py`` file under the
    given top-level folders."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([PREFIX, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING`` (the guard whose body never runs)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _literal_import_call(node: ast.Call) -> str | None:
    """The module named by ``importlib.import_module("x")`` / ``__import__("x")``, if literal."""
    func = node.func
    is_import_module = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__")
    )
    if not is_import_module or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom | ast.Call]:
    """Every import in the file, at any depth (functions, methods, branches), except the body
    of ``if TYPE_CHECKING:`` (its ``else`` still runs, so it is kept)."""
    found: list[ast.Import | ast.ImportFrom | ast.Call] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        is_call = isinstance(node, ast.Call) and _literal_import_call(node) is not None
        if is_call or isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return sorted(found, key=lambda n: (n.lineno, n.col_offset))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific module of ours that importing ``name`` loads (``a.b.c`` -> ``a.b``
    when ``c`` is an attribute, not a module); None when it is not ours."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _package_of(module: str, path: Path) -> str:
    """The package a relative import in ``module`` starts from (the module itself for an
    ``__init__.py``)."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _targets(
    node: ast.Import | ast.ImportFrom | ast.Call, module: str, path: Path, modules: dict
) -> list[str]:
    """The modules of ours that one import statement loads (resolving relative imports)."""
    if isinstance(node, ast.Call):
        named = [_literal_import_call(node) or ""]
    elif isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = _package_of(module, path)
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = ".".join(part for part in (package, base) if part)
        # ``from p import x``: x is either the submodule p.x or a name defined in p.
        named = [f"{base}.{alias.name}" for alias in node.names]
        named = [name if name in modules else base for name in named]
    targets = []
    for name in named:
        target = _known(name, modules)
        if target is not None and target not in targets:
            targets.append(target)
    return targets


def build_graph(root: Path, packages: tuple[str, ...] = OURS) -> tuple[dict[str, Path], list]:
    """The modules under ``root``'s packages and every import edge between them."""
    modules = discover(root, packages)
    edges: list[Edge] = []
    for module, path in modules.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        relative = path.relative_to(root).as_posix()
        for node in _import_nodes(tree):
            text = ast.get_source_segment(source, node) or ast.dump(node)
            text = " ".join(text.split())
            if len(text) > 100:
                text = text[:97] + "..."
            for target in _targets(node, module, path, modules):
                if target != module:
                    edges.append(Edge(module, target, relative, node.lineno, text))
    return modules, edges


def layering_violations(edges: list[Edge]) -> list[str]:
    """One line per import that breaks a package rule, naming the file, line and import."""
    problems = []
    for edge in edges:
        source_top, target_top = folder_of(edge.source), folder_of(edge.target)
        if source_top == target_top:
            continue
        if target_top == "scripts":
            problems.append(f"{edge.where()}  ({source_top} imports scripts; nothing may)")
        elif source_top in ALLOWED and target_top not in ALLOWED[source_top]:
            allowed = ", ".join(sorted(ALLOWED[source_top])) or "no package of ours"
            problems.append(
                f"{edge.where()}  ({source_top} imports {target_top}; it may import {allowed})"
            )
    return problems


def old_name_imports(root: Path, folders: tuple[str, ...]) -> list[str]:
    """One line per import, in every ``.py`` file under ``folders``, of a module by its old
    top-level name (``import sparse``, ``from runtime import loop``, ``import_module("envs")``)
    instead of ``imagine_rl.<folder>``."""
    problems = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source, filename=str(path))
            for node in _import_nodes(tree):
                if isinstance(node, ast.Call):
                    named = [_literal_import_call(node) or ""]
                elif isinstance(node, ast.Import):
                    named = [alias.name for alias in node.names]
                elif node.level == 0:
                    named = [node.module or ""]
                else:  # relative: resolved under the package it is in
                    continue
                for name in named:
                    top = name.split(".")[0]
                    if top in OURS:
                        text = " ".join((ast.get_source_segment(source, node) or "").split())
                        where = f"{path.relative_to(root).as_posix()}:{node.lineno}: {text}"
                        problems.append(f"{where}  (use {PREFIX}.{name})")
    return problems


def find_cycles(modules: dict[str, Path], edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected group of modules (Tarjan)."""
    graph: dict[str, dict[str, Edge]] = {m: {} for m in modules}
    for edge in edges:
        graph[edge.source].setdefault(edge.target, edge)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles = []
    for group in groups:
        members, start = set(group), group[0]
        # Shortest way back to ``start`` inside the group (breadth first): the cycle to report.
        parents: dict[str, Edge] = {}
        frontier = [start]
        while frontier and start not in parents:
            following = []
            for node in frontier:
                for nxt, edge in sorted(graph[node].items()):
                    if nxt in members and nxt not in parents:
                        parents[nxt] = edge
                        following.append(nxt)
            frontier = following
        cycle, node = [], start
        while True:
            edge = parents[node]
            cycle.append(edge)
            node = edge.source
            if node == start:
                break
        cycles.append(cycle[::-1])
    return cycles


def describe_cycle(cycle: list[Edge]) -> str:
    chain = " -> ".join([cycle[0].source, *(edge.target for edge in cycle)])
    steps = "; ".join(edge.where() for edge in cycle)
    return f"import cycle {chain}  ({steps})"


# ---------------------------------------------------------------------------- the checker itself


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    _write(
        tmp_path,
        {
            "runtime/__init__.py": "",
            "runtime/a.py": "from imagine_rl.runtime.b import thing\n",
            "runtime/b.py": "def late():\n    from imagine_rl.runtime import a\n    return a\n",
        },
    )
    modules, edges = build_graph(tmp_path, ("runtime",))
    cycles = find_cycles(modules, edges)
    assert len(cycles) == 1
    message = describe_cycle(cycles[0])
    assert "imagine_rl.runtime.a -> imagine_rl.runtime.b -> imagine_rl.runtime.a" in message
    assert "runtime/b.py:2: from imagine_rl.runtime import a" in message


def test_checker_resolves_relative_imports_and_skips_type_checking(tmp_path):
    _write(
        tmp_path,
        {
            "sparse/__init__.py": "from . import masks\nfrom .kernels import run\n",
            "sparse/masks.py": "import imagine_rl.sparse.kernels\n",
            "sparse/kernels.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from imagine_rl.agents.base import Agent\n"
                "else:\n"
                "    import importlib\n"
                "    importlib.import_module('imagine_rl.envs.make')\n"
                "def run():\n"
                "    from imagine_rl.worldmodels import rssm\n"
            ),
            "sparse/sub/__init__.py": "from .. import masks\n",
            "agents/__init__.py": "",
            "agents/base.py": "import imagine_rl.scripts.train\n",
            "envs/__init__.py": "",
            "envs/make.py": "",
            "worldmodels/__init__.py": "",
            "worldmodels/rssm.py": "from imagine_rl.sparse import masks\n",
            "scripts/train.py": "",
        },
    )
    modules, edges = build_graph(tmp_path)
    pairs = {
        (e.source.removeprefix("imagine_rl."), e.target.removeprefix("imagine_rl.")) for e in edges
    }
    assert {
        ("sparse", "sparse.masks"),
        ("sparse", "sparse.kernels"),
        ("sparse.masks", "sparse.kernels"),
        ("sparse.kernels", "envs.make"),
        ("sparse.kernels", "worldmodels.rssm"),
        ("sparse.sub", "sparse.masks"),
        ("worldmodels.rssm", "sparse.masks"),
        ("agents.base", "scripts.train"),
    } == pairs
    problems = "\n".join(layering_violations(edges))
    assert "sparse/kernels.py:6: importlib.import_module('imagine_rl.envs.make')" in problems
    assert "sparse/kernels.py:8: from imagine_rl.worldmodels import rssm" in problems
    assert "agents/base.py:1: import imagine_rl.scripts.train  (agents imports scripts" in problems
    assert "worldmodels/rssm.py" not in problems  # worldmodels may import sparse
    assert "agents.base import Agent" not in problems  # under TYPE_CHECKING
    assert describe_cycle(find_cycles(modules, edges)[0]).startswith(
        "import cycle imagine_rl.sparse.kernels -> imagine_rl.worldmodels.rssm -> "
        "imagine_rl.sparse.masks -> imagine_rl.sparse.kernels"
    )
    assert not old_name_imports(tmp_path, OURS)


def test_checker_finds_imports_by_the_old_top_level_names(tmp_path):
    _write(
        tmp_path,
        {
            "agents/__init__.py": "from . import base\n",
            "agents/base.py": "import sparse\nfrom imagine_rl import envs\n",
            "tests/test_x.py": (
                "import importlib\n"
                "def test():\n"
                "    from runtime.config import build_config\n"
                "    import agents.op3 as op3\n"
                "    importlib.import_module('scripts.train')\n"
                "    from imagine_rl.runtime import loop\n"
            ),
        },
    )
    problems = old_name_imports(tmp_path, ("agents", "tests"))
    assert problems == [
        "agents/base.py:1: import sparse  (use imagine_rl.sparse)",
        "tests/test_x.py:3: from runtime.config import build_config  (use imagine_rl.runtime.config)",
        "tests/test_x.py:4: import agents.op3 as op3  (use imagine_rl.agents.op3)",
        "tests/test_x.py:5: importlib.import_module('scripts.train')  (use imagine_rl.scripts.train)",
    ]


# ---------------------------------------------------------------------------- this repository


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Edge]]:
    return build_graph(ROOT)


def test_the_graph_covers_the_repository(graph):
    modules, edges = graph
    assert len(modules) > 50, sorted(modules)
    assert len(edges) > 100, len(edges)
    for package in OURS:
        assert any(folder_of(m) == package for m in modules), f"no module found in {package}/"
    assert all(m.startswith(f"{PREFIX}.") for m in modules)


def test_packages_import_one_way(graph):
    _, edges = graph
    problems = layering_violations(edges)
    assert not problems, "imports against the package rules:\n" + "\n".join(problems)


def test_nothing_imports_the_old_top_level_names():
    problems = old_name_imports(ROOT, OURS + OTHER_SOURCES)
    assert not problems, "imports by an old top-level name:\n" + "\n".join(problems)


def test_no_import_cycles(graph):
    modules, edges = graph
    cycles = [describe_cycle(cycle) for cycle in find_cycles(modules, edges)]
    assert not cycles, "break these cycles:\n" + "\n".join(cycles)


def test_every_package_module_imports(graph):
    """Import every module of the packages for real: a broken import fails here, not in a run."""
    modules, _ = graph
    failures = []
    for name in sorted(m for m in modules if folder_of(m) in IMPORTABLE):
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - collect every failure, report them all
            failures.append(f"{name}: {type(error).__name__}: {error}")
    assert not failures, "modules that fail to import:\n" + "\n".join(failures)
