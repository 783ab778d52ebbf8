"""Evaluate a checkpoint: ``python scripts/evaluate.py checkpoint=<dir> episodes=10 video=true json=out.json``.

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
    from runtime.checkpoint import CheckpointError, load_checkpoint
    from runtime.config import ConfigError, build_config, parse_script_args

    try:
        args = parse_script_args(argv, DEFAULTS, doc=__doc__)
        if args["checkpoint"] is None:
            raise ConfigError("missing checkpoint=<checkpoint dir or run dir>")
        for key in ("episodes", "num_envs"):
            if args[key] < 1:
                raise ConfigError(f"{key} must be >= 1, got {args[key]}")
        episodes, num_envs, seed = args["episodes"], args["num_envs"], args["seed"]
        video, ari_frames = args["video"], args["ari_frames"]
        loaded = load_checkpoint(Path(str(args["checkpoint"])))
        overrides = {"env.eval_num_envs": num_envs, "run.video": video}
        if args["accelerator"] is not None:
            overrides["accelerator"] = args["accelerator"]
        config = build_config(overrides, base=loaded.config)
    except (ConfigError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import numpy as np

    import agents
    from runtime.accelerator import configure_threads, seed_everything
    from runtime.factories import make_env_factory
    from runtime.logging import write_video
    from runtime.loop import SuccessCounter, evaluate_policy

    configure_threads(config.accelerator)
    seed_everything(seed)
    try:
        env = make_env_factory(config, video=video)("eval", num_envs, seed)
    except ValueError as error:  # a setting the env build rejects (task, camera, size)
        print(f"error: env '{config.env.id}' cannot be built: {error}", file=sys.stderr)
        return 2

    def refuse(error: Exception) -> int:
        env.close()
        print(
            f"error: checkpoint {loaded.path}: agent={config.agent.name} cannot be rebuilt "
            f"for it: {str(error).splitlines()[0]}",
            file=sys.stderr,
        )
        return 2

    try:
        # Sizes or spaces the model cannot be built with (the models raise ValueError or
        # TypeError naming them); anything else is a bug and keeps its traceback.
        agent = agents.make_agent(config, env.single_observation_space, env.single_action_space)
    except (ValueError, TypeError) as error:
        return refuse(error)
    try:
        agent.load_state_dict(loaded.agent_state)
    except (ValueError, RuntimeError) as error:  # weights that do not fit (names the tensors)
        return refuse(error)
    successes = SuccessCounter()
    segment = getattr(agent, "segment", None)
    seg_pixels: list[np.ndarray] = []
    seg_masks: list[np.ndarray] = []

    def on_step(obs, info, ended) -> None:
        successes(obs, info, ended)
        if segment is None or "masks" not in info or "pixels" not in obs:
            return
        if sum(len(p) for p in seg_pixels) < ari_frames:
            present = info.get("_masks", np.ones(len(ended), dtype=bool))
            seg_pixels.append(obs["pixels"][present])
            seg_masks.append(info["masks"][present])

    returns, lengths, frames = evaluate_policy(
        agent, env, episodes, seed, record_video=video, on_step=on_step
    )
    env.close()

    result = {
        "env": config.env.id,
        "agent": config.agent.name,
        "step": loaded.step,
        "episodes": len(returns),
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),
        "returns": returns,
        "lengths": lengths,
        "checkpoint": str(loaded.path),
    }
    if successes.outcomes:
        result["success_rate"] = successes.rate
    if seg_pixels and ari_frames > 0:
        from worldmodels.segmentation import foreground_ari

        pixels = np.concatenate(seg_pixels)[:ari_frames]
        truth = np.concatenate(seg_masks)[:ari_frames]
        result["ari"] = foreground_ari(truth, segment(pixels).argmax(1))
        result["ari_frames"] = len(pixels)
    if video and frames is not None:
        run_dir = loaded.path.parent.parent
        default = run_dir / "videos" / f"evaluate_step_{loaded.step}.mp4"
        path = write_video(args["video_path"] or default, frames, config.logging.video_fps)
        result["video"] = str(path)
        print(f"video: {path}")
    extra = "".join(
        f", {key} {result[key]:.3f}" for key in ("success_rate", "ari") if key in result
    )
    print(
        f"{config.env.id} {config.agent.name} step {loaded.step}: return "
        f"{result['return_mean']:.1f} +- {result['return_std']:.1f} over {len(returns)} episodes"
        f"{extra}"
    )
    if args["json"] is not None:
        out = Path(str(args["json"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"json: {out}")
    return 0


if __name__ == "__main__":
    from runtime.config import run_script

    sys.exit(run_script(main, sys.argv[1:]))
