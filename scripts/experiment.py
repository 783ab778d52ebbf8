"""Experiments: ``imagine-rl experiment run|status|report <file> [workers=N]``.

``run`` starts every (variant, seed) of the experiment file that is not yet recorded under
``results/<name>/runs/`` (resuming stopped ones), in parallel worker processes; ``status``
lists each run's state; ``report`` writes ``results/<name>/summary.json`` and ``curves.png``
and prints the summary table. See ``runtime/experiment.py`` for the file format.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_SILENT", "true")

USAGE = "usage: imagine-rl experiment run|status|report <experiment.yaml> [workers=N]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\n" + USAGE)
        return 0 if argv else 2
    if len(argv) < 2 or argv[0] not in ("run", "status", "report"):
        print(f"error: {USAGE}", file=sys.stderr)
        return 2
    action, path, rest = argv[0], argv[1], argv[2:]
    workers = None
    for arg in rest:
        key, _, value = arg.partition("=")
        if key != "workers" or not value.isdigit() or int(value) < 1:
            print(f"error: unknown argument {arg!r}; the only option is workers=N", file=sys.stderr)
            return 2
        workers = int(value)

    from imagine_rl import agents  # noqa: F401 (registers the built-in agents)
    from imagine_rl.runtime import experiment as harness

    try:
        experiment = harness.load_experiment(path)
        if action == "status":
            print("\n".join(harness.status_lines(experiment)))
            return 0
        if action == "run":
            failed = harness.run_experiment(experiment, workers=workers)
            return 1 if failed else 0
        summary_path, png = harness.report(experiment)
    except harness.ExperimentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import json

    summary = json.loads(summary_path.read_text())
    print("\n".join(harness.summary_table(summary)))
    print(f"wrote {summary_path} and {png}")
    return 0


if __name__ == "__main__":
    from imagine_rl.runtime.config import run_script

    sys.exit(run_script(main, sys.argv[1:]))
