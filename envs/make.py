"""``make_env`` / ``make_vector_env``: one entry point for gymnasium, dm-control and blocks tasks."""

from __future__ import annotations

import functools
import multiprocessing
from typing import Any

import gymnasium as gym
import numpy as np

from imagine_rl.envs.blocks import BLOCKS_ACTIONS, DEFAULT_TIME_LIMITS, BlocksEnv, parse_blocks_name
from imagine_rl.envs.dmc import DMCEnv
from imagine_rl.envs.registry import parse_env_id, split_dmc_name
from imagine_rl.envs.rendering import RENDER_QUALITIES
from imagine_rl.envs.wrappers import (
    ActionRepeat,
    DictObservation,
    GoalObservation,
    PhysicsErrorGuard,
    SeedOnFirstReset,
    SquareRender,
)

OBS_MODES: tuple[str, ...] = ("state", "pixels", "both")


def _check_args(
    obs: str,
    size: int,
    action_repeat: int,
    time_limit: int | None,
    render_mode: str | None,
    render_quality: str,
) -> None:
    if obs not in OBS_MODES:
        raise ValueError(f"obs must be one of {OBS_MODES}, got {obs!r}")
    if not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not isinstance(action_repeat, (int, np.integer)) or action_repeat < 1:
        raise ValueError(f"action_repeat must be an int >= 1, got {action_repeat!r}")
    if time_limit is not None and (not isinstance(time_limit, (int, np.integer)) or time_limit < 1):
        raise ValueError(f"time_limit must be None or an int >= 1, got {time_limit!r}")
    if render_mode not in (None, "rgb_array"):
        raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
    if render_quality not in RENDER_QUALITIES:
        raise ValueError(
            f"render_quality must be one of {RENDER_QUALITIES}, got {render_quality!r}"
        )


def _is_gym_mujoco(name: str) -> bool:
    entry = gym.spec(name).entry_point
    return isinstance(entry, str) and entry.startswith("gymnasium.envs.mujoco")


def make_env(
    env_id: str,
    *,
    obs: str = "state",
    size: int = 64,
    action_repeat: int = 1,
    time_limit: int | None = None,
    seed: int | None = None,
    render_mode: str | None = None,
    render_quality: str = "fast",
    camera: int | str | None = None,
    distractors: bool = False,
    goal_obs: bool = False,
    blocks_action: str = "pick_place",
    terminate_on_success: bool = False,
    intervention: str | None = None,
) -> gym.Env:
    """Build a ``gym:``, ``dmc:<domain>-<task>`` or ``blocks:`` env with a Dict observation.

    Args:
        obs: ``"state"``, ``"pixels"`` or ``"both"``: which Dict keys to expose.
        size: side of pixel observations and of ``render()`` frames.
        action_repeat: each ``step`` repeats the action this many underlying steps, summing
            rewards and stopping early at episode end.
        time_limit: episode length in *underlying* env steps (frames, i.e. before action
            repeat), reached -> ``truncated``. ``None`` keeps the suite default (gym's
            registered ``max_episode_steps``; dm-control's task limit, 1000 steps for most;
            blocks: 10 pick-and-place actions or 100 pusher steps).
        seed: used by the first ``reset()`` that gets no seed, and for the action space.
        render_mode: ``None`` or ``"rgb_array"`` (``render()`` -> uint8 (size, size, 3)).
        render_quality: ``"fast"`` (no shadows/reflections/MSAA) or ``"default"`` (MuJoCo's).
        camera: MuJoCo camera id or name (dmc default 0, quadruped 2; gym MuJoCo default is the
            env's own); not supported for non-MuJoCo gym envs.
        distractors: ``dmc:`` tasks only: a random video (moving shapes over drifting colour
            waves, ``envs.distractors``) replaces the skybox and floor in every frame.
        goal_obs: ``blocks:`` tasks only: add observation key ``goal``, the episode's goal
            image (uint8 ``3 x size x size``).
        blocks_action: ``blocks:`` tasks only: ``"pick_place"`` (4-d action) or ``"pusher"``
            (2-d planar velocity); ignored for other suites unless not the default.
        terminate_on_success: ``blocks:`` tasks only: the episode terminates on the step that
            reaches success (every block within tolerance of its goal).
        intervention: MuJoCo tasks only: change a model parameter at a chosen env step of
            this env, e.g. ``"body_mass:pole_1*2@step=20000"`` (grammar, step counting and
            logging in ``envs.interventions``; ``info["intervention"]`` on that step).

    ``blocks:`` envs return ``info`` with ``goal_pixels``, ``goal_positions``,
    ``block_positions``, ``masks`` and ``is_success`` on every reset and step (see
    ``envs.blocks.BlocksEnv``); ``env.unwrapped`` has the oracle ``get_sim_state`` /
    ``set_sim_state``.

    Box actions are rescaled to [-1, 1]; Discrete actions stay Discrete. A MuJoCo divergence
    ends the episode with ``truncated=True`` and ``info["physics_error"]=True``.

    Shapes:
        obs["state"]: float32 (state_dim,); obs["pixels"], obs["goal"]: uint8 (3, size, size)

    Raises:
        UnknownEnvError: (a ``ValueError``) bad prefix or unknown id, with close matches.
        ValueError: a bad argument, named in the message.
    """
    _check_args(obs, size, action_repeat, time_limit, render_mode, render_quality)
    suite, name = parse_env_id(env_id)
    if distractors and suite != "dmc":
        raise ValueError(f"distractors need a dmc:<domain>-<task> env, got {env_id!r}")
    if suite != "blocks" and (goal_obs or blocks_action != "pick_place" or terminate_on_success):
        raise ValueError(
            f"goal_obs, blocks_action and terminate_on_success apply to blocks:<push|stack>-<n> "
            f"envs only, got {env_id!r}; leave goal_obs=False, blocks_action='pick_place' and "
            "terminate_on_success=False for it"
        )
    if blocks_action not in BLOCKS_ACTIONS:
        raise ValueError(f"blocks_action must be one of {BLOCKS_ACTIONS}, got {blocks_action!r}")
    inner_render = "rgb_array" if (obs != "state" or render_mode == "rgb_array") else None

    env: gym.Env
    if suite == "blocks":
        task, num_blocks = parse_blocks_name(name)  # type: ignore[misc]  # validated above
        env = BlocksEnv(
            task,
            num_blocks,
            action_mode=blocks_action,
            size=size,
            camera=camera,
            render_quality=render_quality,
            render_mode=inner_render,
            terminate_on_success=terminate_on_success,
        )
        env = PhysicsErrorGuard(env)
        limit = DEFAULT_TIME_LIMITS[blocks_action] if time_limit is None else int(time_limit)
        env = gym.wrappers.TimeLimit(env, max_episode_steps=limit)
    elif suite == "dmc":
        domain, task = split_dmc_name(name)
        env = DMCEnv(
            domain,
            task,
            seed=seed,
            render_mode=inner_render,
            size=size,
            camera=camera,
            render_quality=render_quality,
            suite_time_limit=time_limit is None,
            distractors=distractors,
        )
        env = PhysicsErrorGuard(env)
        if time_limit is not None:
            env = gym.wrappers.TimeLimit(env, max_episode_steps=int(time_limit))
    else:
        kwargs: dict[str, Any] = {"render_mode": inner_render}
        if time_limit is not None:
            kwargs["max_episode_steps"] = int(time_limit)
        mujoco_env = _is_gym_mujoco(name)
        if mujoco_env:
            kwargs.update(width=size, height=size)
            if camera is not None:
                kwargs["camera_name" if isinstance(camera, str) else "camera_id"] = camera
        elif camera is not None:
            raise ValueError(f"camera is only supported for MuJoCo envs, not {env_id!r}")
        env = gym.make(name, **kwargs)
        if mujoco_env and render_quality == "fast":
            from imagine_rl.envs.rendering import configure_model

            configure_model(env.unwrapped.model, size, "fast")
        env = PhysicsErrorGuard(env)
    if inner_render is not None:
        env = SquareRender(env, size, render_quality)
    if action_repeat > 1:
        env = ActionRepeat(env, int(action_repeat))
    if intervention is not None:
        from imagine_rl.envs.interventions import Interventions

        # Counts env steps (frames) as the training loop does: action_repeat per agent step.
        env = Interventions(env, intervention, frames_per_step=int(action_repeat))
    env = DictObservation(env, obs, size)
    if goal_obs:
        env = GoalObservation(env, size)
    space = env.action_space
    if (
        isinstance(space, gym.spaces.Box)
        and np.all(np.isfinite(space.low))
        and np.all(np.isfinite(space.high))
        and not (np.all(space.low == -1) and np.all(space.high == 1))
    ):
        # Bounds in the space's dtype: python floats would be float64 and trigger gymnasium's
        # "precision lowered" warning for float32 spaces.
        low = np.full(space.shape, -1, dtype=space.dtype)
        env = gym.wrappers.RescaleAction(env, low, -low)
    if seed is not None:
        env = SeedOnFirstReset(env, int(seed))
    return env


def _async_context() -> str:
    # Never "fork": a child would inherit the parent's EGL/GL state, which is not fork-safe.
    # forkserver forks children from a clean server process (cheaper than spawn per env).
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def make_vector_env(
    env_id: str,
    num_envs: int,
    *,
    asynchronous: bool = False,
    seed: int | None = None,
    context: str | None = None,
    **kwargs: Any,
) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``make_env(env_id, **kwargs)`` in a gymnasium vector env.

    Autoreset mode is ``gymnasium.vector.AutoresetMode.NEXT_STEP``: the step on which a sub-env
    ends returns its *final* observation with ``terminated``/``truncated`` set; the *next*
    ``step`` ignores that env's action, resets it and returns the reset observation with
    reward 0 and terminated=truncated=False. A training loop therefore sees every final
    observation and marks the one after a done as ``is_first``.

    Seeds: env i uses ``seed + i`` (see ``make_env``'s ``seed``). ``asynchronous=True`` runs
    each env in a subprocess started with ``context`` (default ``"forkserver"`` where
    available, else ``"spawn"``; never ``"fork"``, which is unsafe with EGL contexts), so
    scripts must guard their entry point with ``if __name__ == "__main__":``.

    Shapes:
        obs["state"]: float32 (num_envs, state_dim); obs["pixels"]: uint8 (num_envs, 3, H, W)
    """
    if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    # Validate eagerly so a typo fails here, not inside num_envs subprocesses.
    parse_env_id(env_id)
    fns = [
        functools.partial(make_env, env_id, seed=None if seed is None else seed + i, **kwargs)
        for i in range(num_envs)
    ]
    mode = gym.vector.AutoresetMode.NEXT_STEP
    if asynchronous:
        return gym.vector.AsyncVectorEnv(
            fns, autoreset_mode=mode, context=context or _async_context()
        )
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
