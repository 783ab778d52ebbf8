"""Device constants of the simulated IPUs, each tagged with where it comes from.

Tags: ``sourced`` (a vendor figure: Graphcore product pages and announcements for the GC2
(2018), GC200 / IPU-M2000 (2020) and Bow IPU (2022), as also quoted in the project's issue 7),
``derived`` (computed from sourced figures; the formula is in ``source``) and ``assumed`` (our
modelling choice, with the reason). Nothing here was measured on an IPU.

The peak rates are per IPU: fp16 is the AMP (matrix unit) peak with fp16 accumulation; the GC200
figures imply 128 fp16 FLOPs per tile per cycle (250e12 / (1472 x 1.325e9) ~ 128) and the GC2's
64 (124.5e12 / (1216 x 1.6e9) ~ 64).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

Tag = Literal["sourced", "derived", "assumed"]
KIB = 1024


@dataclass(frozen=True)
class Constant:
    """One device number: value, unit, tag and a short source or reason."""

    value: float | tuple[int, ...]
    unit: str
    tag: Tag
    source: str


@dataclass(frozen=True)
class IPUPreset:
    """Constants of one IPU (per chip). See ``constants()`` for the tagged table."""

    name: str
    description: str
    tiles: Constant
    tile_memory: Constant  # bytes of SRAM per tile
    clock: Constant  # Hz
    fp16_flops: Constant  # FLOP/s, AMP peak
    fp32_flops: Constant  # FLOP/s, AMP peak
    memory_bandwidth: Constant  # B/s, all tiles' SRAM together
    exchange_bandwidth: Constant  # B/s, tile-to-tile on one chip
    link_bandwidth: Constant  # B/s, IPU-Links chip to chip
    host_bandwidth: Constant  # B/s, host to IPU
    sync_cycles: Constant  # cycles per BSP superstep (one sync + exchange phase start)
    usable_memory: Constant  # fraction of SRAM left for tensors after code and buffers
    sparse_block_sizes: Constant  # block sides the block-sparse matmul supports
    sparse_fp32_max_block: Constant
    sparse_index_bytes: Constant  # metadata bytes per non-zero block

    @property
    def memory_bytes(self) -> float:
        """SRAM per IPU (tiles x tile memory)."""
        return self.tiles.value * self.tile_memory.value

    @property
    def budget_bytes(self) -> float:
        """Bytes of tensors one IPU may hold: SRAM x the usable fraction (assumed)."""
        return self.memory_bytes * self.usable_memory.value

    def peak_flops(self, half: bool) -> float:
        return self.fp16_flops.value if half else self.fp32_flops.value

    def constants(self) -> dict[str, Constant]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Constant)
        }

    def table(self) -> list[dict[str, object]]:
        """Rows ``{name, value, unit, tag, source}`` for reports."""
        return [
            {"name": k, "value": c.value, "unit": c.unit, "tag": c.tag, "source": c.source}
            for k, c in self.constants().items()
        ]


def _c(value: float | tuple[int, ...], unit: str, tag: Tag, source: str) -> Constant:
    return Constant(value if isinstance(value, tuple) else float(value), unit, tag, source)


GC200 = "Graphcore GC200 / IPU-M2000 product page (2020)"
BOW = "Graphcore Bow IPU announcement (2022)"
GC2 = "Graphcore GC2 (Colossus Mk1) product page (2018)"

# Shared modelling choices (assumed), the same for every preset.
_SYNC = _c(
    150,
    "cycles",
    "assumed",
    "one chip-wide BSP sync per op; our guess, not a vendor or measured figure",
)
_USABLE = _c(
    0.75,
    "fraction",
    "assumed",
    "Poplar needs tile memory for code, vertex state and exchange buffers; we keep 25% for it",
)
_BLOCKS = _c(
    (1, 4, 8, 16),
    "block sides",
    "assumed",
    "block sizes of Graphcore's popsparse block-sparse matmul as listed in issue 7 (1, 4, 8, 16)",
)
_FP32_MAX_BLOCK = _c(8, "block side", "assumed", "issue 7: fp32 block-sparse up to 8x8 blocks")
_INDEX_BYTES = _c(
    4, "bytes/block", "assumed", "row and column index (2 x uint16) per non-zero block"
)


def _ipu2() -> IPUPreset:
    tiles, clock = 1472, 1.325e9
    return IPUPreset(
        name="ipu2",
        description="Graphcore GC200 (Colossus Mk2), as in the IPU-M2000 / IPU-POD systems",
        tiles=_c(tiles, "tiles", "sourced", GC200),
        tile_memory=_c(624 * KIB, "bytes", "sourced", GC200 + ": 624 KiB per tile, ~900 MB"),
        clock=_c(clock, "Hz", "sourced", GC200 + ": ~1.33 GHz"),
        fp16_flops=_c(250e12, "FLOP/s", "sourced", GC200 + ": 250 TFLOP/s fp16"),
        fp32_flops=_c(62.5e12, "FLOP/s", "sourced", GC200 + ": 62.5 TFLOP/s fp32"),
        memory_bandwidth=_c(47.5e12, "B/s", "sourced", GC200 + ": 47.5 TB/s In-Processor-Memory"),
        exchange_bandwidth=_c(8e12, "B/s", "sourced", GC200 + ": 8 TB/s IPU-Exchange"),
        link_bandwidth=_c(320e9, "B/s", "sourced", GC200 + ": 10 IPU-Links, 320 GB/s"),
        host_bandwidth=_c(64e9, "B/s", "sourced", GC200 + ": PCIe Gen4 x16, 64 GB/s"),
        sync_cycles=_SYNC,
        usable_memory=_USABLE,
        sparse_block_sizes=_BLOCKS,
        sparse_fp32_max_block=_FP32_MAX_BLOCK,
        sparse_index_bytes=_INDEX_BYTES,
    )


def _bow() -> IPUPreset:
    base = _ipu2()
    ratio = 1.85e9 / base.clock.value
    scaled = f"derived: GC200 figure x clock ratio 1.85 / 1.325 = {ratio:.3f} (same die)"
    return IPUPreset(
        name="bow",
        description="Graphcore Bow IPU (GC200 die, wafer-on-wafer power delivery, 1.85 GHz)",
        tiles=_c(1472, "tiles", "sourced", BOW + ": same die as GC200"),
        tile_memory=_c(624 * KIB, "bytes", "sourced", BOW + ": same die as GC200"),
        clock=_c(1.85e9, "Hz", "sourced", BOW + ": 1.85 GHz"),
        fp16_flops=_c(350e12, "FLOP/s", "sourced", BOW + ": ~350 TFLOP/s fp16"),
        fp32_flops=_c(base.fp32_flops.value * ratio, "FLOP/s", "derived", scaled),
        memory_bandwidth=_c(base.memory_bandwidth.value * ratio, "B/s", "derived", scaled),
        exchange_bandwidth=_c(base.exchange_bandwidth.value * ratio, "B/s", "derived", scaled),
        link_bandwidth=_c(320e9, "B/s", "assumed", "IPU-Links as on the GC200"),
        host_bandwidth=_c(64e9, "B/s", "assumed", "PCIe Gen4 x16 as on the GC200"),
        sync_cycles=_SYNC,
        usable_memory=_USABLE,
        sparse_block_sizes=_BLOCKS,
        sparse_fp32_max_block=_FP32_MAX_BLOCK,
        sparse_index_bytes=_INDEX_BYTES,
    )


def _ipu1() -> IPUPreset:
    return IPUPreset(
        name="ipu1",
        description="Graphcore GC2 (Colossus Mk1), as on the C2 PCIe card",
        tiles=_c(1216, "tiles", "sourced", GC2),
        tile_memory=_c(256 * KIB, "bytes", "sourced", GC2 + ": 256 KiB per tile, ~300 MB"),
        clock=_c(1.6e9, "Hz", "sourced", GC2 + ": 1.6 GHz"),
        fp16_flops=_c(124.5e12, "FLOP/s", "sourced", GC2 + ": 124.5 TFLOP/s fp16"),
        fp32_flops=_c(
            124.5e12 / 4, "FLOP/s", "derived", "fp16 peak / 4, the GC200's fp16:fp32 ratio"
        ),
        memory_bandwidth=_c(45e12, "B/s", "sourced", GC2 + ": 45 TB/s memory bandwidth"),
        exchange_bandwidth=_c(
            8e12 * 1216 / 1472 * 1.6 / 1.325,
            "B/s",
            "derived",
            "GC200's 8 TB/s scaled by tiles (1216/1472) and clock (1.6/1.325)",
        ),
        link_bandwidth=_c(320e9, "B/s", "assumed", "IPU-Links as on the GC200"),
        host_bandwidth=_c(32e9, "B/s", "assumed", "PCIe Gen4 x8 per GC2 on a C2 card"),
        sync_cycles=_SYNC,
        usable_memory=_USABLE,
        sparse_block_sizes=_BLOCKS,
        sparse_fp32_max_block=_FP32_MAX_BLOCK,
        sparse_index_bytes=_INDEX_BYTES,
    )


def _small() -> IPUPreset:
    base = _ipu2()
    share = 4 / 1472
    part = "derived: GC200 figure x 4/1472 tiles"
    return IPUPreset(
        name="small",
        description="4 GC200 tiles: a deliberately tiny device for tests of the limits",
        tiles=_c(4, "tiles", "assumed", "a test device, not a product"),
        tile_memory=_c(624 * KIB, "bytes", "sourced", GC200 + ": 624 KiB per tile"),
        clock=base.clock,
        fp16_flops=_c(base.fp16_flops.value * share, "FLOP/s", "derived", part),
        fp32_flops=_c(base.fp32_flops.value * share, "FLOP/s", "derived", part),
        memory_bandwidth=_c(base.memory_bandwidth.value * share, "B/s", "derived", part),
        exchange_bandwidth=_c(base.exchange_bandwidth.value * share, "B/s", "derived", part),
        link_bandwidth=base.link_bandwidth,
        host_bandwidth=base.host_bandwidth,
        sync_cycles=_SYNC,
        usable_memory=_USABLE,
        sparse_block_sizes=_BLOCKS,
        sparse_fp32_max_block=_FP32_MAX_BLOCK,
        sparse_index_bytes=_INDEX_BYTES,
    )


PRESETS: dict[str, IPUPreset] = {p.name: p for p in (_ipu2(), _bow(), _ipu1(), _small())}


def get_preset(name: str | IPUPreset) -> IPUPreset:
    """A preset by name (``ipu2``, ``bow``, ``ipu1``, ``small``) or the preset itself."""
    if isinstance(name, IPUPreset):
        return name
    if name not in PRESETS:
        raise ValueError(f"ipu.preset: unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]
