"""SequenceReplay: windows, FIFO eviction, bounded memory and exact save/load."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from imagine_rl.runtime.config import ReplayConfig
from imagine_rl.runtime.replay import ReplayError, SequenceReplay


class Streams:
    """``N`` fake env streams with episodes of random length stored back to back.

    ``state`` holds ``[episode id, time in stream, stream id]`` so every sampled step says
    exactly where it came from; episode ids are unique over all streams.
    """

    def __init__(self, n: int, seed: int = 0, discrete: bool = False, size: int = 4):
        self.n, self.discrete, self.size = n, discrete, size
        self.rng = np.random.default_rng(seed)
        self.time = 0
        self.episode = np.arange(n) * 100_000
        self.left = self.rng.integers(3, 15, size=n)
        self.first = np.ones(n, dtype=bool)

    def step(self) -> dict[str, np.ndarray]:
        n = self.n
        last = self.left == 1
        state = np.stack([self.episode, np.full(n, self.time), np.arange(n)], axis=1).astype(
            np.float32
        )
        pixels = np.broadcast_to(
            ((self.time + 7 * np.arange(n)) % 256).astype(np.uint8)[:, None, None, None],
            (n, 3, self.size, self.size),
        ).copy()
        if self.discrete:
            action = self.rng.integers(0, 5, size=n).astype(np.int64)
        else:
            action = self.rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
        step = {
            "state": state,
            "pixels": pixels,
            "action": action,
            "reward": np.where(self.first, 0.0, self.rng.normal(size=n)).astype(np.float32),
            "is_first": self.first.copy(),
            "is_last": last,
            "is_terminal": last & (self.rng.random(n) < 0.5),
        }
        self.time += 1
        self.left -= 1
        self.episode = np.where(last, self.episode + 1, self.episode)
        self.left = np.where(last, self.rng.integers(3, 15, size=n), self.left)
        self.first = last
        return step


def fill(replay: SequenceReplay, streams: Streams, steps: int) -> None:
    for _ in range(steps):
        replay.add(streams.step())


def check_windows(batch: dict[str, torch.Tensor], oldest: int, newest: int) -> None:
    """Each window: one stream, consecutive times within [oldest, newest], episode id changing
    only at is_first, pixels matching the step they were stored with."""
    state = batch["state"].numpy()
    episode, time, stream = state[..., 0], state[..., 1], state[..., 2]
    assert (stream == stream[:, :1]).all(), "a window crossed streams"
    assert (np.diff(time, axis=1) == 1).all(), "a window is not consecutive in time"
    assert time.min() >= oldest and time.max() <= newest, "a window holds evicted/unwritten steps"
    changed = np.diff(episode, axis=1) != 0
    first = batch["is_first"].numpy()[:, 1:] == 1
    assert not (changed & ~first).any(), "episode id changed without is_first"
    assert (first <= changed).all(), "is_first inside an episode"
    expected = (time + 7 * stream) % 256
    assert (batch["pixels"].numpy() == expected[..., None, None, None]).all()


def make(**kwargs) -> SequenceReplay:
    args = {"capacity": 200, "batch_size": 8, "batch_length": 10, "chunk_size": 16, "seed": 0}
    return SequenceReplay(**{**args, **kwargs})


def test_sample_shapes_and_dtypes():
    replay = make()
    fill(replay, Streams(2, size=6), 30)
    batch = replay.sample()
    assert batch["state"].shape == (8, 10, 3) and batch["state"].dtype == torch.float32
    assert batch["pixels"].shape == (8, 10, 3, 6, 6) and batch["pixels"].dtype == torch.uint8
    assert batch["action"].shape == (8, 10, 2) and batch["action"].dtype == torch.float32
    assert batch["reward"].shape == (8, 10) and batch["reward"].dtype == torch.float32
    for key in ("is_first", "is_last", "is_terminal"):
        assert batch[key].dtype == torch.float32
        assert set(batch[key].unique().tolist()) <= {0.0, 1.0}
    other = replay.sample(batch_size=3, batch_length=5)
    assert other["pixels"].shape == (3, 5, 3, 6, 6)
    check_windows(other, 0, 29)


def test_discrete_actions_and_pixels_stay_compact():
    replay = make(capacity=100)
    fill(replay, Streams(2, discrete=True, size=8), 12)
    batch = replay.sample()
    assert batch["action"].dtype == torch.int64 and batch["action"].shape == (8, 10)
    # 50 slots per stream x 2 streams; pixels at 1 byte each: no upcast in memory.
    per_step = 3 * 4 + 3 * 8 * 8 + 8 + 4 + 3
    assert replay.memory_bytes() == 100 * per_step


def test_windows_respect_episodes_and_streams():
    replay = make(capacity=600, batch_size=64, batch_length=12)
    streams = Streams(3, seed=1)
    fill(replay, streams, 150)
    for _ in range(20):
        check_windows(replay.sample(), 0, 149)


def test_can_sample_needs_a_full_window():
    replay = make()
    assert not replay.can_sample() and len(replay) == 0
    fill(replay, Streams(2), 9)
    assert not replay.can_sample()
    with pytest.raises(ValueError, match="collect more steps"):
        replay.sample()
    fill(replay, Streams(2), 1)
    assert replay.can_sample() and not replay.can_sample(11)
    with pytest.raises(ValueError, match="exceeds"):
        replay.sample(batch_length=101)


def test_uniform_over_every_valid_start():
    replay = make(capacity=40, batch_size=4000, batch_length=5)
    fill(replay, Streams(2), 33)  # 20 slots per stream: times 13..32, 16 starts each
    batch = replay.sample()
    state = batch["state"].numpy()
    pairs = state[:, 0, 2] * 1000 + state[:, 0, 1]
    values, counts = np.unique(pairs, return_counts=True)
    assert len(values) == 2 * 16
    assert counts.min() > 0.6 * 4000 / 32 and counts.max() < 1.4 * 4000 / 32


def test_fifo_eviction_across_the_ring_wrap():
    replay = make(capacity=40, batch_size=256, batch_length=6)
    streams = Streams(2, seed=3)
    fill(replay, streams, 57)  # 20 slots per stream; the ring has wrapped twice
    assert len(replay) == 40 and replay.inserted == 114
    for _ in range(10):
        check_windows(replay.sample(), oldest=37, newest=56)
    # Only one window of the full per-stream length exists per stream: the newest 20 steps.
    whole = replay.sample(batch_length=20)["state"].numpy()[..., 1]
    assert (whole == np.arange(37, 57)).all()
    with pytest.raises(ValueError, match="exceeds"):
        replay.sample(batch_length=21)


def test_memory_is_constant_after_capacity():
    replay = make(capacity=64, batch_length=4)
    streams = Streams(4, size=16)
    fill(replay, streams, 16)
    size = replay.memory_bytes()
    assert replay.stats()["train/replay_memory_mb"] == pytest.approx(size / 2**20)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        fill(replay, streams, 200)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert replay.memory_bytes() == size
    assert after - before < 50_000  # the 4 x 16 x 3 x 16 x 16 pixel ring alone is ~200 KB
    stats = replay.stats()
    assert set(stats) == {"train/replay_steps", "train/replay_inserted", "train/replay_memory_mb"}
    assert stats["train/replay_steps"] == 64 and stats["train/replay_inserted"] == 4 * 216


def test_mismatched_steps_are_refused():
    replay = make()
    streams = Streams(2)
    fill(replay, streams, 3)
    with pytest.raises(ValueError, match="3 env streams, the replay holds 2"):
        replay.add(Streams(3).step())
    step = streams.step()
    step.pop("is_terminal")
    with pytest.raises(ValueError, match="keys changed"):
        replay.add(step)
    step = streams.step()
    step["pixels"] = step["pixels"].astype(np.float32)
    with pytest.raises(ValueError, match="keep shapes and dtypes fixed"):
        replay.add(step)
    step = streams.step()
    step.pop("is_first")
    with pytest.raises(ValueError, match="is_first"):
        replay.add(step)
    with pytest.raises(ValueError, match="disagree"):
        make().add({"is_first": np.ones(2, bool), "reward": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="smaller than"):
        make(capacity=2).add(Streams(3).step())
    assert len(replay) == 6  # refused steps wrote nothing


def test_same_seed_same_samples_and_from_config():
    a = SequenceReplay.from_config(ReplayConfig(capacity=100, batch_size=4, batch_length=5), 7)
    b = SequenceReplay.from_config(ReplayConfig(capacity=100, batch_size=4, batch_length=5), 7)
    assert a.directory is None and a.chunk_size == 1024
    fill(a, Streams(2), 20)
    fill(b, Streams(2), 20)
    for _ in range(3):
        x, y = a.sample(), b.sample()
        assert all(torch.equal(x[k], y[k]) for k in x)


def assert_same(a: SequenceReplay, b: SequenceReplay) -> None:
    """Same counters, same steps in the same slots, same next samples."""
    assert (len(a), a.inserted, a.num_streams) == (len(b), b.inserted, b.num_streams)
    assert a._data.keys() == b._data.keys()
    oldest = a._written - len(a) // a.num_streams
    slots = np.arange(oldest, a._written) % a._slots
    for key in a._data:
        assert a._data[key].dtype == b._data[key].dtype
        np.testing.assert_array_equal(a._data[key][:, slots], b._data[key][:, slots])
    for _ in range(3):
        x, y = a.sample(), b.sample()
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("steps", [0, 7, 23, 130])
def test_save_load_round_trip_without_directory(tmp_path: Path, steps: int):
    replay = make(capacity=60, batch_length=4)
    fill(replay, Streams(3, seed=steps), steps)
    if steps >= 4:
        replay.sample()  # advance the RNG: its state must round-trip too
    replay.save(tmp_path / "replay.npz")
    restored = make(capacity=60, batch_length=4, seed=99)
    restored.load(tmp_path / "replay.npz")
    if steps >= 4:
        assert_same(replay, restored)
    else:
        assert len(restored) == len(replay) and not restored.can_sample()


def test_save_load_with_chunk_files(tmp_path: Path):
    directory = tmp_path / "replay"
    replay = make(capacity=100, chunk_size=8, directory=directory)
    streams = Streams(2, seed=5)
    fill(replay, streams, 173)  # 50 slots per stream; chunks of 8; wrapped 3 times
    chunks = sorted(p.name for p in directory.glob("*.npz"))
    assert "stream000_chunk00000020.npz" in chunks and "stream001_chunk00000020.npz" in chunks
    # Old chunks are deleted: nothing older than slots + 2 chunks behind the newest step.
    assert "stream000_chunk00000000.npz" not in chunks
    assert len(chunks) <= 2 * (50 // 8 + 4)
    replay.sample()
    state = tmp_path / "ckpt" / "replay.npz"
    replay.save(state)
    restored = make(capacity=100, chunk_size=8, seed=3, directory=directory)
    restored.load(state)
    assert_same(replay, restored)
    # Only the partial tail is in the state: 173 % 8 = 5 steps per stream, not 50.
    with np.load(state, allow_pickle=False) as saved:
        tails = [saved[name] for name in saved.files if name.startswith("tail_")]
    assert len(tails) == 7 and all(t.shape[:2] == (2, 5) for t in tails)
    # Without the directory the chunked state cannot be completed: a clear error.
    with pytest.raises(ReplayError, match="replay/ folder"):
        make(capacity=100, chunk_size=8).load(state)


def test_resume_then_continue_matches_uninterrupted_run(tmp_path: Path):
    """Saving, loading and adding the same steps gives the replay that never stopped."""
    ref_streams, streams = Streams(2, seed=9), Streams(2, seed=9)
    reference = make(capacity=60, chunk_size=8, directory=tmp_path / "a")
    replay = make(capacity=60, chunk_size=8, directory=tmp_path / "b")
    fill(reference, ref_streams, 45)
    fill(replay, streams, 45)
    reference.sample(), replay.sample()
    replay.save(tmp_path / "state.npz")
    resumed = make(capacity=60, chunk_size=8, seed=1, directory=tmp_path / "b")
    resumed.load(tmp_path / "state.npz")
    fill(reference, ref_streams, 60)
    fill(resumed, streams, 60)
    assert_same(reference, resumed)
    resumed.save(tmp_path / "state2.npz")
    again = make(capacity=60, chunk_size=8, directory=tmp_path / "b")
    again.load(tmp_path / "state2.npz")
    assert_same(reference, again)


def test_old_state_after_wrap_restores_what_is_left(tmp_path: Path):
    directory = tmp_path / "replay"
    replay = make(capacity=80, chunk_size=8, batch_length=4, directory=directory)
    streams = Streams(2)
    fill(replay, streams, 100)  # 40 slots: times 60..99 stored, chunks 7..11 + tail 96..99
    replay.save(tmp_path / "old.npz")
    fill(replay, streams, 30)  # deletes chunks ending 56+ steps behind 130: chunks 0..8
    restored = make(capacity=80, chunk_size=8, batch_length=4, directory=directory)
    with pytest.warns(UserWarning, match="steps per stream"):
        restored.load(tmp_path / "old.npz")
    # Chunks 7 and 8 (times 60..71) are gone; times 72..99 are back.
    assert len(restored) == 2 * 28
    check_windows(restored.sample(batch_size=64), oldest=72, newest=99)


def test_rewritten_chunk_is_detected(tmp_path: Path):
    directory = tmp_path / "replay"
    replay = make(capacity=100, chunk_size=8, directory=directory)
    fill(replay, Streams(2, seed=1), 20)
    replay.save(tmp_path / "early.npz")
    fill(replay, Streams(2, seed=1), 20)
    replay.save(tmp_path / "late.npz")
    # Resume from the early state with different steps: chunks 2.. are rewritten.
    other = make(capacity=100, chunk_size=8, directory=directory)
    other.load(tmp_path / "early.npz")
    fill(other, Streams(2, seed=2), 20)
    with pytest.raises(ReplayError, match=r"stream000_chunk00000002\.npz was rewritten"):
        make(capacity=100, chunk_size=8, directory=directory).load(tmp_path / "late.npz")


def test_missing_and_corrupt_files_are_named(tmp_path: Path):
    directory = tmp_path / "replay"
    replay = make(capacity=100, chunk_size=8, directory=directory)
    fill(replay, Streams(2), 40)
    state = tmp_path / "state.npz"
    replay.save(state)
    fresh = lambda: make(capacity=100, chunk_size=8, directory=directory)  # noqa: E731

    with pytest.raises(ReplayError, match="missing.npz is missing"):
        fresh().load(tmp_path / "missing.npz")

    chunk = directory / "stream001_chunk00000002.npz"
    original = chunk.read_bytes()
    corrupt = bytearray(original)
    corrupt[len(corrupt) // 2] ^= 0xFF  # flip a byte in the stored arrays
    chunk.write_bytes(bytes(corrupt))
    with pytest.raises(ReplayError, match=r"stream001_chunk00000002\.npz is corrupt"):
        fresh().load(state)
    chunk.unlink()
    with pytest.raises(ReplayError, match=r"stream001_chunk00000002\.npz is missing"):
        fresh().load(state)
    chunk.write_bytes(original)
    fresh().load(state)  # intact again

    state.write_bytes(state.read_bytes()[:-40])  # truncated
    with pytest.raises(ReplayError, match=r"state\.npz is corrupt"):
        fresh().load(state)


def test_load_refuses_a_different_capacity(tmp_path: Path):
    replay = make(capacity=100)
    fill(replay, Streams(2), 12)
    replay.save(tmp_path / "state.npz")
    with pytest.raises(ValueError, match="replay.capacity=100"):
        make(capacity=50).load(tmp_path / "state.npz")


def test_fill_with_random_policy_fills_to_capacity():
    from imagine_rl import envs
    from imagine_rl.runtime.replay import fill_with_random_policy

    env = envs.make_vector_env("gym:Pendulum-v1", 1, seed=0, time_limit=10)
    replay = SequenceReplay(capacity=25, batch_size=2, batch_length=5)
    assert fill_with_random_policy(replay, env, seed=0) is replay
    env.close()
    assert len(replay) == 25
    batch = replay.sample()
    assert batch["state"].shape == (2, 5, 3) and batch["action"].shape == (2, 5, 1)
    assert batch["is_first"].dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Fractions: uniform, recency and the online queue
# ---------------------------------------------------------------------------------------


def starts_of(batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(stream, start time) of every window, read from the stored ``state``."""
    state = batch["state"].numpy()
    return state[:, 0, 2].astype(int), state[:, 0, 1].astype(int)


def test_default_fractions_draw_exactly_the_uniform_replay():
    """The default (all uniform) makes the draws of the replay before fractions existed: one
    ``integers`` call over every (stream, start) pair, so old seeds and resumes are unchanged."""
    replays = [
        make(capacity=60, batch_size=16, batch_length=5, seed=4),
        make(capacity=60, batch_size=16, batch_length=5, seed=4, fractions={"uniform": 1.0}),
        SequenceReplay.from_config(
            ReplayConfig(capacity=60, batch_size=16, batch_length=5, save=False), seed=4
        ),
    ]
    for replay in replays:
        fill(replay, Streams(3, seed=2), 47)  # 20 slots per stream: times 27..46
    rng = np.random.default_rng(4)
    for _ in range(3):
        pick = rng.integers(0, 3 * 16, size=16)  # 16 starts per stream
        expected = (pick // 16, 27 + pick % 16)
        for replay in replays:
            stream, start = starts_of(replay.sample())
            np.testing.assert_array_equal(stream, expected[0])
            np.testing.assert_array_equal(start, expected[1])


def test_online_queue_hands_out_new_windows_once_in_order():
    replay = make(capacity=200, batch_size=3, batch_length=4, fractions={"online": 1.0})
    streams = Streams(2)
    fill(replay, streams, 10)  # complete blocks [0, 4) and [4, 8) of both streams
    stream, start = starts_of(replay.sample())
    assert list(zip(stream, start)) == [(0, 0), (1, 0), (0, 4)]
    stream, start = starts_of(replay.sample())
    assert (stream[0], start[0]) == (1, 4)  # the last queued window, then uniform draws
    check_windows(replay.sample(), 0, 9)  # queue empty: all uniform, nothing beyond time 9
    fill(replay, streams, 5)  # block [8, 12) is complete, [12, 16) not yet
    stream, start = starts_of(replay.sample())
    assert list(zip(stream[:2], start[:2])) == [(0, 8), (1, 8)]
    # Reports (another length, or online=False) leave the queue alone.
    fill(replay, streams, 4)
    replay.sample(batch_length=3)
    replay.sample(online=False)
    stream, start = starts_of(replay.sample())
    assert list(zip(stream[:2], start[:2])) == [(0, 12), (1, 12)]
    assert start[2] <= 19 - 4  # [16, 20) is not complete: the third window is a uniform one


def test_online_queue_skips_evicted_windows_and_respects_context():
    replay = make(capacity=40, batch_size=4, batch_length=5, context=1, fractions={"online": 1})
    fill(replay, Streams(2), 60)  # 20 slots: times 40..59; windows need a kept step before
    stream, start = starts_of(replay.sample())
    # The queue's old blocks (from time 1) were evicted: it goes on from the oldest valid start.
    assert list(zip(stream, start)) == [(0, 41), (1, 41), (0, 46), (1, 46)]


def test_online_share_is_rounded_stochastically():
    replay = make(capacity=2000, batch_size=3, batch_length=2)
    replay.fractions = {"uniform": 0.5, "recency": 0.0, "online": 0.5}
    fill(replay, Streams(1), 1000)  # 500 queued windows: more than the samples take
    taken = []
    for _ in range(200):
        before = replay._online_time
        replay.sample()
        taken.append((replay._online_time - before) // 2)
    assert set(taken) == {1, 2} and abs(np.mean(taken) - 1.5) < 0.2


def recency_ages(replay: SequenceReplay, samples: int) -> np.ndarray:
    """Ages in windows (newest 0, ordered by start time then stream) of sampled windows."""
    stream, start = starts_of(replay.sample(batch_size=samples))
    n = replay.num_streams
    newest = (replay._written - replay.batch_length) * n + n - 1
    return newest - (start * n + stream)


def test_recency_follows_dreamerv3s_distribution():
    replay = make(capacity=1000, batch_length=4, fractions={"recency": 1.0})
    fill(replay, Streams(2), 700)  # full: 500 slots per stream, 497 starts each
    ages = recency_ages(replay, 40_000)
    full = 2 * 497
    weights = 1.0 / np.arange(1, full + 1)
    expected = weights / weights.sum()
    assert ages.min() >= 0 and ages.max() < full
    for age in (0, 1, 5):
        assert abs(np.mean(ages == age) - expected[age]) < 0.25 * expected[age] + 0.002
    assert abs(np.mean(ages < 100) - expected[:100].sum()) < 0.02
    # Half full: the same ages, scaled to the windows held.
    half = make(capacity=1000, batch_length=4, fractions={"recency": 1.0})
    fill(half, Streams(2), 250)
    held = 2 * 247
    ages = recency_ages(half, 40_000)
    assert ages.max() < held
    scaled = np.bincount(np.arange(full) * held // full, weights=expected, minlength=held)
    assert abs(np.mean(ages == 0) - scaled[0]) < 0.25 * scaled[0]


def test_recency_favours_new_windows_and_mixes_with_uniform():
    mean_start = {}
    for name, shares in {
        "uniform": {"uniform": 1.0},
        "mix": {"uniform": 0.5, "recency": 0.5},
        "recency": {"recency": 1.0},
    }.items():
        replay = make(capacity=400, batch_size=4000, batch_length=4, fractions=shares)
        fill(replay, Streams(2), 300)  # times 100..299
        check_windows(replay.sample(), 100, 299)
        mean_start[name] = starts_of(replay.sample())[1].mean()
    assert mean_start["uniform"] == pytest.approx(100 + 196 / 2, abs=4)
    assert mean_start["uniform"] + 30 < mean_start["mix"] < mean_start["recency"] - 30


def test_fractions_are_checked():
    for shares, match in [
        ({"uniform": 0.5}, "sum to 1"),
        ({"uniform": 1.5, "recency": -0.5}, ">= 0"),
        ({"uniform": 0.5, "newest": 0.5}, "unknown keys"),
    ]:
        with pytest.raises(ValueError, match=match):
            make(fractions=shares)
    with pytest.raises(ValueError, match="context must be 0 or 1"):
        make(context=2)


def test_fractions_and_context_config_keys():
    from imagine_rl.runtime.config import ConfigError, build_config

    config = build_config(
        [
            "agent=random",
            "replay.fractions.uniform=0.5",
            "replay.fractions.recency=0.3",
            "replay.fractions.online=0.2",
            "replay.context=1",
        ]
    )
    replay = SequenceReplay.from_config(config.replay)
    assert replay.fractions == {"uniform": 0.5, "recency": 0.3, "online": 0.2}
    assert replay.context == 1
    for args, match in [
        (["replay.fractions.online=0.5"], r"replay.fractions: .* must sum to 1.*uniform=0.5"),
        (["replay.fractions.uniform=-1"], r"replay.fractions.uniform: must be >= 0"),
        (["replay.context=2"], "replay.context: must be 0 .* or 1"),
        (
            ["replay.capacity=64", "replay.batch_length=64", "replay.context=1"],
            r"batch_length \+ replay.context \(65\)",
        ),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_config(["agent=random", *args])


# ---------------------------------------------------------------------------------------
# Context: stored latents
# ---------------------------------------------------------------------------------------


def latent_of(stream: np.ndarray, time: np.ndarray) -> dict[str, np.ndarray]:
    """A latent that names its step: deter [.., 3] = (stream, time, 1), stoch [.., 2, 2]."""
    stream, time = np.broadcast_arrays(stream, time)
    deter = np.stack([stream, time, np.ones_like(time)], -1).astype(np.float32)
    stoch = (time[..., None, None] * 10 + stream[..., None, None] + np.eye(2)).astype(np.float32)
    return {"deter": deter, "stoch": stoch}


def write_batch_latents(replay: SequenceReplay, batch: dict[str, torch.Tensor]) -> None:
    index = batch["replay_index"].numpy()
    times = index[:, 1:] + np.arange(batch["is_first"].shape[1])
    latents = latent_of(index[:, :1], times)
    replay.update_latents(index, {k: torch.from_numpy(v) for k, v in latents.items()})


def test_context_windows_start_after_a_stored_step():
    replay = make(capacity=40, batch_size=512, batch_length=6, context=1)
    streams = Streams(2)
    fill(replay, streams, 6)
    assert not replay.can_sample()  # 6 steps: no step before a 6-step window yet
    fill(replay, streams, 1)
    batch = replay.sample()
    stream, start = starts_of(batch)
    assert (start == 1).all()
    fill(replay, streams, 50)  # 20 slots: times 37..56
    batch = replay.sample()
    check_windows(batch, 38, 56)
    stream, start = starts_of(batch)
    assert set(start) == set(range(38, 52))
    index = batch["replay_index"]
    assert index.dtype == torch.int64 and index.shape == (512, 2)
    np.testing.assert_array_equal(index.numpy(), np.stack([stream, start], 1))
    # Before any write: no latents, nothing valid.
    assert not [k for k in batch if k.startswith("context/")]
    assert batch["context_valid"].dtype == torch.float32
    assert batch["context_valid"].shape == (512,) and not batch["context_valid"].any()


def test_update_latents_writes_the_batch_and_later_windows_start_from_it():
    replay = make(capacity=200, batch_size=8, batch_length=5, context=1)
    fill(replay, Streams(2, seed=4), 60)
    written = np.zeros((2, 60), dtype=bool)
    for _ in range(4):
        batch = replay.sample()
        write_batch_latents(replay, batch)
        for s, t0 in batch["replay_index"].numpy():
            written[s, t0 : t0 + 5] = True
    # Exactly the steps of the batches hold their latents, in their (stream, slot).
    valid = replay._latent_valid
    np.testing.assert_array_equal(valid[:, :60], written)
    s, t = np.nonzero(written)
    expected = latent_of(s, t)
    for key in ("deter", "stoch"):
        np.testing.assert_array_equal(replay._latents[key][s, t], expected[key])
    assert replay._latents["deter"].dtype == np.float32
    assert replay._latents["stoch"].shape == (2, 100, 2, 2)
    # Every later window carries the stored latent of the step before it.
    batch = replay.sample(batch_size=2000)
    stream, start = batch["replay_index"].numpy().T
    before_written = written[stream, start - 1]
    np.testing.assert_array_equal(batch["context_valid"].numpy(), before_written.astype(np.float32))
    assert 0 < before_written.mean() < 1
    expected = latent_of(stream, start - 1)
    for key in ("deter", "stoch"):
        context = batch[f"context/{key}"]
        assert context.dtype == torch.float32 and context.shape == (2000, *expected[key].shape[1:])
        np.testing.assert_array_equal(
            context.numpy()[before_written], expected[key][before_written]
        )
        assert not context.numpy()[~before_written].any()


def test_stale_index_after_the_ring_wraps_is_skipped():
    replay = make(capacity=40, batch_size=4, batch_length=6, context=1)
    streams = Streams(2)
    fill(replay, streams, 30)  # 20 slots: times 10..29
    batch = replay.sample()
    index = batch["replay_index"].numpy().copy()
    index[:, 1] = [11, 12, 20, 24]  # windows 11..16, 12..17, 20..25, 24..29
    batch["replay_index"] = torch.from_numpy(index)
    fill(replay, streams, 5)  # times 15..34 kept; slots of 10..14 now hold 30..34
    write_batch_latents(replay, batch)
    for s, t0 in index:
        for time in range(t0, t0 + 6):
            slot_valid = replay._latent_valid[s, time % 20]
            assert slot_valid == (time >= 15), (s, time)
    # Steps 30..34 (in the slots of 10..14) hold no latent: nothing stale was written there.
    assert not replay._latents["deter"][:, np.arange(30, 35) % 20].any()
    # A new step clears the latent of the slot it overwrites.
    fill(replay, streams, 2)  # times 35, 36 overwrite 15, 16
    assert not replay._latent_valid[:, [15, 16]].any()


def test_update_latents_refuses_bad_input():
    replay = make(capacity=100, batch_size=2, batch_length=4, context=1)
    fill(replay, Streams(2), 20)
    batch = replay.sample()
    index = batch["replay_index"]
    good = {"deter": np.zeros((2, 4, 3)), "stoch": np.zeros((2, 4, 2, 2))}
    replay.update_latents(index, good)
    for latents, match in [
        ({"deter": np.zeros((2, 4, 5)), "stoch": np.zeros((2, 4, 2, 2))}, "differ from"),
        ({"deter": np.zeros((2, 4, 3))}, "differ from"),
        ({"deter": np.zeros((3, 4, 3)), "stoch": np.zeros((3, 4, 2, 2))}, r"\[B=2, T"),
        ({"deter": np.zeros((2, 4, 3)), "stoch": np.zeros((2, 3, 2, 2))}, "disagree on T"),
    ]:
        with pytest.raises(ValueError, match=match):
            replay.update_latents(index, latents)
    with pytest.raises(ValueError, match="int \\[B, 2\\]"):
        replay.update_latents(index.float(), good)
    with pytest.raises(ValueError, match="never sampled"):
        replay.update_latents(np.array([[0, 17], [2, 3]]), good)  # stream 2; times past 19


def context_replay(**kwargs) -> SequenceReplay:
    shares = {"uniform": 0.5, "recency": 0.25, "online": 0.25}
    return make(batch_size=8, batch_length=4, context=1, fractions=shares, **kwargs)


def test_save_load_round_trips_latents_flags_and_sampler(tmp_path: Path):
    replay = context_replay(capacity=60)
    streams = Streams(3, seed=8)
    fill(replay, streams, 50)  # wrapped: 20 slots per stream
    for _ in range(3):
        write_batch_latents(replay, replay.sample())
    assert replay._online_time > 1  # the queue has moved
    replay.save(tmp_path / "replay.npz")
    restored = context_replay(capacity=60, seed=99)
    restored.load(tmp_path / "replay.npz")
    assert (restored._online_time, restored._online_stream) == (
        replay._online_time,
        replay._online_stream,
    )
    np.testing.assert_array_equal(restored._latent_valid, replay._latent_valid)
    for key in replay._latents:
        np.testing.assert_array_equal(restored._latents[key], replay._latents[key])
    assert restored.memory_bytes() == replay.memory_bytes()
    assert_same(replay, restored)  # the next samples, context and all, are identical
    # And they go on identically: new steps, new latents, the queue.
    more = Streams(3, seed=9)
    for target in (replay, restored):
        fill(target, more, 12)
        write_batch_latents(target, target.sample())
        more = Streams(3, seed=9)
    assert_same(replay, restored)


def test_latents_of_steps_in_chunk_files_come_back_unwritten(tmp_path: Path):
    directory = tmp_path / "replay"
    replay = context_replay(capacity=100, chunk_size=8, directory=directory)
    fill(replay, Streams(2, seed=3), 45)  # chunks hold times 0..39, the tail 40..44
    for _ in range(30):
        write_batch_latents(replay, replay.sample())
    assert replay._latent_valid[:, 40:45].any() and replay._latent_valid[:, :40].any()
    replay.save(tmp_path / "state.npz")
    restored = context_replay(capacity=100, chunk_size=8, directory=directory)
    restored.load(tmp_path / "state.npz")
    np.testing.assert_array_equal(restored._latent_valid[:, 40:45], replay._latent_valid[:, 40:45])
    assert not restored._latent_valid[:, :40].any()
    for key in replay._latents:
        np.testing.assert_array_equal(
            restored._latents[key][:, 40:45], replay._latents[key][:, 40:45]
        )
    x, y = replay.sample(), restored.sample()  # the same windows; context only from the tail
    np.testing.assert_array_equal(x["replay_index"], y["replay_index"])
    tail = x["replay_index"][:, 1] > 40
    np.testing.assert_array_equal(x["context_valid"][tail], y["context_valid"][tail])
