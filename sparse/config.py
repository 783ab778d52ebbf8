"""``SparseConfig``: what to sparsify, how dense, and how the topology evolves.

``SparseSettings`` holds what a user chooses; ``SparseConfig`` adds what the caller derives from
its run (``total_steps``, ``seed``, ``fast_path_batch``). The run config's ``sparse`` section
extends ``SparseSettings`` (``runtime.config.SparseConfig``), so every field is defined once,
here; ``metadata["min"]`` is the lower bound the run config checks, ``metadata["doc"]`` its
one-line help.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

METHODS = ("static", "set", "rigl")
DISTRIBUTIONS = ("uniform", "erk")
BLOCKS = (1, 4, 8, 16)
DROP_SCHEDULES = ("cosine", "constant")
FAST_PATHS = ("auto", "on", "off")


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"doc": text, **extra}


@dataclass
class SparseSettings:
    """Dynamic-sparse training settings a user chooses (see ``SparseConfig`` for the whole).

    density:        fraction of weights kept, over all sparsified layers together.
    method:         ``static`` (fixed random mask), ``set`` (drop by magnitude, regrow at random)
                    or ``rigl`` (drop by magnitude, regrow by dense-gradient magnitude).
    distribution:   how the global budget is split over layers: ``uniform`` (every layer at
                    ``density``) or ``erk`` (Erdos-Renyi-Kernel: density ~ sum(dims)/prod(dims)).
    block:          side of the square blocks the masks are made of (1, 4, 8 or 16). Linear
                    weights are tiled over (out, in); conv weights over (out, in) separately at
                    every kernel position (a block is ``b`` output x ``b`` input channels at one
                    (kh, kw) tap).
    balanced:       every block-row (``block`` consecutive outputs; one output for block=1)
                    keeps the same number of blocks. Needed for the compressed fast path.
    drop_fraction:  fraction of a layer's active blocks replaced at an update (at step 0 of the
                    schedule).
    drop_schedule:  ``cosine`` decays the drop fraction to 0 at ``stop_fraction * total_steps``;
                    ``constant`` keeps it.
    update_every:   optimizer steps between topology updates (delta T).
    stop_fraction:  no updates at or after ``stop_fraction * total_steps``.
    skip:           name patterns of layers kept dense: fnmatch (``encoder.0``, ``*.head*``) or
                    Python regex (full match), tried against the module name and the weight name
                    (``encoder.0`` and ``encoder.0.weight``).
    include:        extra parameters to sparsify by full name pattern (any >=2-D parameter read
                    as an attribute at forward time); ``nn.Linear``/``nn.Conv*`` weights are
                    always candidates.
    fast_path:      ``auto`` runs a balanced ``nn.Linear`` through the compressed kernel when a
                    micro-benchmark at ``fast_path_batch`` rows says it is faster; ``on`` always
                    where possible; ``off`` never. ``True``/``False`` mean on/off (YAML reads a
                    bare on/off as a bool).
    """

    density: float = field(
        default=0.1, metadata=_doc("fraction of weights kept over all sparsified layers, (0, 1]")
    )
    method: Literal["static", "set", "rigl"] = field(
        default="rigl",
        metadata=_doc("static: fixed random mask; set: regrow at random; rigl: by gradient"),
    )
    distribution: Literal["uniform", "erk"] = field(
        default="erk", metadata=_doc("budget split over layers: uniform, or Erdos-Renyi-Kernel")
    )
    block: int = field(default=1, metadata=_doc("mask tiles of block x block: 1, 4, 8 or 16"))
    balanced: bool = field(
        default=False, metadata=_doc("same blocks in every block-row (the fast path needs it)")
    )
    drop_fraction: float = field(
        default=0.3, metadata=_doc("fraction of active blocks replaced per update", min=0)
    )
    drop_schedule: Literal["cosine", "constant"] = field(
        default="cosine", metadata=_doc("cosine decays the drop fraction to 0 at stop_fraction")
    )
    update_every: int = field(
        default=100, metadata=_doc("optimizer steps between topology updates", min=1)
    )
    stop_fraction: float = field(
        default=0.75, metadata=_doc("no topology updates after this fraction of steps", min=0)
    )
    skip: list[str] = field(
        default_factory=list, metadata=_doc("name patterns of layers kept dense")
    )
    include: list[str] = field(
        default_factory=list, metadata=_doc("extra >=2-D parameters to sparsify, by pattern")
    )
    fast_path: Literal["auto", "on", "off", True, False] = field(
        default="auto", metadata=_doc("compressed kernel for balanced layers: auto, on, off")
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> SparseSettings:
        """Check every value; raises ``ValueError`` naming the ``sparse.<key>``."""

        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"sparse.{key}: {msg}")

        if self.fast_path is True or self.fast_path is False:
            self.fast_path = "on" if self.fast_path else "off"
        if not (isinstance(self.density, (int, float)) and 0.0 < float(self.density) <= 1.0):
            raise bad("density", f"must be in (0, 1], got {self.density!r}")
        for key, allowed in (
            ("method", METHODS),
            ("distribution", DISTRIBUTIONS),
            ("drop_schedule", DROP_SCHEDULES),
            ("fast_path", FAST_PATHS),
        ):
            if getattr(self, key) not in allowed:
                raise bad(key, f"must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        if self.block not in BLOCKS:
            raise bad("block", f"must be one of {BLOCKS}, got {self.block!r}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise bad("drop_fraction", f"must be in [0, 1], got {self.drop_fraction!r}")
        if not 0.0 <= self.stop_fraction <= 1.0:
            raise bad("stop_fraction", f"must be in [0, 1], got {self.stop_fraction!r}")
        if not isinstance(self.update_every, int) or self.update_every < 1:
            raise bad("update_every", f"must be an integer >= 1, got {self.update_every!r}")
        for key in ("skip", "include"):
            value = getattr(self, key)
            if value is None and key == "skip":
                continue  # the run config's "the agent's default" (runtime.config.SparseConfig)
            if isinstance(value, str):
                setattr(self, key, [value])
            elif not all(isinstance(p, str) for p in value):
                raise bad(key, f"must be a list of name patterns, got {value!r}")
            else:
                setattr(self, key, list(value))
        return self


@dataclass
class SparseConfig(SparseSettings):
    """Dynamic-sparse training: ``SparseSettings`` plus what the caller derives from its run.

    total_steps:     optimizer steps of the whole run (for the schedule).
    seed:            seeds the masks and SET's regrowth (independent of the global torch RNG).
    fast_path_batch: rows (batch x time) the fast path's micro-benchmark uses.
    """

    total_steps: int = 100_000
    seed: int = 0
    fast_path_batch: int = 256

    def validate(self) -> SparseConfig:
        super().validate()
        if self.skip is None:
            raise ValueError("sparse.skip: must be a list of name patterns, got None")
        for key in ("total_steps", "fast_path_batch"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"sparse.{key}: must be an integer >= 1, got {value!r}")
        return self

    @property
    def stop_step(self) -> int:
        """First optimizer step at which no more topology updates happen."""
        return int(math.floor(self.stop_fraction * self.total_steps))

    def is_update_step(self, step: int) -> bool:
        """Whether the topology is updated right after optimizer step ``step`` (1-based)."""
        return (
            self.method != "static"
            and step > 0
            and step % self.update_every == 0
            and step < self.stop_step
        )

    def drop_fraction_at(self, step: int) -> float:
        """Drop fraction of the update after optimizer step ``step``.

        cosine: ``drop_fraction / 2 * (1 + cos(pi * step / stop_step))``; 0 from ``stop_step``.
        """
        stop = self.stop_step
        if step >= stop:
            return 0.0
        if self.drop_schedule == "constant":
            return float(self.drop_fraction)
        return float(self.drop_fraction) * 0.5 * (1.0 + math.cos(math.pi * step / stop))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Any, **overrides: Any) -> SparseConfig:
        """Build from a mapping or a dataclass with these field names (``enabled`` and other
        unknown keys of the run config are ignored only if listed in ``IGNORED_KEYS``)."""
        if dataclasses.is_dataclass(data) and not isinstance(data, type):
            data = dataclasses.asdict(data)
        values = dict(data)
        values.update(overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - IGNORED_KEYS)
        if unknown:
            raise ValueError(f"sparse: unknown key(s) {', '.join(unknown)}; valid: {sorted(names)}")
        return cls(**{k: v for k, v in values.items() if k in names})


IGNORED_KEYS = frozenset({"enabled"})
