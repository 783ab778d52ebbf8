"""The training loop with injected tiny pieces: counters, replay ratio, resume, errors, logging."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from toy_env import make_counting_vector_env

from imagine_rl.agents.random_agent import RandomAgent
from imagine_rl.runtime.checkpoint import list_checkpoints, load_checkpoint
from imagine_rl.runtime.config import build_config
from imagine_rl.runtime.logging import Logger, make_logger
from imagine_rl.runtime.loop import ReplayRatioClock, TrainingError, train
from imagine_rl.runtime.replay import SequenceReplay


def small_config(run_dir, *extra):
    return build_config(
        [
            "preset=debug",
            f"run.dir={run_dir}",
            "run.steps=240",
            "run.learning_starts=40",
            "run.replay_ratio=8",
            "run.eval_every=120",
            "run.eval_episodes=2",
            "run.checkpoint_every=120",
            "run.log_every=40",
            "env.num_envs=2",
            "env.eval_num_envs=2",
            "replay.batch_size=2",
            "replay.batch_length=4",
            "replay.chunk_size=16",
            "logging.wandb=false",
            "logging.console=false",
            *extra,
        ]
    )


class Pieces:
    """Factories that record what they built, so tests can inspect the agent and replay."""

    def __init__(self, config, run_dir, crash_at=None, agent_cls=RandomAgent):
        self.config = config
        self.run_dir = run_dir
        self.crash_at = crash_at
        self.agent_cls = agent_cls
        self.agent = None
        self.replay = None

    def make_env(self, mode, num_envs, seed):
        crash = self.crash_at if mode == "train" else None
        return make_counting_vector_env(num_envs, seed, crash_at=crash, render_mode="rgb_array")

    def make_agent(self, obs_space, action_space):
        self.agent = self.agent_cls(action_space, seed=self.config.seed)
        return self.agent

    def make_replay(self):
        self.replay = SequenceReplay.from_config(
            self.config.replay, seed=self.config.seed, directory=self.run_dir / "replay"
        )
        return self.replay

    def run(self, checkpoint=None):
        logger = make_logger(self.config, self.run_dir)
        try:
            return train(
                self.config,
                self.make_env,
                self.make_agent,
                self.make_replay,
                logger,
                self.run_dir,
                checkpoint=checkpoint,
            )
        finally:
            logger.close()


def test_replay_ratio_clock_is_exact():
    clock = ReplayRatioClock(ratio=8, steps_per_update=32)
    done = 0
    for step in range(1, 1001):
        due = clock.due(step)
        clock.updates_done += due
        done += due
    assert done == 1000 * 8 // 32
    # A fresh clock resumed with the same count agrees from then on.
    resumed = ReplayRatioClock(ratio=8, steps_per_update=32, updates_done=clock.updates_done)
    assert resumed.due(1001) == clock.due(1001)
    fractional = ReplayRatioClock(ratio=0.5, steps_per_update=1)
    assert fractional.due(7) == 3


def test_train_end_to_end(tmp_path):
    config = small_config(tmp_path)
    pieces = Pieces(config, tmp_path)
    summary = pieces.run()
    counters = summary["counters"]
    assert counters["env_steps"] == 240
    # Every vector step wrote one step per env into replay: nothing lost or duplicated.
    assert pieces.replay.inserted == counters["policy_steps"] == 240 // config.env.action_repeat
    learn_steps = counters["learn_policy_steps"]
    assert counters["updates"] == learn_steps * 8 // config.replay.steps_per_batch
    assert summary["eval"]["eval/episodes"] == 2
    assert summary["eval"]["eval/length_mean"] == 7
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines and all("step" in line for line in lines)
    namespaces = ("train/", "eval/", "loss/", "world_model/", "sparse/", "perf/")
    for line in lines:
        for key in line:
            assert key == "step" or key.startswith(namespaces) or key.endswith("_path"), key
    assert any("eval/return_mean" in line for line in lines)
    assert any("train/episode_return" in line for line in lines)
    assert list_checkpoints(tmp_path)[-1].name == "step_240"
    assert list(tmp_path.glob("videos/eval_video_*.mp4"))


def test_replay_records_episode_structure(tmp_path):
    config = small_config(tmp_path, "run.steps=80", "run.eval_episodes=0")
    pieces = Pieces(config, tmp_path)
    pieces.run()
    batch = pieces.replay.sample(batch_size=64, batch_length=8)
    t = batch["state"][..., 0]
    is_first = batch["is_first"].bool()
    is_last = batch["is_last"].bool()
    # The counter restarts exactly at is_first and ends an episode at t == length.
    assert torch.equal(is_first, t == 0)
    assert torch.equal(is_last, t == 7)
    assert torch.equal(batch["is_terminal"].bool(), is_last)
    # Rewards arrive with the next observation and are zero on the first step of an episode.
    assert (batch["reward"][is_first] == 0).all()
    within = ~is_first[:, 1:]
    assert torch.allclose(batch["reward"][:, 1:][within], batch["action"][:, :-1, 0][within])


def test_resume_keeps_counters_and_ratio(tmp_path):
    full_dir, half_dir = tmp_path / "full", tmp_path / "half"
    full = Pieces(small_config(full_dir), full_dir).run()

    half_config = small_config(half_dir, "run.steps=120")
    Pieces(half_config, half_dir).run()
    checkpoint = load_checkpoint(half_dir)
    assert checkpoint.step == 120
    resumed_config = small_config(half_dir)
    resumed = Pieces(resumed_config, half_dir)
    summary = resumed.run(checkpoint=checkpoint)

    for key in ("env_steps", "policy_steps", "learn_policy_steps", "updates"):
        assert summary["counters"][key] == full["counters"][key], key
    assert resumed.replay.inserted == summary["counters"]["policy_steps"]
    # Wall-clock time accumulates across the resume instead of restarting at zero.
    assert (
        summary["counters"]["wall_seconds"] > checkpoint.train_state["counters"]["wall_seconds"] > 0
    )
    steps = [json.loads(x)["step"] for x in (half_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


class NaNAgent(RandomAgent):
    def update(self, batch):
        return {"loss/model": math.nan}


def test_nan_loss_stops_with_clear_error(tmp_path):
    config = small_config(tmp_path, "run.eval_episodes=0")
    with pytest.raises(TrainingError, match="non-finite loss/model"):
        Pieces(config, tmp_path, agent_cls=NaNAgent).run()


class LateNaNAgent(RandomAgent):
    """Device-tensor metrics (as DreamerAgent returns them); the loss turns NaN at update 30."""

    def update(self, batch):
        self.updates += 1
        value = torch.tensor(math.nan if self.updates >= 30 else 1.0)
        return {"loss/model": value, "train/other": torch.tensor(2.0)}


def test_nan_guard_reads_device_metrics_at_log_time_and_never_checkpoints_after(tmp_path):
    """The guard is a device value read once per log interval: the run still stops, naming the
    update and the last good checkpoint, and no checkpoint is written after the bad update
    even when a checkpoint falls due before the next log."""
    config = small_config(
        tmp_path, "run.eval_episodes=0", "run.log_every=200", "run.checkpoint_every=40"
    )
    pieces = Pieces(config, tmp_path, agent_cls=LateNaNAgent)
    with pytest.raises(TrainingError, match="non-finite loss/model = nan at update 30") as info:
        pieces.run()
    assert list_checkpoints(tmp_path), "checkpoints before the bad update were written"
    last = load_checkpoint(tmp_path)
    assert str(last.path) in str(info.value)
    # Every checkpoint holds only good updates: it was written before update 30 ran.
    assert last.train_state["counters"]["updates"] < 30


def test_env_crash_saves_checkpoint_and_explains(tmp_path):
    config = small_config(tmp_path, "run.eval_episodes=0", "run.checkpoint_every=1000")
    with pytest.raises(TrainingError, match="crashed at env step") as info:
        Pieces(config, tmp_path, crash_at=30).run()
    # The installed command, not a script path, says how to go on.
    assert f"resume with `imagine-rl train resume={tmp_path}`" in str(info.value)
    assert "scripts/" not in str(info.value)
    checkpoint = load_checkpoint(tmp_path)
    counters = checkpoint.train_state["counters"]
    # Saved at the last completed vector step: the crashing step is not counted or stored.
    assert 0 < checkpoint.step < config.run.steps
    assert checkpoint.step == counters["policy_steps"] * config.env.action_repeat
    assert checkpoint.replay_path is not None


def test_logger_requires_namespaces(tmp_path):
    logger = Logger(tmp_path, [])
    with pytest.raises(ValueError, match="no namespace"):
        logger.log({"return": 1.0}, step=0)
    logger.log({"train/x": np.float32(1.0)}, step=0)


def _update_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train/batch_reward_mean" in row]


def test_updates_after_the_last_log_interval_are_logged_at_the_end(tmp_path):
    """run.steps=240 with run.log_every=100: logs at 100 and 200, and the updates of steps
    200..240 are written when the run ends, not dropped."""
    config = small_config(tmp_path, "run.log_every=100")
    summary = Pieces(config, tmp_path).run()
    rows = _update_rows(tmp_path)
    assert [row["step"] for row in rows] == [100, 200, 240]
    assert rows[-1]["train/updates"] == summary["counters"]["updates"]


def test_updates_before_a_signal_are_logged(tmp_path):
    """SIGTERM mid-run: the loop stops at the next step boundary and logs the updates made
    since the last interval, like the end of a run."""
    import signal

    class SignalledAgent(RandomAgent):
        def update(self, batch):
            metrics = super().update(batch)
            if self.updates == 30:
                signal.raise_signal(signal.SIGTERM)
            return metrics

    config = small_config(tmp_path, "run.log_every=1000")
    summary = Pieces(config, tmp_path, agent_cls=SignalledAgent).run()
    assert summary["interrupted"] and summary["counters"]["env_steps"] < 240
    rows = _update_rows(tmp_path)
    assert [row["step"] for row in rows] == [summary["counters"]["env_steps"]]
    assert rows[-1]["train/updates"] == summary["counters"]["updates"] >= 30
