"""SequenceReplay: windows, FIFO eviction, bounded memory and exact save/load."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.config import ReplayConfig
from runtime.replay import ReplayError, SequenceReplay


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
    import envs
    from runtime.replay import fill_with_random_policy

    env = envs.make_vector_env("gym:Pendulum-v1", 1, seed=0, time_limit=10)
    replay = SequenceReplay(capacity=25, batch_size=2, batch_length=5)
    assert fill_with_random_policy(replay, env, seed=0) is replay
    env.close()
    assert len(replay) == 25
    batch = replay.sample()
    assert batch["state"].shape == (2, 5, 3) and batch["action"].shape == (2, 5, 1)
    assert batch["is_first"].dtype == torch.float32
