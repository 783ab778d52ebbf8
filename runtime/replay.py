"""Sequence replay: steps of ``N`` parallel env streams, sampled as ``[B, T]`` windows.

Layout. Each key is one preallocated array ``[N, C, ...]`` (``C = capacity // N`` slots per
stream) used as a ring: the step at per-stream time ``t`` lives in slot ``t % C``. Every ``add``
writes one step of all ``N`` streams, so all streams hold the same times ``[start, written)``.
Memory is allocated once, at the first ``add`` (when shapes are known), and never grows.

Windows. A window is ``T`` consecutive steps of one stream. Episodes are stored back to back and
each one starts with ``is_first``; the agent resets its state there, so a window may span an
episode boundary (always at an ``is_first`` step).

Fractions (``replay.fractions``, DreamerV3's ``replay.fracs`` and ``replay.online``). Each batch
is a mix of three kinds of windows, by share of the batch:

- ``uniform``: uniform over every valid (stream, start) pair (the default, all of the batch);
- ``recency``: the window of age ``a`` (counted in windows over all streams, newest 0) with
  probability proportional to ``1 / (a + 1)`` over the ages a full replay holds; while the replay
  is not full, the drawn age is scaled down to the windows held (DreamerV3's recency selector);
- ``online``: a queue of the new data, cut into consecutive non-overlapping windows of
  ``batch_length`` steps per stream and handed out once each, in the order written (stream 0 to
  N-1 for each time block), before anything else. Windows evicted before their turn are skipped.
  What the queue cannot fill (no complete new window yet) is drawn like the other windows.

The online share is rounded stochastically to whole windows; the other windows pick recency
with probability ``recency / (uniform + recency)`` each (uniform when both are 0). With the
default fractions the draws are exactly those of the plain uniform replay.

Context (``replay.context=1``, DreamerV3's ``replay_context``). Windows start at least one step
into each stream's kept range, so the step before every window is stored too. Agents write the
latent state of every step of an updated batch back with ``update_latents``; the next batch that
holds a window carries the stored latent of the step before it (``context/<key>``) and whether
it was ever written (``context_valid``), so the agent can start the window from it. A step's
latent is cleared when its slot is overwritten by a new step.

Persistence (npz only, never pickle). Time is cut into chunks of ``chunk_size`` steps. With a
``directory``, each full chunk of each stream is written once, as soon as it is complete, to
``directory/stream{s:03d}_chunk{c:08d}.npz``; ``save(path)`` then writes only the partial tail
per stream, the counters and the RNG state, so saving at every checkpoint stays cheap.
``load(path)`` restores the exact content (same steps in the same slots, same counters, same RNG
state and online-queue position), so the samples after a resume are identical. Stored latents
(context) are saved for the steps the state file holds: all of them without a ``directory``,
the partial tail with one. Chunk files never hold latents, so after a load the steps that came
from chunk files have no latent (``context_valid`` 0) until an update writes them again.

Chunk files are deleted once they are more than ``C + 2 * chunk_size`` steps behind the newest
step. Loading a checkpoint much older than that after the run went on restores the steps still on
disk and warns how many were lost. Each chunk carries a random id recorded in the saved state, so
a chunk rewritten later (by a run resumed from an earlier checkpoint) is detected, not mixed in.
"""

from __future__ import annotations

import json
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagine_rl.runtime.collect import Collector, RandomPolicy
from imagine_rl.runtime.config import ReplayConfig, ReplayFractions

FORMAT_VERSION = 1
_FLAG_KEYS = ("is_first", "is_last", "is_terminal")
_SHARES = ("uniform", "recency", "online")
# DreamerV3's replay.recexp: recency weight of a window of age a is 1 / (a + 1) ** exponent.
RECENCY_EXPONENT = 1.0


class ReplayError(RuntimeError):
    """A replay file is missing, corrupt or does not belong to this replay."""


def _encode_json(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)


def _decode_json(array: np.ndarray) -> Any:
    return json.loads(array.tobytes().decode())


def _write_npz(path: Path, arrays: dict[str, np.ndarray], fsync: bool = False) -> None:
    """Write ``arrays`` to ``path`` atomically (temp file + rename); no pickle."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        # A file object stops numpy from appending ``.npz`` to the name.
        with open(tmp, "wb") as f:
            np.savez(f, allow_pickle=False, **arrays)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_MISSING_HINT = "resume from another checkpoint, or pass the run's replay/ folder as directory"


def _read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ReplayError(f"{what} {path} is missing; {_MISSING_HINT}")
    try:
        with np.load(path, allow_pickle=False) as data:
            # Reading every member to its end makes zipfile check its CRC-32.
            return {name: data[name] for name in data.files}
    except Exception as e:  # zipfile, numpy format and OS errors all mean "unreadable"
        raise ReplayError(
            f"{what} {path} is corrupt or unreadable ({type(e).__name__}: {e}); "
            "resume from another checkpoint or start a fresh replay"
        ) from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_fractions(fractions: ReplayFractions | dict[str, float] | None) -> dict[str, float]:
    if fractions is None:
        return {"uniform": 1.0, "recency": 0.0, "online": 0.0}
    if isinstance(fractions, ReplayFractions):
        fractions = {key: getattr(fractions, key) for key in _SHARES}
    if set(fractions) - set(_SHARES):
        raise ValueError(
            f"replay fractions: unknown keys {sorted(set(fractions) - set(_SHARES))}; "
            f"use {', '.join(_SHARES)}"
        )
    shares = {key: float(fractions.get(key, 0.0)) for key in _SHARES}
    if (
        any(not np.isfinite(v) or v < 0 for v in shares.values())
        or abs(sum(shares.values()) - 1.0) > 1e-6
    ):
        raise ValueError(
            f"replay fractions must be >= 0 and sum to 1, got {shares}; fix replay.fractions"
        )
    return shares


def _as_numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point():
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)


def _shape_text(shapes: dict[str, tuple[int, ...]]) -> str:
    return "{" + ", ".join(f"{k}: {list(s)}" for k, s in shapes.items()) + "}"


class SequenceReplay:
    """FIFO replay of ``N`` env streams; samples windows of consecutive steps of one stream.

    ``capacity`` is in steps over all streams: each stream keeps its newest ``capacity // N``
    steps. ``chunk_size`` is clamped to that per-stream capacity.

    ``fractions`` (``{"uniform", "recency", "online"}`` shares summing to 1, or a
    ``ReplayFractions``) and ``context`` (0 or 1) are described in the module docstring.

    Shapes:
        add:    every value ``[N, ...]`` (one step of each stream); ``is_first`` required.
        sample: every value ``[B, T, ...]``; ``is_*`` and ``reward`` float32, others as stored.
            With ``context=1`` also ``replay_index`` int64 ``[B, 2]`` (stream, start time),
            ``context_valid`` float32 ``[B]`` and, once latents were written, ``context/<key>``
            float32 ``[B, ...]``.
        update_latents: ``index`` int ``[B, 2]``, every latent ``[B, T, ...]``.
    """

    def __init__(
        self,
        capacity: int,
        batch_size: int,
        batch_length: int,
        chunk_size: int = 1024,
        seed: int = 0,
        directory: str | Path | None = None,
        fractions: ReplayFractions | dict[str, float] | None = None,
        context: int = 0,
    ) -> None:
        for name, value in [
            ("capacity", capacity),
            ("batch_size", batch_size),
            ("batch_length", batch_length),
            ("chunk_size", chunk_size),
        ]:
            if int(value) < 1:
                raise ValueError(f"replay {name} must be >= 1, got {value}")
        if context not in (0, 1):
            raise ValueError(f"replay context must be 0 or 1, got {context!r}")
        self.capacity = int(capacity)
        self.batch_size = int(batch_size)
        self.batch_length = int(batch_length)
        self.chunk_size = int(chunk_size)
        self.context = int(context)
        self.fractions = _check_fractions(fractions)
        self.directory = Path(directory) if directory is not None else None
        self._rng = np.random.default_rng(seed)
        self._recency_cdf = np.zeros(0)  # cumulative recency weights over ages, cached
        self._reset()

    @classmethod
    def from_config(
        cls, cfg: ReplayConfig, seed: int = 0, directory: str | Path | None = None
    ) -> SequenceReplay:
        """The replay a run's ``replay`` section describes; no chunk files when ``cfg.save`` is off."""
        return cls(
            capacity=cfg.capacity,
            batch_size=cfg.batch_size,
            batch_length=cfg.batch_length,
            chunk_size=cfg.chunk_size,
            seed=seed,
            directory=directory if cfg.save else None,
            fractions=cfg.fractions,
            context=cfg.context,
        )

    def _reset(self) -> None:
        self._specs: dict[str, tuple[np.dtype, tuple[int, ...]]] | None = None
        self._data: dict[str, np.ndarray] = {}
        self._num_streams = 0
        self._slots = 0  # per-stream capacity C
        self._chunk = self.chunk_size  # effective chunk size (<= C)
        self._written = 0  # per-stream steps ever added
        self._start = 0  # per-stream time of the oldest valid step
        self._chunk_uids: dict[int, int] = {}  # chunk index -> id, for chunks still in the ring
        self._unsynced: list[Path] = []
        self._delete_from = 0  # lowest chunk index whose files may still exist on disk
        # Times [_disk_first, _disk_end) are in chunk files written by this lineage, no gaps.
        self._disk_first = 0
        self._disk_end = 0
        # The online queue: the next window handed out starts at this time, in this stream.
        self._online_time = self.context
        self._online_stream = 0
        # Latents written by update_latents: key -> float32 [N, C, ...], and which steps hold one.
        self._latents: dict[str, np.ndarray] = {}
        self._latent_valid = np.zeros((0, 0), dtype=bool)

    # ---------------------------------------------------------------------------------
    # Adding
    # ---------------------------------------------------------------------------------

    @property
    def num_streams(self) -> int:
        """``N``, fixed by the first ``add`` (0 before)."""
        return self._num_streams

    @property
    def inserted(self) -> int:
        """Steps ever added, over all streams (evicted ones included)."""
        return self._written * self._num_streams

    def __len__(self) -> int:
        """Steps currently stored, over all streams."""
        return (self._written - self._start) * self._num_streams

    def _normalize(self, step: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(step, dict) or "is_first" not in step:
            raise ValueError("replay.add: the step needs an 'is_first' [N] bool array")
        arrays = {}
        for key, value in step.items():
            array = np.asarray(value)
            if key in _FLAG_KEYS:
                array = array.astype(bool, copy=False)
            elif key == "reward":
                array = array.astype(np.float32, copy=False)
            if array.ndim == 0:
                raise ValueError(
                    f"replay.add: '{key}' is a scalar; every value needs a leading env dim [N, ...]"
                )
            if array.dtype.kind not in "biuf":
                raise ValueError(
                    f"replay.add: '{key}' has dtype {array.dtype}; store bool, int, uint or float"
                )
            arrays[key] = array
        return arrays

    def _allocate(self, specs: dict[str, tuple[np.dtype, tuple[int, ...]]], n: int) -> None:
        if n < 1:
            raise ValueError("replay.add: the leading env dim N must be >= 1")
        if self.capacity < n:
            raise ValueError(
                f"replay capacity {self.capacity} is smaller than the {n} env streams; "
                "raise replay.capacity"
            )
        self._specs = specs
        self._num_streams = n
        self._slots = self.capacity // n
        # A chunk must fit in the ring to be written whole before its first step is overwritten.
        self._chunk = min(self.chunk_size, self._slots)
        self._data = {k: np.zeros((n, self._slots, *s), dtype=d) for k, (d, s) in specs.items()}

    def _check(self, arrays: dict[str, np.ndarray]) -> None:
        assert self._specs is not None
        if set(arrays) != set(self._specs):
            missing = sorted(set(self._specs) - set(arrays))
            extra = sorted(set(arrays) - set(self._specs))
            raise ValueError(
                f"replay.add: keys changed since the first step (missing {missing}, new {extra}); "
                "add the same keys every step"
            )
        n = self._num_streams
        for key, array in arrays.items():
            dtype, shape = self._specs[key]
            if array.shape[0] != n:
                raise ValueError(
                    f"replay.add: '{key}' has {array.shape[0]} env streams, the replay holds {n}; "
                    "keep num_envs fixed or use a new replay"
                )
            if array.shape[1:] != shape or array.dtype != dtype:
                raise ValueError(
                    f"replay.add: '{key}' is {array.dtype}{list(array.shape)}, expected "
                    f"{dtype}{[n, *shape]} as in the first step; keep shapes and dtypes fixed"
                )

    def add(self, step: dict[str, np.ndarray]) -> None:
        """Append one step of every stream; evicts each stream's oldest step once full.

        Shapes: every value ``[N, ...]``: observations, ``action`` ``[N, A]`` or ``[N]``,
        ``reward`` ``[N]`` (stored float32), ``is_first/is_last/is_terminal`` ``[N]`` (bool).
        """
        arrays = self._normalize(step)
        if self._specs is None:
            ns = {a.shape[0] for a in arrays.values()}
            if len(ns) != 1:
                raise ValueError(
                    f"replay.add: values disagree on the env dim N ({sorted(ns)}); "
                    "every value needs the same leading dim"
                )
            self._allocate({k: (a.dtype, a.shape[1:]) for k, a in arrays.items()}, ns.pop())
        self._check(arrays)
        slot = self._written % self._slots
        for key, buffer in self._data.items():
            buffer[:, slot] = arrays[key]
        if self._latents:  # the slot's old step is gone, and its latent with it
            self._latent_valid[:, slot] = False
            for buffer in self._latents.values():
                buffer[:, slot] = 0.0
        self._written += 1
        self._start = max(self._start, self._written - self._slots)
        if self.directory is not None and self._written % self._chunk == 0:
            self._flush_chunk(self._written // self._chunk - 1)

    # ---------------------------------------------------------------------------------
    # Chunk files
    # ---------------------------------------------------------------------------------

    def chunk_path(self, stream: int, chunk: int) -> Path:
        """Where the full chunk ``chunk`` of stream ``stream`` is written."""
        assert self.directory is not None
        return self.directory / f"stream{stream:03d}_chunk{chunk:08d}.npz"

    def _times_to_slots(self, begin: int, end: int) -> np.ndarray:
        return np.arange(begin, end) % self._slots

    def _chunk_meta(self, stream: int, chunk: int, uid: int) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "stream": stream,
            "chunk": chunk,
            "chunk_size": self._chunk,
            "uid": uid,
            "keys": self._spec_list(),
        }

    def _flush_chunk(self, chunk: int) -> None:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        uid = secrets.randbits(62)
        first = chunk * self._chunk % self._slots
        if first + self._chunk <= self._slots:  # no wrap: write views, no gather copy
            slots: slice | np.ndarray = slice(first, first + self._chunk)
        else:
            slots = self._times_to_slots(chunk * self._chunk, (chunk + 1) * self._chunk)
        for s in range(self._num_streams):
            arrays = {f"data_{i}": self._data[k][s, slots] for i, k in enumerate(self._data)}
            arrays["meta"] = _encode_json(self._chunk_meta(s, chunk, uid))
            path = self.chunk_path(s, chunk)
            _write_npz(path, arrays)
            # fsync is deferred to save(): a checkpoint must not reference unsynced chunks,
            # but syncing every chunk here would stall collection.
            self._unsynced.append(path)
        self._chunk_uids[chunk] = uid
        if chunk * self._chunk != self._disk_end:  # a gap (e.g. after loading a dir-less state)
            self._disk_first = chunk * self._chunk
        self._disk_end = (chunk + 1) * self._chunk
        for c in [c for c in self._chunk_uids if (c + 1) * self._chunk <= self._start]:
            del self._chunk_uids[c]
        # Keep a margin of 2 chunks past the ring so a slightly older checkpoint still loads.
        horizon = self._written - self._slots - 2 * self._chunk
        while (self._delete_from + 1) * self._chunk <= horizon:
            for s in range(self._num_streams):
                self.chunk_path(s, self._delete_from).unlink(missing_ok=True)
            self._delete_from += 1

    # ---------------------------------------------------------------------------------
    # Sampling
    # ---------------------------------------------------------------------------------

    def can_sample(self, batch_length: int | None = None) -> bool:
        """Whether every stream holds at least one window of ``batch_length`` steps (plus the
        step before it with ``context=1``)."""
        length = self.batch_length if batch_length is None else batch_length
        return self._num_streams > 0 and self._written - self._start >= length + self.context

    def sample(
        self,
        batch_size: int | None = None,
        batch_length: int | None = None,
        *,
        online: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``B`` windows of ``T`` consecutive steps, drawn by ``fractions`` (module docstring).

        The online queue serves only windows of the configured ``batch_length``: a sample of
        another length, or with ``online=False`` (reports, evals), leaves the queue untouched
        and draws its online share like the other windows.

        Shapes: every value ``[B, T, ...]``; ``is_*`` and ``reward`` float32, pixels uint8,
        actions as stored. With ``context=1`` also ``replay_index`` int64 ``[B, 2]`` (stream,
        start time of each window), ``context_valid`` float32 ``[B]`` (1 where the step before
        the window has a latent written by ``update_latents``) and, for every latent key
        written so far, ``context/<key>`` float32 ``[B, ...]``: that step's latent (0 where not
        valid). Before any latent was written there are no ``context/*`` keys.
        """
        b = self.batch_size if batch_size is None else int(batch_size)
        t = self.batch_length if batch_length is None else int(batch_length)
        if self._num_streams and t + self.context > self._slots:
            what = f"batch_length {t}" + (" + context 1" if self.context else "")
            raise ValueError(
                f"replay.sample: {what} exceeds the {self._slots} steps each stream "
                f"keeps (capacity {self.capacity} / {self._num_streams} streams); raise capacity"
            )
        if not self.can_sample(t):
            raise ValueError(
                f"replay.sample: each stream holds {self._written - self._start} steps, windows "
                f"need {t + self.context}; collect more steps first (check can_sample())"
            )
        stream, start = self._pick(b, t, online and t == self.batch_length)
        slots = (start[:, None] + np.arange(t)) % self._slots
        index = stream[:, None] * self._slots + slots  # [B, T] into the flattened [N*C, ...]
        batch = {}
        for key, buffer in self._data.items():
            # np.take on a flat view beats fancy indexing of [N, C] by ~1.5x for pixels.
            flat = buffer.reshape(-1, *buffer.shape[2:])
            window = np.take(flat, index, axis=0)
            if key in _FLAG_KEYS:
                window = window.astype(np.float32)
            batch[key] = torch.from_numpy(window)
        if self.context:
            batch["replay_index"] = torch.from_numpy(np.stack([stream, start], 1).astype(np.int64))
            before = stream * self._slots + (start - 1) % self._slots  # [B]
            if self._latents:
                for key, buffer in self._latents.items():
                    flat = buffer.reshape(-1, *buffer.shape[2:])
                    batch[f"context/{key}"] = torch.from_numpy(np.take(flat, before, axis=0))
                valid = self._latent_valid.reshape(-1)[before].astype(np.float32)
            else:
                valid = np.zeros(b, dtype=np.float32)
            batch["context_valid"] = torch.from_numpy(valid)
        return batch

    def _pick(self, b: int, t: int, use_queue: bool) -> tuple[np.ndarray, np.ndarray]:
        """Streams and start times ``[b]`` of the windows of one batch (online ones first)."""
        first = self._start + self.context  # the oldest start with a stored step before it
        starts_per_stream = self._written - first - t + 1
        total = self._num_streams * starts_per_stream
        shares = self.fractions
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        rest = b
        if shares["online"] > 0:
            wanted = shares["online"] * b
            count = int(wanted)
            if wanted > count and self._rng.random() < wanted - count:
                count += 1  # stochastic rounding: `online * b` windows on average
            if use_queue and count:
                parts.append(self._take_online(count, t, first))
                rest -= len(parts[0][0])
        if rest:
            if shares["recency"] == 0:
                # One draw over all (stream, start) pairs: every stream holds the same times.
                pick = self._rng.integers(0, total, size=rest)
                stream, offset = pick // starts_per_stream, pick % starts_per_stream
            elif shares["uniform"] == 0:
                stream, offset = self._recency(rest, total, t)
            else:
                recent = self._rng.random(rest) < shares["recency"] / (
                    shares["recency"] + shares["uniform"]
                )
                pick = self._rng.integers(0, total, size=rest)
                stream, offset = pick // starts_per_stream, pick % starts_per_stream
                r_stream, r_offset = self._recency(rest, total, t)
                stream = np.where(recent, r_stream, stream)
                offset = np.where(recent, r_offset, offset)
            parts.append((stream, first + offset))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _take_online(self, count: int, t: int, first: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``count`` windows from the online queue (fewer when it holds fewer)."""
        n = self._num_streams
        if self._online_time < first:  # evicted before its turn: go on from the oldest kept
            self._online_time, self._online_stream = first, 0
        blocks = max(0, self._written - self._online_time) // t  # complete windows per stream
        taken = min(count, max(0, blocks * n - self._online_stream))
        j = self._online_stream + np.arange(taken)
        stream, start = j % n, self._online_time + (j // n) * t
        end = self._online_stream + taken
        self._online_time += (end // n) * t
        self._online_stream = end % n
        return stream, start

    def _recency(self, count: int, total: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` windows of ``t`` steps by recency: streams and start offsets from the
        oldest start, among the ``total`` windows held.

        Windows are ordered by start time, then stream; age 0 is the newest. Ages are drawn
        over the windows of a full replay and scaled to the ``total`` held (DreamerV3's rule).
        """
        n = self._num_streams
        full = n * (self._slots - self.context - t + 1)  # windows of a full replay
        if len(self._recency_cdf) != full:
            weights = 1.0 / np.arange(1, full + 1, dtype=np.float64) ** RECENCY_EXPONENT
            self._recency_cdf = np.cumsum(weights)
        cdf = self._recency_cdf
        age = np.searchsorted(cdf, self._rng.random(count) * cdf[-1], side="right")
        age = np.minimum(age, full - 1)
        if total < full:
            age = age * total // full
        item = total - 1 - age
        return item % n, item // n

    # ---------------------------------------------------------------------------------
    # Latents (replay context)
    # ---------------------------------------------------------------------------------

    def update_latents(
        self, index: np.ndarray | torch.Tensor, latents: dict[str, np.ndarray | torch.Tensor]
    ) -> None:
        """Store the latents of every step of sampled windows, for later windows' context.

        ``index`` is a batch's ``replay_index`` (stream, start time per window); ``latents``
        holds per key the latent of each of the ``T`` steps of each window. Buffers of float32
        ``[N, C, ...]`` per key are allocated at the first call (memory: capacity x latent size
        x 4 bytes); later calls must bring the same keys and shapes. Steps evicted since the
        sample (the ring wrapped past them) are skipped. Where windows of one call overlap,
        one of them is kept.

        Shapes: ``index`` int ``[B, 2]``; every latent ``[B, T, ...]`` (cast to float32).
        """
        index = _as_numpy(index)
        arrays = {
            key: _as_numpy(value).astype(np.float32, copy=False) for key, value in latents.items()
        }
        if index.ndim != 2 or index.shape[1] != 2 or index.dtype.kind not in "iu":
            raise ValueError(
                f"replay.update_latents: index must be int [B, 2] (stream, start), got "
                f"{index.dtype}{list(index.shape)}; pass the batch's replay_index"
            )
        b = index.shape[0]
        if not arrays or any(a.ndim < 2 or a.shape[0] != b for a in arrays.values()):
            shapes = {k: list(a.shape) for k, a in arrays.items()}
            raise ValueError(
                f"replay.update_latents: every latent must be [B={b}, T, ...], got {shapes}"
            )
        t = next(iter(arrays.values())).shape[1]
        shapes = {key: a.shape[2:] for key, a in arrays.items()}
        if any(a.shape[1] != t for a in arrays.values()):
            raise ValueError(
                f"replay.update_latents: latents disagree on T: "
                f"{ {k: a.shape[1] for k, a in arrays.items()} }; pass whole windows"
            )
        if self._latents:
            expected = {key: buffer.shape[2:] for key, buffer in self._latents.items()}
            if shapes != expected:
                raise ValueError(
                    f"replay.update_latents: latents {_shape_text(shapes)} differ from the first "
                    f"call's {_shape_text(expected)}; write the same keys and shapes every time"
                )
        stream, start = index[:, 0].astype(np.int64), index[:, 1].astype(np.int64)
        n = self._num_streams
        if (
            n == 0
            or (stream < 0).any()
            or (stream >= n).any()
            or (start < 0).any()
            or ((start + t > self._written).any())
        ):
            raise ValueError(
                f"replay.update_latents: index holds windows this replay never sampled (streams "
                f"0..{n - 1}, times < {self._written}, T={t}); pass the batch's replay_index"
            )
        if not self._latents:
            self._latents = {
                key: np.zeros((n, self._slots, *shape), dtype=np.float32)
                for key, shape in shapes.items()
            }
            self._latent_valid = np.zeros((n, self._slots), dtype=bool)
        times = start[:, None] + np.arange(t)  # [B, T]
        kept = times >= self._start  # overwritten steps belong to newer data now
        flat_index = (stream[:, None] * self._slots + times % self._slots)[kept]
        for key, buffer in self._latents.items():
            buffer.reshape(-1, *buffer.shape[2:])[flat_index] = arrays[key][kept]
        self._latent_valid.reshape(-1)[flat_index] = True

    def stats(self) -> dict[str, float]:
        """Replay metrics for the logger's ``train/`` namespace."""
        return {
            "train/replay_steps": float(len(self)),
            "train/replay_inserted": float(self.inserted),
            "train/replay_memory_mb": self.memory_bytes() / 2**20,
        }

    def memory_bytes(self) -> int:
        """Bytes of the preallocated step storage (fixed after the first add), plus the latent
        buffers (fixed after the first ``update_latents``)."""
        latents = sum(buffer.nbytes for buffer in self._latents.values())
        if self._latents:
            latents += self._latent_valid.nbytes
        return int(sum(buffer.nbytes for buffer in self._data.values()) + latents)

    # ---------------------------------------------------------------------------------
    # Persistence
    # ---------------------------------------------------------------------------------

    def _spec_list(self) -> list[list[Any]]:
        assert self._specs is not None
        return [[k, d.str, list(s)] for k, (d, s) in self._specs.items()]

    def save(self, path: str | Path) -> Path:
        """Write the state not already in chunk files (tail, counters, RNG, online-queue
        position, and the latents of the tail's steps) to the file ``path``.

        Without a ``directory`` every stored step and its latent goes into ``path``. Returns
        ``path``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._unsynced:
            for chunk_file in self._unsynced:
                if chunk_file.exists():  # may already be deleted as too old
                    fd = os.open(chunk_file, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            assert self.directory is not None
            _fsync_dir(self.directory)
            self._unsynced.clear()
        on_disk_until = self._start
        if self.directory is not None and self._disk_first <= self._start:
            on_disk_until = max(self._start, self._disk_end)
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "capacity": self.capacity,
            "num_streams": self._num_streams,
            "slots": self._slots,
            "chunk_size": self._chunk,
            "written": self._written,
            "start": self._start,
            "tail_from": on_disk_until,
            "keys": self._spec_list() if self._specs is not None else None,
            "chunk_uids": {
                str(c): u
                for c, u in self._chunk_uids.items()
                if (c + 1) * self._chunk > self._start
            },
            "rng": self._rng.bit_generator.state,
            "online": [self._online_time, self._online_stream],
            "latent_keys": [[k, list(b.shape[2:])] for k, b in self._latents.items()],
        }
        arrays = {"meta": _encode_json(meta)}
        slots = self._times_to_slots(on_disk_until, self._written) if self._slots else None
        for i, buffer in enumerate(self._data.values()):
            arrays[f"tail_{i}"] = buffer[:, slots]
        if self._latents:  # the latents of the same steps as the tail (module docstring)
            for i, buffer in enumerate(self._latents.values()):
                arrays[f"latent_{i}"] = buffer[:, slots]
            arrays["latent_valid"] = self._latent_valid[:, slots]
        _write_npz(path, arrays, fsync=True)
        return path

    def load(self, path: str | Path) -> None:
        """Restore the state ``save(path)`` wrote (plus its chunk files from ``directory``).

        Replaces everything this replay holds. Chunks deleted meanwhile (the run went on far
        past this checkpoint) are skipped with a warning; any other missing or corrupt file
        raises ``ReplayError`` naming it. Latents come back for the steps the state file holds;
        steps restored from chunk files have none (``context_valid`` 0) until written again.
        """
        path = Path(path)
        state = _read_npz(path, "replay state")
        try:
            meta = _decode_json(state["meta"])
            version = int(meta["format_version"])
        except Exception as e:
            raise ReplayError(
                f"replay state {path} has no valid metadata ({e}); it is corrupt"
            ) from e
        if version > FORMAT_VERSION:
            raise ReplayError(
                f"replay state {path} has format_version {version}, written by a newer "
                f"imagine-rl (this one reads {FORMAT_VERSION}); upgrade imagine-rl"
            )
        if meta["capacity"] != self.capacity:
            raise ValueError(
                f"replay state {path} was saved with capacity {meta['capacity']}, this replay has "
                f"{self.capacity}; resume with replay.capacity={meta['capacity']}"
            )
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = meta["rng"]
        except Exception as e:
            raise ReplayError(f"replay state {path} has an unusable RNG state ({e})") from e

        self._reset()
        self._rng = rng
        if meta["keys"] is None:  # saved before the first add
            if "online" in meta:
                self._online_time, self._online_stream = (int(v) for v in meta["online"])
            return
        specs = {k: (np.dtype(d), tuple(s)) for k, d, s in meta["keys"]}
        self._allocate(specs, int(meta["num_streams"]))
        self._chunk = int(meta["chunk_size"])
        written, start, tail_from = int(meta["written"]), int(meta["start"]), int(meta["tail_from"])
        uids = {int(c): int(u) for c, u in meta["chunk_uids"].items()}
        if self._slots != meta["slots"]:
            raise ReplayError(f"replay state {path} is inconsistent (slots); it is corrupt")

        first_kept = self._load_chunks(path, specs, start, tail_from, uids)
        if first_kept > start:
            lost = first_kept - start
            warnings.warn(
                f"replay: {lost} steps per stream ({lost * self._num_streams} total) saved in "
                f"{path} were no longer on disk in {self.directory} (chunk files are deleted "
                f"{self._slots + 2 * self._chunk} steps behind the newest); restored the "
                f"{written - first_kept} newest steps per stream",
                stacklevel=2,
            )
        slots = self._times_to_slots(tail_from, written)
        for i, (key, buffer) in enumerate(self._data.items()):
            tail = state.get(f"tail_{i}")
            dtype, shape = specs[key]
            expected = (self._num_streams, written - tail_from, *shape)
            if tail is None or tail.shape != expected or tail.dtype != dtype:
                raise ReplayError(f"replay state {path} lacks a valid tail for '{key}'; corrupt")
            buffer[:, slots] = tail
        self._written = written
        self._start = first_kept
        self._disk_first = first_kept // self._chunk * self._chunk
        self._disk_end = tail_from
        self._chunk_uids = {c: u for c, u in uids.items() if (c + 1) * self._chunk > first_kept}
        # States from before the online queue: only steps added from now on are online.
        self._online_time, self._online_stream = (int(v) for v in meta.get("online", [written, 0]))
        self._load_latents(path, state, meta.get("latent_keys") or [], slots, written - tail_from)

    def _load_latents(
        self,
        path: Path,
        state: dict[str, np.ndarray],
        keys: list[list[Any]],
        slots: np.ndarray,
        steps: int,
    ) -> None:
        """Restore the latents ``save`` wrote for the tail's ``steps`` (in ``slots``)."""
        if not keys:
            return
        n = self._num_streams
        latents = {k: np.zeros((n, self._slots, *s), dtype=np.float32) for k, s in keys}
        valid = np.zeros((n, self._slots), dtype=bool)
        saved_valid = state.get("latent_valid")
        if saved_valid is None or saved_valid.shape != (n, steps) or saved_valid.dtype != bool:
            raise ReplayError(f"replay state {path} lacks valid latent flags; it is corrupt")
        valid[:, slots] = saved_valid
        for i, (key, buffer) in enumerate(latents.items()):
            saved = state.get(f"latent_{i}")
            if saved is None or saved.shape != (n, steps, *buffer.shape[2:]):
                raise ReplayError(f"replay state {path} lacks a valid latent '{key}'; corrupt")
            buffer[:, slots] = saved
        self._latents, self._latent_valid = latents, valid

    def _load_chunks(
        self,
        path: Path,
        specs: dict[str, tuple[np.dtype, tuple[int, ...]]],
        start: int,
        tail_from: int,
        uids: dict[int, int],
    ) -> int:
        """Fill the ring with times ``[start, tail_from)`` from chunk files; returns the first
        time restored (``> start`` when the oldest chunks were already deleted)."""
        if tail_from <= start:
            return start
        if self.directory is None:
            raise ReplayError(
                f"replay state {path} keeps older steps in chunk files; pass the run's replay/ "
                "folder as directory"
            )
        k = self._chunk
        first_kept = None
        for chunk in range(start // k, -(-tail_from // k)):
            if first_kept is None and not self.chunk_path(0, chunk).exists():
                continue  # deleted as too old: the lost prefix
            begin, end = max(start, chunk * k), min(tail_from, (chunk + 1) * k)
            first_kept = begin if first_kept is None else first_kept
            slots = self._times_to_slots(begin, end)
            for s in range(self._num_streams):
                file = self.chunk_path(s, chunk)
                arrays = _read_npz(file, "replay chunk")
                try:
                    meta = _decode_json(arrays["meta"])
                except Exception as e:
                    raise ReplayError(f"replay chunk {file} has no valid metadata; corrupt") from e
                if meta.get("uid") != uids.get(chunk):
                    raise ReplayError(
                        f"replay chunk {file} was rewritten after {path} was saved (a run resumed "
                        "from an earlier checkpoint?); its steps differ, so resume from a newer "
                        "checkpoint or a fresh replay"
                    )
                if meta.get("chunk_size") != k or meta.get("keys") != self._spec_list():
                    raise ReplayError(f"replay chunk {file} does not match {path}; corrupt")
                for i, (key, buffer) in enumerate(self._data.items()):
                    data = arrays.get(f"data_{i}")
                    dtype, shape = specs[key]
                    if data is None or data.shape != (k, *shape) or data.dtype != dtype:
                        raise ReplayError(f"replay chunk {file} lacks valid '{key}' data; corrupt")
                    buffer[s, slots] = data[begin - chunk * k : end - chunk * k]
        return tail_from if first_kept is None else first_kept


def fill_with_random_policy(replay: SequenceReplay, env: Any, seed: int) -> SequenceReplay:
    """Fill ``replay`` to its capacity with uniformly random actions (seeded) in ``env``.

    ``env`` is a gymnasium vector env (NEXT_STEP autoreset); its spaces give the shapes. Steps
    are recorded by ``runtime.collect.StepRecorder``, the rule every producer of replay data
    follows. For benchmarks and estimates that need batches with the real env's shapes and
    value ranges. Returns ``replay``; does not close ``env``.
    """
    collector = Collector(env, RandomPolicy(env.action_space, seed))
    collector.reset(seed=seed)
    for _ in range(-(-replay.capacity // env.num_envs)):
        replay.add(collector.step().step)
    return replay
