"""Evaluate a checkpoint: ``imagine-rl evaluate checkpoint=<dir> episodes=10 video=true json=out.json``.

``checkpoint`` is a checkpoint directory (``<run>/checkpoints/step_<N>``) or a run directory
(its latest checkpoint). The agent and its env are rebuilt from the checkpoint's config and run
greedily (the policy's mode). Prints mean/std return; ``json=`` writes
``{"env", "agent", "step", "episodes", "return_mean", "return_std", "returns"}`` (plus
``lengths`` and ``video``); ``video=true`` writes an mp4 of the first episode (``video_path=``
to choose where; default ``<run>/videos/evaluate_step_<N>.mp4``).

Envs that report ``info["is_success"]`` (``blocks:``) add ``success_rate``: the fraction of
episodes that ended in success. Agents that segment frames (``agent.segment``, e.g. ``op3``)
on envs with ground-truth ``info["masks"]`` add ``ari``: the foreground adjusted Rand index of
the slot masks (argmax over slots) against the true object masks, over the first
``ari_frames`` evaluated frames (default 256), and ``ari_frames``.

Other keys: ``seed=`` (default 12345), ``num_envs=`` (default 1), ``accelerator=`` (default: the
checkpoint's); see ``DEFAULTS``. An unknown key or a value of the wrong type is a one-line error.
The evaluation itself is ``runtime.run.evaluate``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

DEFAULTS: dict[str, Any] = {
    "checkpoint": None,  # required
    "episodes": 10,
    "video": False,
    "json": None,
    "video_path": None,  # default <run>/videos/evaluate_step_<N>.mp4
    "seed": 12345,
    "num_envs": 1,
    "accelerator": None,  # default: the checkpoint's
    "ari_frames": 256,
}


def main(argv: list[str]) -> int:
    from imagine_rl.runtime.checkpoint import CheckpointError
    from imagine_rl.runtime.config import ConfigError, parse_script_args

    try:
        args = parse_script_args(argv, DEFAULTS, doc=__doc__)
        if args["checkpoint"] is None:
            raise ConfigError("missing checkpoint=<checkpoint dir or run dir>")
        out = args.pop("json")
        from imagine_rl import agents  # noqa: F401 (the built-in agents, also without an installed entry point)
        from imagine_rl.runtime import run

        result = run.evaluate(**args)
    except (ConfigError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "video" in result:
        print(f"video: {result['video']}")
    extra = "".join(
        f", {key} {result[key]:.3f}" for key in ("success_rate", "ari") if key in result
    )
    print(
        f"{result['env']} {result['agent']} step {result['step']}: return "
        f"{result['return_mean']:.1f} +- {result['return_std']:.1f} over {result['episodes']} "
        f"episodes{extra}"
    )
    if out is not None:
        path = Path(str(out))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"json: {path}")
    return 0


if __name__ == "__main__":
    from imagine_rl.runtime.config import run_script

    sys.exit(run_script(main, sys.argv[1:]))
