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

from imagine_rl.runtime import distributed
from imagine_rl.runtime.checkpoint import LoadedCheckpoint, save_checkpoint
from imagine_rl.runtime.collect import AgentPolicy, Collector, EnvStepError
from imagine_rl.runtime.config import Config, to_dict
from imagine_rl.runtime.logging import Logger
from imagine_rl.runtime.replay import ReplayError, SequenceReplay

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


def planned_updates(config: Config, world_size: int | None = None) -> int:
    """The updates a run of ``config`` will do, counted by this loop's ``ReplayRatioClock``
    (what the trainer tells the agent: sparse schedules and factored graphs span it).

    Vector steps of ``num_envs * action_repeat`` env steps (on every rank) until ``run.steps``;
    once more than ``run.learning_starts`` env steps are collected each vector step adds
    ``num_envs`` policy steps per rank, and the clock owes ``floor(policy steps * replay_ratio
    / (steps per batch * world_size))`` updates. At least 1. Under ``torchrun`` (``world_size``
    ranks; default: this process's launch) the counters are global: a run does about
    ``1 / world_size`` of the updates, each on ``world_size`` batches.
    """
    world = distributed.context().world_size if world_size is None else world_size
    per_vector_step = config.env.num_envs * config.env.action_repeat * world
    vector_steps = -(-config.run.steps // per_vector_step)
    before = min(vector_steps, config.run.learning_starts // per_vector_step)
    policy_steps = config.env.num_envs * world * (vector_steps - before)
    clock = ReplayRatioClock(config.run.replay_ratio, config.replay.steps_per_batch * world)
    return max(1, clock.due(policy_steps))


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
    update_seconds: float = 0.0  # wall-clock time spent in updates, summed across resumes


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
    on_record: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> tuple[list[float], list[int], np.ndarray | None]:
    """Run ``episodes`` greedy episodes, spread evenly over the vector env's sub-envs.

    Each sub-env counts only its first ``quota`` episodes, so short episodes are not
    over-represented. Returns (returns, lengths, video of env 0's first episode or None).
    Steps are recorded by the same ``Collector`` as training, so returns and lengths follow the
    replay's rule. ``on_step(obs, info, ended)``, if given, sees every observation with the
    vector env's ``info`` (after the reset and after each step); ``ended [num_envs]`` marks the
    sub-envs whose counted episode ended with this observation (e.g. to read
    ``info["is_success"]``). ``on_record(step)``, if given, receives every recorded replay
    step (e.g. to keep the eval episodes in a replay of their own).

    Shapes: video ``[T, H, W, 3]`` uint8.
    """
    num_envs = env.num_envs
    quota = np.array([episodes // num_envs + (i < episodes % num_envs) for i in range(num_envs)])
    finished = np.zeros(num_envs, dtype=int)
    collector = Collector(env, AgentPolicy(agent, num_envs, explore=False))
    info = collector.reset(seed=seed)
    if on_step is not None:
        on_step(collector.observation, info, np.zeros(num_envs, dtype=bool))
    returns: list[float] = []
    lengths: list[int] = []
    frames: list[np.ndarray] = []
    recording = record_video
    while (finished < quota).any():
        if recording:
            frames.append(_frame(env, collector.observation))
        recorded = collector.step()
        if on_record is not None:
            on_record(recorded.step)
        counted = recorded.ended & (finished < quota)
        for i in np.flatnonzero(counted):
            returns.append(float(recorded.episode_returns[i]))
            lengths.append(int(recorded.episode_lengths[i]))
        if recording and recorded.ended[0]:
            frames.append(_frame(env, collector.observation))
            recording = False
        finished += recorded.ended
        if on_step is not None:
            on_step(collector.observation, recorded.info, counted)
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


@dataclass
class Callback:
    """A callback on the env-step clock: ``fn()`` runs when ``Counters.env_steps`` reaches
    ``Counters.<next_field>``, which then advances by ``every`` (stored in checkpoints, so a
    resumed run keeps the schedule)."""

    name: str
    next_field: str
    every: int
    fn: Callable[[], Any]


class Schedule:
    """Callbacks on the env-step clock, run in order after every vector step (like DreamerV3's
    ``Driver.on_step`` or TorchRL's trainer hooks)."""

    def __init__(self, counters: Counters, callbacks: list[Callback]) -> None:
        self.counters = counters
        self.callbacks = callbacks

    def on_step(self) -> None:
        for callback in self.callbacks:
            due = getattr(self.counters, callback.next_field)
            if self.counters.env_steps >= due:
                setattr(self.counters, callback.next_field, due + callback.every)
                callback.fn()


class Trainer:
    """One training session: what ``train`` builds, and its parts in the order they run.

    ``collect`` steps the training envs (``runtime.collect.Collector``) and records into
    replay; ``update`` runs the updates the replay-ratio clock owes; ``log``, ``evaluate`` and
    ``checkpoint`` are callbacks of the env-step ``Schedule``. ``train`` is the loop: collect,
    count (one all-reduce under ``torchrun``), update, schedule, until ``run.steps`` or a signal.
    """

    def __init__(
        self,
        config: Config,
        make_env: EnvFactory,
        make_agent: AgentFactory,
        make_replay: ReplayFactory,
        logger: Logger,
        run_dir: str | Path,
    ) -> None:
        self.config = config
        self.run = run = config.run
        self.logger = logger
        self.run_dir = Path(run_dir)
        self.ctx = ctx = distributed.context()
        if ctx.enabled:
            distributed.check_same_config(to_dict(config))
        self.seed = distributed.rank_seed(config.seed, ctx.rank)
        self.num_envs = config.env.num_envs
        self.steps_per_vector_step = self.num_envs * config.env.action_repeat
        self.envs: gym.vector.VectorEnv | None = None
        self.eval_envs: gym.vector.VectorEnv | None = None
        try:
            self.envs = make_env("train", self.num_envs, self.seed)
            # Only rank 0 evaluates: the other ranks build no eval envs.
            if ctx.is_main:
                self.eval_envs = make_env("eval", config.env.eval_num_envs, config.seed + 10_000)
            spaces = self.envs.single_observation_space, self.envs.single_action_space
            self.agent = make_agent(*spaces)
            self.replay = make_replay()
        except BaseException:
            self.close()  # what was built before the failure
            raise
        self.counters = Counters(
            next_eval=0 if run.eval_initial else run.eval_every,
            next_checkpoint=run.checkpoint_every,
            next_log=run.log_every,
        )
        # One update replays a batch on every rank.
        self.clock = ReplayRatioClock(
            run.replay_ratio, config.replay.steps_per_batch * ctx.world_size
        )
        self.update_metrics = UpdateMetrics()
        self.last_checkpoint: Path | None = None
        self.last_eval: dict[str, float] = {}
        # Env steps of the newest log, eval and checkpoint, so the end of a run does not repeat
        # them (and does log what came after the last interval).
        self.marks = {"log": -1, "eval": -1, "checkpoint": -1}
        self.episode_returns: list[float] = []
        self.episode_lengths: list[int] = []
        self.local_env_steps = 0
        self.train_seconds = 0.0
        # Whether every rank's replay can be sampled; once true it stays true.
        self.all_can_sample = False

    # -- resume ------------------------------------------------------------------------------

    def restore(self, checkpoint: LoadedCheckpoint) -> None:
        """Continue from ``checkpoint``: agent, counters, clock, RNG and (rank 0) the replay."""
        self.agent.load_state_dict(checkpoint.agent_state)
        train_state = checkpoint.train_state
        saved = dict(train_state["counters"])
        # Checkpoints from before data-parallel training: one batch per update.
        saved.setdefault("replayed_steps", saved["updates"] * self.config.replay.steps_per_batch)
        self.counters = Counters(**saved)
        self.clock.replayed_before = self.counters.replayed_steps
        if self.ctx.is_main:
            _set_rng_state(train_state["rng"])
            if checkpoint.replay_path is not None:
                try:
                    self.replay.load(checkpoint.replay_path)
                except ReplayError as error:
                    raise TrainingError(
                        f"cannot restore the replay of {checkpoint.path} ({error}); to go on "
                        "with its weights, optimizers and counters and an empty replay, resume "
                        f"with `imagine-rl train resume={self.run_dir} resume.replay=fresh`"
                    ) from error
        else:
            # The checkpoint holds rank 0's RNG and replay shard; other ranks draw afresh and
            # refill their shards (learning waits until every shard can be sampled).
            _seed_rngs(self.seed + self.counters.env_steps)
        self.last_checkpoint = checkpoint.path
        self.marks["checkpoint"] = self.counters.env_steps

    # -- the loop ----------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        run, counters = self.run, self.counters
        schedule = Schedule(
            counters,
            [
                Callback("log", "next_log", run.log_every, self.log),
                Callback("eval", "next_eval", run.eval_every, self.evaluate_if_episodes),
                Callback("checkpoint", "next_checkpoint", run.checkpoint_every, self.checkpoint),
            ],
        )
        self.collector = Collector(self.envs, AgentPolicy(self.agent, self.num_envs, explore=True))
        # Reset seeds differ after a resume so a resumed run does not replay its first episodes.
        self.collector.reset(seed=self.seed + counters.policy_steps)
        self.start_time, self.start_steps = time.time(), counters.env_steps
        self.wall_base = counters.wall_seconds
        with _StopFlag() as stop:
            stopping = False  # set on every rank at the same step when any rank got a signal
            if run.eval_initial and counters.env_steps == 0 and run.eval_episodes > 0:
                self.evaluate()
                counters.next_eval = run.eval_every
            while counters.env_steps < run.steps and not stopping:
                new_episodes = self.collect()
                stopping = self.count(new_episodes, stop.signal is not None)
                self.update()
                if self.ctx.is_main:
                    self.logger.progress(counters.env_steps)
                schedule.on_step()
            # The updates since the last log interval (a run's end, or a signal) are written
            # like any interval's: their metrics would otherwise be dropped.
            if self.marks["log"] != counters.env_steps and counters.env_steps > self.start_steps:
                self.log()
            finished = counters.env_steps >= run.steps
            if finished and run.eval_episodes > 0 and self.marks["eval"] != counters.env_steps:
                self.evaluate()
            if self.marks["checkpoint"] != counters.env_steps:
                self.checkpoint()
        return {
            "counters": asdict(counters),
            "local_env_steps": self.local_env_steps,
            "rank": self.ctx.rank,
            "world_size": self.ctx.world_size,
            "eval": self.last_eval,
            "interrupted": stopping,
            "signal": stop.signal,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
        }

    def collect(self) -> int:
        """One vector step of the training envs into replay; returns the episodes it ended."""
        try:
            recorded = self.collector.step()
        except EnvStepError as error:
            path = self.checkpoint()
            saved = (
                f"a checkpoint was saved at {path}"
                if path is not None
                else f"rank 0's last checkpoint is {self.last_checkpoint}"
            )
            rank = f" on rank {self.ctx.rank}" if self.ctx.enabled else ""
            raise TrainingError(
                f"env '{self.config.env.id}' crashed at env step {self.counters.env_steps}{rank} "
                f"({error}); {saved}: resume with `imagine-rl train resume={self.run_dir}`"
            ) from error.__cause__
        # Recorded only once the env accepted the action, so replay and counters agree.
        self.replay.add(recorded.step)
        for episode_return, episode_length in recorded.finished_episodes:
            self.episode_returns.append(episode_return)
            self.episode_lengths.append(episode_length)
        self.local_env_steps += self.steps_per_vector_step
        return int(recorded.ended.sum())

    def count(self, new_episodes: int, stop_requested: bool) -> bool:
        """Add this vector step to the global counters; returns whether any rank must stop.

        Global counts: every rank's steps, episodes, stop requests and replay readiness, in one
        small all-reduce (a no-op outside ``torchrun``)."""
        counters = self.counters
        step_env, step_policy, step_episodes, stops, ready = distributed.all_reduce_sums(
            [
                self.steps_per_vector_step,
                self.num_envs,
                new_episodes,
                stop_requested,
                self.all_can_sample or self.replay.can_sample(),
            ]
        )
        counters.env_steps += int(step_env)
        counters.policy_steps += int(step_policy)
        counters.episodes += int(step_episodes)
        self.all_can_sample = int(ready) == self.ctx.world_size
        if counters.env_steps > self.run.learning_starts and self.all_can_sample:
            counters.learn_policy_steps += int(step_policy)
        return stops > 0

    def update(self) -> None:
        """The updates the replay-ratio clock owes for the policy steps since learning started."""
        counters = self.counters
        if not (counters.env_steps > self.run.learning_starts and self.all_can_sample):
            return
        tick = time.time()
        for _ in range(self.clock.due(counters.learn_policy_steps)):
            batch = self.replay.sample()
            metrics = self.agent.update(batch)
            if "replay_index" in batch:
                # replay.context: the window's posterior states go back into the replay, where
                # later windows start from them (DreamerV3's replay context). The copy to the
                # host is the one transfer per update this costs.
                latents = getattr(self.agent, "replay_latents", lambda: None)()
                if latents:
                    self.replay.update_latents(batch["replay_index"], latents)
            self.clock.updates_done += 1
            counters.updates += 1
            counters.replayed_steps += self.clock.steps_per_update
            # Device tensors: read (and checked for non-finite losses) at log time.
            self.update_metrics.add(metrics, counters.updates, counters.env_steps)
        spent = time.time() - tick
        self.train_seconds += spent
        counters.update_seconds += spent

    # -- callbacks ---------------------------------------------------------------------------

    def wall_seconds(self) -> float:
        return self.wall_base + time.time() - self.start_time

    def log(self) -> None:
        counters, ctx = self.counters, self.ctx
        self.marks["log"] = counters.env_steps
        elapsed = max(time.time() - self.start_time, 1e-9)
        fps = (counters.env_steps - self.start_steps) / elapsed
        self.update_metrics.read(self.last_checkpoint)  # the one device -> host transfer
        metrics = self.update_metrics.means()
        if counters.updates > 0:
            # Optional in the agent contract (agents.base): duck-typed agents may lack it.
            metrics.update(getattr(self.agent, "log_metrics", dict)())
        metrics.update(self.replay.stats())
        episodes = [float(np.sum(self.episode_returns)), float(np.sum(self.episode_lengths))]
        episodes.append(float(len(self.episode_returns)))
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
                "perf/wall_seconds": self.wall_seconds(),
                "perf/update_seconds": counters.update_seconds,
                "perf/env_time_fraction": self.collector.env_seconds / elapsed,
                "perf/train_time_fraction": self.train_seconds / elapsed,
            }
        )
        if episodes[2] > 0:
            metrics["train/episode_return"] = episodes[0] / episodes[2]
            metrics["train/episode_length"] = episodes[1] / episodes[2]
        if ctx.is_main:
            self.logger.log(metrics, counters.env_steps)
        self.episode_returns.clear()
        self.episode_lengths.clear()

    def evaluate_if_episodes(self) -> None:
        if self.run.eval_episodes > 0:
            self.evaluate()

    def evaluate(self) -> None:
        counters, run, config = self.counters, self.run, self.config
        self.marks["eval"] = counters.env_steps
        if not self.ctx.is_main or self.eval_envs is None:
            return  # the other ranks go on to the next step's all-reduce and wait there
        start = time.time()
        successes = SuccessCounter()
        returns, lengths, video = evaluate_policy(
            self.agent,
            self.eval_envs,
            run.eval_episodes,
            seed=config.seed + 10_000 + counters.env_steps,
            record_video=run.video,
            on_step=successes,
        )
        self.last_eval = {
            "eval/return_mean": float(np.mean(returns)),
            "eval/return_std": float(np.std(returns)),
            "eval/length_mean": float(np.mean(lengths)),
            "eval/episodes": float(len(returns)),
            "perf/eval_seconds": time.time() - start,
            "perf/wall_seconds": self.wall_seconds(),
        }
        if successes.outcomes:
            self.last_eval["eval/success_rate"] = successes.rate
        self.logger.log(self.last_eval, counters.env_steps)
        if video is not None:
            self.logger.video("eval/video", video, counters.env_steps)
        if self.replay.can_sample():
            # online=False: a report's batch does not use up the online queue of new windows.
            for name, media in self.agent.report(self.replay.sample(online=False)).items():
                self.logger.media(name, media, counters.env_steps)  # videos, or images

    def checkpoint(self) -> Path | None:
        """Save on rank 0 (after checking the pending metrics: never after a bad update)."""
        counters = self.counters
        self.update_metrics.read(self.last_checkpoint)
        self.marks["checkpoint"] = counters.env_steps
        counters.wall_seconds = self.wall_seconds()
        if not self.ctx.is_main:
            return None
        train_state = {
            "counters": asdict(counters),
            "rng": _rng_state(),
            "world_size": self.ctx.world_size,
        }
        self.last_checkpoint = save_checkpoint(
            self.run_dir,
            counters.env_steps,
            to_dict(self.config),
            self.agent.state_dict(),
            train_state,
            replay=self.replay if self.config.replay.save else None,
            keep=self.run.keep_checkpoints,
        )
        return self.last_checkpoint

    def close(self) -> None:
        for env in (self.envs, self.eval_envs):
            if env is not None:
                env.close()


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
    on rank 0. The envs are closed however the run ends.

    Returns a summary: counters (global), ``local_env_steps`` (this rank's env steps in this
    call), ``rank``, ``world_size``, last eval metrics, ``interrupted`` and the last checkpoint.
    """
    trainer = None
    try:
        trainer = Trainer(config, make_env, make_agent, make_replay, logger, run_dir)
        if checkpoint is not None:
            trainer.restore(checkpoint)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
