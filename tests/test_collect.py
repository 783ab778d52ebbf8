"""One rule for replay steps: every producer of replay data stores the same steps.

The producers: the training loop, evaluation, ``fill_with_random_policy`` and the adaptation
benchmark's collector. Each is driven on the same counting env, whose reward does not depend on
the policy, and must store exactly the steps the rule of ``runtime.collect`` (and
``agents.base``) prescribes, written out by hand below.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from toy_env import make_counting_vector_env

from imagine_rl.agents.random_agent import RandomAgent
from imagine_rl.runtime.collect import Collector, RandomPolicy, StepRecorder
from imagine_rl.runtime.config import build_config
from imagine_rl.runtime.logging import make_logger
from imagine_rl.runtime.loop import evaluate_policy, train
from imagine_rl.runtime.replay import SequenceReplay, fill_with_random_policy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "dev"))

import bench_adaptation  # noqa: E402

LENGTH = 7  # transitions per episode of the counting env: observations t = 0..7


class RecordingReplay(SequenceReplay):
    """A replay that also keeps every added step in order (the test reads them back)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[dict[str, np.ndarray]] = []

    def add(self, step):
        self.steps.append({k: np.array(v, copy=True) for k, v in step.items()})
        super().add(step)


def expected_steps(count: int, truncate: bool) -> dict[str, np.ndarray]:
    """The rule, by hand, for one stream of the counting env (``reward="count"``)."""
    t = np.arange(count) % (LENGTH + 1)
    episode = np.arange(count) // (LENGTH + 1)
    return {
        "t": t.astype(np.float32),
        "episode": episode.astype(np.float32),
        # Received on arriving at t (100 * episode + t); 0 on the reset observation.
        "reward": np.where(t == 0, 0, 100 * episode + t).astype(np.float32),
        "is_first": t == 0,
        "is_last": t == LENGTH,
        "is_terminal": (t == LENGTH) & (not truncate),
    }


def stored(steps: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The stored steps of env stream 0, in the layout of ``expected_steps``."""
    state = np.stack([s["state"][0] for s in steps])
    out = {"t": state[:, 0], "episode": state[:, 1] - state[0, 1]}
    for key in ("reward", "is_first", "is_last", "is_terminal"):
        out[key] = np.array([s[key][0] for s in steps])
    return out


def assert_rule(steps: list[dict[str, np.ndarray]], truncate: bool, minimum: int) -> None:
    assert len(steps) >= minimum
    got, want = stored(steps), expected_steps(len(steps), truncate)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert all(s["action"].shape == (1, 2) for s in steps)


def counting_env(truncate: bool, num_envs: int = 1, **kwargs):
    return make_counting_vector_env(num_envs, 0, reward="count", truncate=truncate, **kwargs)


@pytest.fixture(params=[False, True], ids=["terminated", "truncated"])
def truncate(request):
    return request.param


def test_training_loop_stores_the_rule(tmp_path, truncate):
    config = build_config(
        [
            "preset=debug",
            f"run.dir={tmp_path}",
            "run.steps=60",
            "env.action_repeat=1",
            "run.learning_starts=1000",
            "run.eval_episodes=0",
            "run.checkpoint_every=1000",
            "env.num_envs=1",
            "logging.wandb=false",
            "logging.console=false",
        ]
    )
    replays = []

    def make_replay():
        replays.append(RecordingReplay.from_config(config.replay, seed=0))
        return replays[-1]

    logger = make_logger(config, tmp_path)
    try:
        train(
            config,
            lambda mode, n, seed: counting_env(truncate, n),
            lambda obs_space, action_space: RandomAgent(action_space, seed=0),
            make_replay,
            logger,
            tmp_path,
        )
    finally:
        logger.close()
    assert_rule(replays[0].steps, truncate, minimum=60)


def test_evaluation_records_the_rule(truncate):
    steps = []
    env = counting_env(truncate)
    agent = RandomAgent(env.single_action_space, seed=0)
    returns, lengths, _ = evaluate_policy(agent, env, episodes=3, seed=5, on_record=steps.append)
    env.close()
    # Three episodes end with the third's final observation, which is not acted on.
    assert len(steps) == 3 * (LENGTH + 1) - 1
    assert_rule(steps, truncate, minimum=3 * LENGTH)
    assert lengths == [LENGTH] * 3
    assert returns == [float(sum(100 * e + t for t in range(1, LENGTH + 1))) for e in range(3)]


def test_fill_with_random_policy_stores_the_rule(truncate):
    replay = RecordingReplay(capacity=40, batch_size=2, batch_length=4, seed=0)
    env = counting_env(truncate)
    fill_with_random_policy(replay, env, seed=3)
    env.close()
    assert_rule(replay.steps, truncate, minimum=40)


def test_adaptation_benchmark_collects_the_rule(monkeypatch, truncate):
    def factory(config, video=None):
        return lambda mode, n, seed: counting_env(truncate, n)

    monkeypatch.setattr("imagine_rl.runtime.factories.make_env_factory", factory)
    config = build_config(["preset=debug"])
    before, after, _ = bench_adaptation.collect(config, None, 30, seed=1, switch=None)
    assert after == []
    assert_rule(before, truncate, minimum=30)


def test_adaptation_benchmark_starts_a_stream_at_the_switch(monkeypatch):
    infos = iter([{}] * 12 + [{"intervention": np.array(["changed"])}] + [{}] * 100)

    class Switching:
        """The counting env, reporting the intervention on the 13th step as envs do."""

        def __init__(self, env):
            self.env = env

        def __getattr__(self, name):
            return getattr(self.env, name)

        def step(self, action):
            obs, reward, terminated, truncated, _ = self.env.step(action)
            return obs, reward, terminated, truncated, next(infos)

    def factory(config, video=None):
        return lambda mode, n, seed: Switching(counting_env(False, n))

    monkeypatch.setattr("imagine_rl.runtime.factories.make_env_factory", factory)
    config = build_config(["preset=debug"])
    before, after, message = bench_adaptation.collect(config, "x", 30, seed=1, switch=12)
    assert (len(before), len(after), message) == (12, 18, "changed")
    assert_rule(before, False, minimum=12)
    # The changed task's replay starts a stream of its own at the switch: is_first, reward 0.
    assert after[0]["is_first"][0] and after[0]["reward"][0] == 0
    assert after[0]["state"][0][0] == 12 % (LENGTH + 1)
    assert not any(s["is_first"][0] for s in after[1:4])


def test_recorder_streams_are_independent():
    """Two envs whose episodes end at different steps: each stream follows the rule."""
    env = make_counting_vector_env(2, 0, reward="count")
    env.envs[1].length = 3
    collector = Collector(env, RandomPolicy(env.action_space, seed=0))
    collector.reset(seed=0)
    steps = [collector.step() for _ in range(12)]
    env.close()
    t1 = [int(r.step["state"][1, 0]) for r in steps]
    assert t1 == [0, 1, 2, 3] * 3
    assert [bool(r.step["is_first"][1]) for r in steps] == [t == 0 for t in t1]
    assert [bool(r.step["is_last"][1]) for r in steps] == [t == 3 for t in t1]
    ended = [i for i, r in enumerate(steps) if r.ended[1]]
    assert ended == [2, 6, 10]  # the step whose arriving observation is t == 3
    assert steps[2].finished_episodes == [(float(1 + 2 + 3), 3)]


def test_recorder_rejects_bad_input():
    recorder = StepRecorder(2)
    with pytest.raises(RuntimeError, match="start"):
        _ = recorder.observation
    with pytest.raises(ValueError, match="leading env dim of 2"):
        recorder.start({"state": np.zeros((3, 4))})
    recorder.start({"state": np.zeros((2, 4))})
    no = np.zeros(2, dtype=bool)
    with pytest.raises(ValueError, match="action has shape"):
        recorder.record(np.zeros((1, 2)), {"state": np.zeros((2, 4))}, np.zeros(2), no, no)
