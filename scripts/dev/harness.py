"""The argument and JSON harness shared by the development tools in ``scripts/dev``.

``scripts/dev`` holds the benchmarks and research checks that are not part of the installed
package (it has no ``__init__.py``, so ``pip install`` leaves it out): run them from a checkout,
``python scripts/dev/<tool>.py [key=value ...]``. Each tool declares its keys with their
defaults and uses this module for the rest:

- ``parse(argv, DEFAULTS, __doc__)``: ``key=value`` arguments typed like their defaults (the
  grammar of ``imagine-rl train``), unknown keys refused in one line with a close match;
- ``parse_with_rest(...)``: the same for the tool's own keys, the other arguments (config
  overrides for ``build_config``, or another program's arguments) handed back untouched;
- ``-h``/``--help`` (anywhere in ``argv``): the tool's docstring and its keys with their
  defaults, exit status 0;
- ``write_json(path, result)``: writes the result (parent folders made) and prints its path;
- ``error(message)``: the one-line ``error: ...`` on stderr and exit status 2;
- ``run(main)``: the ``if __name__ == "__main__"`` entry (a ``ConfigError`` escaping ``main``
  is one line, exit status 2).
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _config():
    """``imagine_rl.runtime.config``; from the checkout when the package is not installed
    (e.g. the SheepRL benchmark runs in SheepRL's own virtual environment)."""
    try:
        from imagine_rl.runtime import config
    except ModuleNotFoundError as error:
        if error.name != "imagine_rl":
            raise
        # The checkout's folders are imagine_rl's subpackages (pyproject.toml's package-dir:
        # imagine_rl.runtime is runtime/), so a namespace imagine_rl whose path is the
        # checkout finds them.
        package = types.ModuleType("imagine_rl")
        package.__path__ = [str(ROOT)]
        sys.modules["imagine_rl"] = package
        from imagine_rl.runtime import config
    return config


def _help(argv: list[str], defaults: dict[str, Any], doc: str | None) -> None:
    if any(arg in ("-h", "--help") for arg in argv):
        _config().parse_script_args(["--help"], defaults, doc=doc)  # prints, exits 0


def parse(
    argv: list[str],
    defaults: dict[str, Any],
    doc: str | None,
    aliases: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every argument is one of ``defaults`` (or an alias of one), typed like its default.
    Raises ``runtime.config.ConfigError`` on a bad key or value."""
    _help(argv, defaults, doc)
    return _config().parse_script_args(argv, defaults, aliases)


def parse_with_rest(
    argv: list[str],
    defaults: dict[str, Any],
    doc: str | None,
    ours: Callable[[str], bool] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """(the tool's options, the other arguments in their order). An argument is the tool's when
    ``ours(key)`` says so; by default when its key (less a leading ``+``) is one of
    ``defaults``. Everything after a ``--`` is the rest, whatever its keys."""
    if "--" in argv:
        split = argv.index("--")
        head, tail = argv[:split], argv[split + 1 :]
    else:
        head, tail = argv, []
    _help(head, defaults, doc)
    if ours is None:

        def ours(key: str) -> bool:
            return key in defaults

    own = [a for a in head if ours(a.split("=", 1)[0].lstrip("+"))]
    rest = [a for a in head if a not in own]
    return _config().parse_script_args(own, defaults), rest + tail


def write_json(path: str | Path, result: Any, quiet: bool = False) -> Path:
    """Write ``result`` as JSON (indent 2, final newline) to ``path``, making its folder;
    print ``json: <path>`` unless ``quiet`` (a tool that rewrites it as rows arrive)."""
    path = Path(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if not quiet:
        print(f"json: {path}", flush=True)
    return path


def error(message: Any) -> int:
    """Print ``error: <message>`` on stderr; the exit status of a refused argument, 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def run(main: Callable[[list[str]], Any]) -> None:
    """Run ``main(sys.argv[1:])`` as a command and exit with its status."""
    sys.exit(_config().run_script(main, sys.argv[1:]))
