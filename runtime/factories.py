"""Factories the training loop and the scripts build from a config (env and replay).

The agent factory is not here: ``runtime`` never imports ``agents``; ``runtime.run`` builds
agents through ``runtime.registry``, other callers of ``runtime.loop.train`` pass their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym

from imagine_rl.runtime import distributed
from imagine_rl.runtime.config import Config, ConfigError
from imagine_rl.runtime.replay import SequenceReplay

ENV_MODES = ("train", "eval")


def _env_settings(config: Config, mode: str, video: bool) -> dict[str, Any]:
    """``envs.make_env`` keyword arguments of a ``mode`` env of ``config.env``.

    The one mapping of ``config.env`` fields to env settings, shared by vector and single envs
    so a field added to ``EnvConfig`` reaches every env the loop and the scripts build. Eval
    envs of state-only tasks render frames (``render_mode="rgb_array"``) when ``video``;
    ``env.intervention`` applies to training envs only, eval envs run the original task.
    """
    if mode not in ENV_MODES:
        raise ValueError(f"env mode must be one of {', '.join(ENV_MODES)}, got {mode!r}")
    cfg = config.env
    render = mode == "eval" and video and cfg.obs == "state"
    return {
        "obs": cfg.obs,
        "size": cfg.size,
        "action_repeat": cfg.action_repeat,
        "time_limit": cfg.time_limit,
        "render_mode": "rgb_array" if render else None,
        "render_quality": cfg.render_quality,
        "camera": cfg.camera,
        "distractors": cfg.distractors,
        "goal_obs": cfg.goal_obs,
        "blocks_action": cfg.blocks_action,
        "terminate_on_success": cfg.terminate_on_success,
        # Training envs only: each counts its own steps (envs.interventions).
        "intervention": cfg.intervention if mode == "train" else None,
    }


def make_env_factory(config: Config, video: bool | None = None, **overrides: Any):
    """``(mode, num_envs, seed) -> VectorEnv`` for ``mode`` in {"train", "eval"}.

    Settings come from ``config.env`` (``_env_settings``; ``video`` defaults to
    ``run.video``). ``overrides`` are ``envs.make_env`` keyword arguments, or
    ``asynchronous``, that a caller deliberately sets otherwise than the config, e.g.
    ``asynchronous=False`` for one throwaway env: the difference stays visible at the call.
    """
    from imagine_rl import envs

    want_video = config.run.video if video is None else video

    def make(mode: str, num_envs: int, seed: int) -> gym.vector.VectorEnv:
        settings = {
            "asynchronous": config.env.asynchronous,
            **_env_settings(config, mode, want_video),
            **overrides,
        }
        with _env_setting_errors(config):
            return envs.make_vector_env(config.env.id, num_envs, seed=seed, **settings)

    return make


@contextlib.contextmanager
def _env_setting_errors(config: Config) -> Iterator[None]:
    """An env build that rejects a setting (``ValueError``: unknown task, camera, size,
    intervention target) becomes a one-line ``ConfigError`` naming the env; any other exception
    is a bug and keeps its traceback."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(
            f"env '{config.env.id}' cannot be built with these env.* settings: "
            f"{str(error).splitlines()[0]}"
        ) from error


def make_single_env(
    config: Config, mode: str = "train", seed: int | None = None, **overrides: Any
) -> gym.Env:
    """One plain gymnasium env of ``config.env``, without the vector wrapper.

    For scripts that step envs one at a time or reach into ``env.unwrapped`` (simulator
    state, dm-control specs). The same settings as ``make_env_factory``'s ``mode`` envs (no
    video frames); ``overrides`` are ``envs.make_env`` keyword arguments a caller deliberately
    sets otherwise than the config.
    """
    from imagine_rl import envs

    settings = {**_env_settings(config, mode, video=False), **overrides}
    with _env_setting_errors(config):
        return envs.make_env(config.env.id, seed=seed, **settings)


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
