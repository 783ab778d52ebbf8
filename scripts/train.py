"""Train an agent: ``imagine-rl train [key=value ...]`` (or ``python scripts/train.py ...``).

Examples::

    imagine-rl train                                         # the default short run
    imagine-rl train env=dmc:walker-walk preset=xs run.steps=5000 run.dir=runs/x
    imagine-rl train resume=runs/x                           # continue where it stopped
    imagine-rl train resume=runs/x run.steps=20000           # ...and train longer
    imagine-rl train resume=runs/x resume.replay=fresh       # ...with an empty replay
    imagine-rl train agent=<name> init=runs/pre run.dir=runs/z
                                                             # a new run from runs/pre's weights
    imagine-rl train preset=<staged> run.dir=runs/s          # a preset with run.stages: its
                                                             # stages, one after another
    torchrun --standalone --nproc_per_node=2 --no-python imagine-rl train preset=debug
                                                             # data parallel, 2 processes

Writes ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_<N>/``, ``videos/`` and wandb
files (offline by default) under ``run.dir``. SIGINT/SIGTERM save a checkpoint before exit.

A config with ``run.stages`` (a preset may set it) runs each stage preset as a whole run of its
own: the command's presets with the stage's appended, then the command line; stage i starts
from stage i-1's weights (``init=``). Every stage but the last writes ``<run.dir>/<stage>/``,
the last writes ``run.dir``. Re-running the same command skips the finished stages and
resumes a stopped one. (The policy lives in ``runtime.run``; this command parses arguments.)

``--help`` lists the config sections, ``--help <section>`` that section's keys.
"""

from __future__ import annotations

import os
import sys

# Rendering backend before anything imports mujoco; harmless when already set.
os.environ.setdefault("MUJOCO_GL", "egl")
# wandb's own console capture and prompts would block a headless run.
os.environ.setdefault("WANDB_SILENT", "true")


def main(argv: list[str]) -> int:
    from imagine_rl import agents  # noqa: F401 (the built-in agents, also without an installed entry point)
    from imagine_rl.runtime import run
    from imagine_rl.runtime.config import ConfigError, describe

    flags = [i for i, arg in enumerate(argv) if arg in ("-h", "--help")]
    if flags:
        # The sections, or one section's keys with type, default and doc (from the config
        # classes themselves; agents' sections included): `--help [section]`, anywhere.
        after = argv[flags[0] + 1 : flags[0] + 2]
        section = after[0] if after and "=" not in after[0] else None
        try:
            print(__doc__ if section is None else "")
            print(describe(section))
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    return run.train(argv).status


if __name__ == "__main__":
    from imagine_rl.runtime.config import run_script

    sys.exit(run_script(main, sys.argv[1:]))
