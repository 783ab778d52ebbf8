"""Factories the training loop and the scripts build from a config (env and replay).

The agent factory is not here: ``runtime`` never imports ``agents``; scripts pass it in.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym

from runtime import distributed
from runtime.config import Config
from runtime.replay import SequenceReplay


def make_env_factory(config: Config, video: bool | None = None):
    """``(mode, num_envs, seed) -> VectorEnv`` for ``mode`` in {"train", "eval"}.

    Eval envs of state-only tasks render frames (``render_mode="rgb_array"``) for videos.
    ``env.intervention`` applies to the training envs only; eval envs run the original task.
    """
    import envs

    cfg = config.env
    want_video = config.run.video if video is None else video

    def make(mode: str, num_envs: int, seed: int) -> gym.vector.VectorEnv:
        render = mode == "eval" and want_video and cfg.obs == "state"
        return envs.make_vector_env(
            cfg.id,
            num_envs,
            asynchronous=cfg.asynchronous,
            seed=seed,
            obs=cfg.obs,
            size=cfg.size,
            action_repeat=cfg.action_repeat,
            time_limit=cfg.time_limit,
            render_mode="rgb_array" if render else None,
            render_quality=cfg.render_quality,
            camera=cfg.camera,
            distractors=cfg.distractors,
            goal_obs=cfg.goal_obs,
            blocks_action=cfg.blocks_action,
            # Training envs only: each counts its own steps (envs.interventions).
            intervention=cfg.intervention if mode == "train" else None,
        )

    return make


def make_replay_factory(config: Config, run_dir: str | Path | None):
    """``() -> SequenceReplay``; full chunks persist under ``<run_dir>/replay`` when saving.

    Under ``torchrun`` each rank builds its own shard, sampled with its own seed; only rank 0's
    goes into checkpoints (and to disk), the others live in memory.
    """

    def make() -> SequenceReplay:
        ctx = distributed.context()
        saving = run_dir is not None and config.replay.save and ctx.is_main
        directory = Path(run_dir) / "replay" if saving else None
        seed = distributed.rank_seed(config.seed, ctx.rank)
        return SequenceReplay.from_config(config.replay, seed=seed, directory=directory)

    return make
