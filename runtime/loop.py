"""The training loop shared by every agent: collect, replay, update, evaluate, log, checkpoint.

Factories in, metrics out: ``train`` receives ``make_env``, ``make_agent``, ``make_replay`` and a
logger, so tests inject tiny pieces.

Step semantics (DreamerV3's): at every vector step the agent acts on the current observation;
the env is a gymnasium vector env with ``NEXT_STEP`` autoreset, so the observation that ends an
episode is recorded too (``is_last``, and ``is_terminal`` for a true termination) and the step
after it returns the reset observation, recorded with ``is_first``. Env-step counters count
``num_envs * action_repeat`` per vector step, the reset steps included.

Under ``torchrun`` (``runtime.distributed``) every rank runs this loop on its own envs (seeded
``rank_seed``) and replay shard, in lockstep: one small all-reduce per vector step sums the steps
of all ranks, so the counters, ``run.steps``, the schedules and the replay-ratio clock are global
(an update replays one batch per rank, its gradients averaged by the accelerator). Only rank 0
logs (metrics averaged over ranks), evaluates and writes checkpoints (its replay shard, its RNG
state); a checkpoint resumes under any world size.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from runtime import distributed
from runtime.checkpoint import LoadedCheckpoint, save_checkpoint
from runtime.config import Config, to_dict
from runtime.logging import Logger
from runtime.replay import SequenceReplay

EnvFactory = Callable[[str, int, int], gym.vector.VectorEnv]  # (mode, num_envs, seed)
AgentFactory = Callable[[gym.spaces.Dict, gym.Space], Any]  # (obs space, action space)
ReplayFactory = Callable[[], SequenceReplay]


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, env crash); the message says what to do."""


class ReplayRatioClock:
    """How many updates are due: ``replayed steps / policy steps == ratio``, exactly.

    The count is a pure function of the policy steps taken since learning started, so it stays
    exact across a resume: ``replayed_before`` is what earlier sessions replayed (stored as
    ``Counters.replayed_steps``), ``updates_done`` counts this clock's updates. Data-parallel
    runs pass ``steps_per_update = world_size * batch steps``, so a resume under another world
    size stays exact too.
    """

    def __init__(
        self,
        ratio: float,
        steps_per_update: int,
        updates_done: int = 0,
        replayed_before: int = 0,
    ) -> None:
        self.ratio = Fraction(ratio).limit_denominator(10_000)
        self.steps_per_update = steps_per_update
        self.updates_done = updates_done
        self.replayed_before = replayed_before

    def due(self, policy_steps: int) -> int:
        """Updates to run now, given the policy steps counted since learning started."""
        owed = policy_steps * self.ratio - self.replayed_before
        target = math.floor(owed / self.steps_per_update)
        return max(0, target - self.updates_done)


class UpdateMetrics:
    """Update metrics held as they come (0-d device tensors, or numbers) until they are read.

    ``add`` costs no host sync; ``read`` moves every pending value to the host in one transfer
    per device (DreamerV3 fetches its metrics once per log interval the same way) and checks the
    ``loss/*`` terms: a non-finite one raises ``TrainingError`` naming the update, its env step
    and the last good checkpoint. ``means`` averages what was read and starts afresh.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, int, dict[str, Any]]] = []  # (update, env step, metrics)
        self._values: dict[str, list[float]] = {}

    def add(self, metrics: dict[str, Any], update: int, env_step: int) -> None:
        self._pending.append((update, env_step, metrics))

    def read(self, last_checkpoint: Path | str | None) -> None:
        pending, self._pending = self._pending, []
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for _, _, metrics in pending:
            for value in metrics.values():
                if isinstance(value, torch.Tensor):
                    by_device.setdefault(value.device, []).append(value.reshape(()).float())
        host = {device: iter(torch.stack(values).tolist()) for device, values in by_device.items()}
        for update, env_step, metrics in pending:
            for key, value in metrics.items():
                value = next(host[value.device]) if isinstance(value, torch.Tensor) else value
                if key.startswith("loss/") and not math.isfinite(value):
                    raise TrainingError(
                        f"non-finite {key} = {value} at update {update} (env step {env_step}); "
                        f"the last good checkpoint is {last_checkpoint}. Lower the learning "
                        "rate or check the inputs."
                    )
                self._values.setdefault(key, []).append(float(value))

    def means(self) -> dict[str, float]:
        out = {k: float(np.mean(v)) for k, v in self._values.items()}
        self._values.clear()
        return out


@dataclass
class Counters:
    env_steps: int = 0  # frames: num_envs * action_repeat per vector step
    policy_steps: int = 0  # agent decisions summed over envs
    learn_policy_steps: int = 0  # policy steps since learning started (drives the clock)
    updates: int = 0
    replayed_steps: int = 0  # replayed env-stream steps: updates x batch steps x world size
    episodes: int = 0
    next_eval: int = 0
    next_checkpoint: int = 0
    next_log: int = 0
    wall_seconds: float = 0.0  # training wall-clock time, summed across resumes


def _stack_obs(obs: dict[str, np.ndarray], is_first: np.ndarray) -> dict[str, np.ndarray]:
    return {**obs, "is_first": is_first.copy()}


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        # numpy's legacy global generator is what third-party code draws from.
        "numpy": np.random.get_state()[1].tolist(),  # noqa: NPY002 - MT19937 key: plain ints
        "numpy_pos": int(np.random.get_state()[2]),  # noqa: NPY002
        "python": list(random.getstate()[1]),
    }


def _seed_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the legacy global generator others use
    torch.manual_seed(seed)


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(  # noqa: NPY002
        ("MT19937", np.asarray(state["numpy"], dtype=np.uint32), state["numpy_pos"])
    )
    random.setstate((3, tuple(state["python"]), None))


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Outside the main thread signal() raises ValueError: leave signals alone there.
            with contextlib.suppress(ValueError):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def evaluate_policy(
    agent: Any,
    env: gym.vector.VectorEnv,
    episodes: int,
    seed: int,
    record_video: bool = False,
    on_step: Callable[[dict[str, np.ndarray], dict[str, Any], np.ndarray], None] | None = None,
) -> tuple[list[float], list[int], np.ndarray | None]:
    """Run ``episodes`` greedy episodes, spread evenly over the vector env's sub-envs.

    Each sub-env counts only its first ``quota`` episodes, so short episodes are not
    over-represented. Returns (returns, lengths, video of env 0's first episode or None).
    ``on_step(obs, info, ended)``, if given, sees every observation with the vector env's
    ``info`` (after the reset and after each step); ``ended [num_envs]`` marks the sub-envs
    whose counted episode ended with this observation (e.g. to read ``info["is_success"]``).

    Shapes: video ``[T, H, W, 3]`` uint8.
    """
    num_envs = env.num_envs
    quota = np.array([episodes // num_envs + (i < episodes % num_envs) for i in range(num_envs)])
    finished = np.zeros(num_envs, dtype=int)
    obs, info = env.reset(seed=seed)
    if on_step is not None:
        on_step(obs, info, np.zeros(num_envs, dtype=bool))
    is_first = np.ones(num_envs, dtype=bool)
    done = np.zeros(num_envs, dtype=bool)
    state = agent.initial_state(num_envs)
    running = np.zeros(num_envs)
    lengths_now = np.zeros(num_envs, dtype=int)
    returns: list[float] = []
    lengths: list[int] = []
    frames: list[np.ndarray] = []
    recording = record_video
    while (finished < quota).any():
        if recording:
            frames.append(_frame(env, obs))
        action, state = agent.act(_stack_obs(obs, is_first), state, explore=False)
        obs, reward, terminated, truncated, info = env.step(action)
        # After a done, NEXT_STEP autoreset ignores the action and returns the reset obs.
        reward = np.where(done, 0.0, reward)
        running += reward
        lengths_now += ~done
        is_first = done.copy()
        new_done = (terminated | truncated) & ~done
        ended = np.zeros(num_envs, dtype=bool)
        for i in np.flatnonzero(new_done):
            if finished[i] < quota[i]:
                returns.append(float(running[i]))
                lengths.append(int(lengths_now[i]))
                ended[i] = True
            finished[i] += 1
            running[i] = 0.0
            lengths_now[i] = 0
            if i == 0 and recording:
                frames.append(_frame(env, obs))
                recording = False
        if on_step is not None:
            on_step(obs, info, ended)
        done = new_done
    video = np.stack(frames) if frames else None
    return returns, lengths, video


class SuccessCounter:
    """An ``on_step`` hook for ``evaluate_policy``: collects ``info["is_success"]`` at the end
    of every counted episode (envs that report it, e.g. ``blocks:``)."""

    def __init__(self) -> None:
        self.outcomes: list[bool] = []

    def __call__(self, obs: dict[str, np.ndarray], info: dict[str, Any], ended: np.ndarray) -> None:
        if "is_success" not in info:
            return
        present = info.get("_is_success", np.ones(len(ended), dtype=bool))
        for i in np.flatnonzero(ended & present):
            self.outcomes.append(bool(info["is_success"][i]))

    @property
    def rate(self) -> float:
        """Fraction of successful episodes (``nan`` before any)."""
        return float(np.mean(self.outcomes)) if self.outcomes else float("nan")


def _frame(env: gym.vector.VectorEnv, obs: dict[str, np.ndarray]) -> np.ndarray:
    """Env 0's current frame as ``[H, W, 3]`` uint8, from pixels or ``render()``."""
    if "pixels" in obs:
        return np.ascontiguousarray(obs["pixels"][0].transpose(1, 2, 0))
    frames = env.call("render")
    frame = frames[0]
    if frame is None:
        raise TrainingError("eval videos need render_mode='rgb_array' on the eval env")
    return np.asarray(frame, dtype=np.uint8)


def train(
    config: Config,
    make_env: EnvFactory,
    make_agent: AgentFactory,
    make_replay: ReplayFactory,
    logger: Logger,
    run_dir: str | Path,
    checkpoint: LoadedCheckpoint | None = None,
) -> dict[str, Any]:
    """Train until ``config.run.steps`` env steps, or until SIGINT/SIGTERM.

    Under ``torchrun`` call it on every rank with the same config (checked: a mismatch raises
    ``DistributedError``); ``make_replay`` builds this rank's shard and ``logger`` is only used
    on rank 0.

    Returns a summary: counters (global), ``local_env_steps`` (this rank's env steps in this
    call), ``rank``, ``world_size``, last eval metrics, ``interrupted`` and the last checkpoint.
    """
    run_dir = Path(run_dir)
    run = config.run
    num_envs = config.env.num_envs
    steps_per_vector_step = num_envs * config.env.action_repeat
    ctx = distributed.context()
    main = ctx.is_main
    if ctx.enabled:
        distributed.check_same_config(to_dict(config))
    seed = distributed.rank_seed(config.seed, ctx.rank)

    envs = make_env("train", num_envs, seed)
    # Only rank 0 evaluates: the other ranks build no eval envs.
    eval_envs = make_env("eval", config.env.eval_num_envs, config.seed + 10_000) if main else None
    agent = make_agent(envs.single_observation_space, envs.single_action_space)
    replay = make_replay()
    counters = Counters(next_eval=0 if run.eval_initial else run.eval_every)
    counters.next_checkpoint = run.checkpoint_every
    counters.next_log = run.log_every
    # One update replays a batch on every rank.
    clock = ReplayRatioClock(run.replay_ratio, config.replay.steps_per_batch * ctx.world_size)

    if checkpoint is not None:
        agent.load_state_dict(checkpoint.agent_state)
        train_state = checkpoint.train_state
        saved = dict(train_state["counters"])
        # Checkpoints from before data-parallel training: one batch per update.
        saved.setdefault("replayed_steps", saved["updates"] * config.replay.steps_per_batch)
        counters = Counters(**saved)
        clock.replayed_before = counters.replayed_steps
        if main:
            _set_rng_state(train_state["rng"])
            if checkpoint.replay_path is not None:
                replay.load(checkpoint.replay_path)
        else:
            # The checkpoint holds rank 0's RNG and replay shard; other ranks draw afresh and
            # refill their shards (learning waits until every shard can be sampled).
            _seed_rngs(seed + counters.env_steps)

    last_checkpoint: Path | None = checkpoint.path if checkpoint is not None else None
    # Env steps of the newest eval and checkpoint, so the end of a run does not repeat them.
    marks = {"eval": -1, "checkpoint": counters.env_steps if checkpoint is not None else -1}
    last_eval: dict[str, float] = {}
    update_metrics = UpdateMetrics()
    episode_returns: list[float] = []
    episode_lengths: list[int] = []
    local_env_steps = 0

    def do_checkpoint() -> Path | None:
        nonlocal last_checkpoint
        # No checkpoint after a non-finite loss: the pending metrics are checked first.
        update_metrics.read(last_checkpoint)
        marks["checkpoint"] = counters.env_steps
        counters.wall_seconds = wall_seconds()
        if not main:
            return None
        train_state = {
            "counters": asdict(counters),
            "rng": _rng_state(),
            "world_size": ctx.world_size,
        }
        last_checkpoint = save_checkpoint(
            run_dir,
            counters.env_steps,
            to_dict(config),
            agent.state_dict(),
            train_state,
            replay=replay if config.replay.save else None,
            keep=run.keep_checkpoints,
        )
        return last_checkpoint

    def do_eval() -> None:
        nonlocal last_eval
        marks["eval"] = counters.env_steps
        if not main or eval_envs is None:
            return  # the other ranks go on to the next step's all-reduce and wait there
        start = time.time()
        successes = SuccessCounter()
        returns, lengths, video = evaluate_policy(
            agent,
            eval_envs,
            run.eval_episodes,
            seed=config.seed + 10_000 + counters.env_steps,
            record_video=run.video,
            on_step=successes,
        )
        last_eval = {
            "eval/return_mean": float(np.mean(returns)),
            "eval/return_std": float(np.std(returns)),
            "eval/length_mean": float(np.mean(lengths)),
            "eval/episodes": float(len(returns)),
            "perf/eval_seconds": time.time() - start,
            "perf/wall_seconds": wall_seconds(),
        }
        if successes.outcomes:
            last_eval["eval/success_rate"] = successes.rate
        logger.log(last_eval, counters.env_steps)
        if video is not None:
            logger.video("eval/video", video, counters.env_steps)
        if replay.can_sample():
            for name, media in agent.report(replay.sample()).items():
                logger.media(name, media, counters.env_steps)  # videos, or images [H, W, 3]

    def log_metrics() -> None:
        elapsed = max(time.time() - timer["start"], 1e-9)
        fps = (counters.env_steps - timer["start_steps"]) / elapsed
        update_metrics.read(last_checkpoint)  # the one device -> host transfer per interval
        metrics = update_metrics.means()
        if counters.updates > 0:
            # Optional in the agent contract (agents.base): duck-typed agents may lack it.
            metrics.update(getattr(agent, "log_metrics", dict)())
        metrics.update(replay.stats())
        episodes = [float(np.sum(episode_returns)), float(np.sum(episode_lengths))]
        episodes.append(float(len(episode_returns)))
        if ctx.enabled:
            # Every rank has the same keys (same agent, same number of updates): average them.
            keys = sorted(metrics)
            values = distributed.all_reduce_sums([metrics[k] for k in keys] + episodes)
            metrics = {k: v / ctx.world_size for k, v in zip(keys, values)}
            episodes = values[len(keys) :]
        metrics.update(
            {
                "train/env_steps": counters.env_steps,
                "train/policy_steps": counters.policy_steps,
                "train/updates": counters.updates,
                "train/episodes": counters.episodes,
                "perf/env_steps_per_s": fps,
                "perf/wall_seconds": wall_seconds(),
                "perf/env_time_fraction": timer["env"] / elapsed,
                "perf/train_time_fraction": timer["train"] / elapsed,
            }
        )
        if episodes[2] > 0:
            metrics["train/episode_return"] = episodes[0] / episodes[2]
            metrics["train/episode_length"] = episodes[1] / episodes[2]
        if main:
            logger.log(metrics, counters.env_steps)
        episode_returns.clear()
        episode_lengths.clear()

    # Reset seeds differ after a resume so a resumed run does not replay its first episodes.
    obs, _ = envs.reset(seed=seed + counters.policy_steps)
    state = agent.initial_state(num_envs)
    is_first = np.ones(num_envs, dtype=bool)
    is_last = np.zeros(num_envs, dtype=bool)
    is_terminal = np.zeros(num_envs, dtype=bool)
    reward = np.zeros(num_envs, dtype=np.float32)
    running_return = np.zeros(num_envs)
    running_length = np.zeros(num_envs, dtype=int)
    timer = {"env": 0.0, "train": 0.0, "start": time.time(), "start_steps": counters.env_steps}
    wall_base = counters.wall_seconds
    # Whether every rank's replay can be sampled; once true it stays true.
    all_can_sample = False

    def wall_seconds() -> float:
        return wall_base + time.time() - timer["start"]

    with _StopFlag() as stop:
        stopping = False  # set on every rank at the same step when any rank got a signal
        if run.eval_initial and counters.env_steps == 0 and run.eval_episodes > 0:
            do_eval()
            counters.next_eval = run.eval_every
        while counters.env_steps < run.steps and not stopping:
            action, state = agent.act(_stack_obs(obs, is_first), state, explore=True)
            tick = time.time()
            try:
                next_obs, env_reward, terminated, truncated, _ = envs.step(action)
            except Exception as error:
                path = do_checkpoint()
                saved = (
                    f"a checkpoint was saved at {path}"
                    if path is not None
                    else f"rank 0's last checkpoint is {last_checkpoint}"
                )
                raise TrainingError(
                    f"env '{config.env.id}' crashed at env step {counters.env_steps}"
                    f"{f' on rank {ctx.rank}' if ctx.enabled else ''} "
                    f"({type(error).__name__}: {error}); {saved}: "
                    f"resume with `python scripts/train.py resume={run_dir}`"
                ) from error
            timer["env"] += time.time() - tick
            # Recorded only once the env accepted the action, so replay and counters agree.
            replay.add(
                {
                    **obs,
                    "action": np.asarray(action),
                    "reward": reward,
                    "is_first": is_first,
                    "is_last": is_last,
                    "is_terminal": is_terminal,
                }
            )
            obs = next_obs
            # The step after a done is the autoreset: reward 0, a new episode's first obs.
            was_done = is_last
            reward = np.where(was_done, 0.0, env_reward).astype(np.float32)
            is_first = was_done.copy()
            is_last = (terminated | truncated) & ~was_done
            is_terminal = terminated & ~was_done
            running_return += reward
            running_length += ~was_done
            new_episodes = 0
            for i in np.flatnonzero(is_last):
                episode_returns.append(float(running_return[i]))
                episode_lengths.append(int(running_length[i]))
                new_episodes += 1
                running_return[i] = 0.0
                running_length[i] = 0

            local_env_steps += steps_per_vector_step
            # Global counts: every rank's steps, episodes, stop requests and replay readiness.
            step_env, step_policy, step_episodes, stops, ready = distributed.all_reduce_sums(
                [
                    steps_per_vector_step,
                    num_envs,
                    new_episodes,
                    stop.signal is not None,
                    all_can_sample or replay.can_sample(),
                ]
            )
            counters.env_steps += int(step_env)
            counters.policy_steps += int(step_policy)
            counters.episodes += int(step_episodes)
            stopping = stops > 0
            all_can_sample = int(ready) == ctx.world_size
            if counters.env_steps > run.learning_starts and all_can_sample:
                counters.learn_policy_steps += int(step_policy)
                tick = time.time()
                for _ in range(clock.due(counters.learn_policy_steps)):
                    metrics = agent.update(replay.sample())
                    clock.updates_done += 1
                    counters.updates += 1
                    counters.replayed_steps += clock.steps_per_update
                    # Device tensors: read (and checked for non-finite losses) at log time.
                    update_metrics.add(metrics, counters.updates, counters.env_steps)
                timer["train"] += time.time() - tick
            if main:
                logger.progress(counters.env_steps)

            if counters.env_steps >= counters.next_log:
                counters.next_log += run.log_every
                log_metrics()

            if counters.env_steps >= counters.next_eval:
                counters.next_eval += run.eval_every
                if run.eval_episodes > 0:
                    do_eval()
            if counters.env_steps >= counters.next_checkpoint:
                counters.next_checkpoint += run.checkpoint_every
                do_checkpoint()

        interrupted = stopping
        finished = counters.env_steps >= run.steps
        if finished and run.eval_episodes > 0 and marks["eval"] != counters.env_steps:
            do_eval()
        if marks["checkpoint"] != counters.env_steps:
            do_checkpoint()

    envs.close()
    if eval_envs is not None:
        eval_envs.close()
    return {
        "counters": asdict(counters),
        "local_env_steps": local_env_steps,
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "eval": last_eval,
        "interrupted": interrupted,
        "signal": stop.signal,
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
    }
