"""``imagine-rl <command> [key=value ...]``: the installed command (``pyproject.toml``).

Each command runs the ``main(argv)`` of its script with exactly that script's arguments, so
``imagine-rl train preset=debug`` is ``python scripts/train.py preset=debug``.

The other benchmarks and the research checks are development tools, not commands: they live in
``scripts/dev`` (not installed) and run from a checkout, ``python scripts/dev/<tool>.py``.
"""

from __future__ import annotations

import difflib
import importlib
import sys

# command -> (module, one-line description)
COMMANDS = {
    "train": (
        "imagine_rl.scripts.train",
        "train an agent (resume=, init=; --help [section] lists keys)",
    ),
    "evaluate": (
        "imagine_rl.scripts.evaluate",
        "evaluate a checkpoint: returns, videos, success, ARI",
    ),
    "plot": ("imagine_rl.scripts.plot", "plot metrics.jsonl curves of runs, with reference curves"),
    "experiment": (
        "imagine_rl.scripts.experiment",
        "run|status|report an experiment file (seeds x variants)",
    ),
    "bench": (
        "imagine_rl.scripts.bench_train_step",
        "time the training step on this machine (json=)",
    ),
}


def usage() -> str:
    rows = ["usage: imagine-rl <command> [key=value ...]", "", "commands:"]
    rows += [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
    rows.append("")
    rows.append("`imagine-rl <command> --help` shows a command's own help.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        print(
            f"error: unknown command '{command}': {hint}commands: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    from imagine_rl.runtime.config import run_script

    module = importlib.import_module(COMMANDS[command][0])
    return run_script(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
