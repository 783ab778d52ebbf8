"""``ipu-sim``: a simulated Graphcore IPU with the contract of Graphcore's own "IPU Model".

Graphcore's IPU Model runs IPU programs on the host and estimates cycles and memory; it ships
with the Poplar SDK, which is not installable here. This package is our own emulation with the
same contract: **results are computed correctly on the host; everything IPU-specific is either a
constraint that is enforced or an estimate that is labelled as one.**

Enforced (``constraints``, ``memory``): static shapes and dtypes per compiled program (the first
call fixes them); the per-IPU memory budget (weights in their dtype, gradients, optimizer state,
stashed activations per pipeline stage, sparse non-zeros plus index metadata), with a breakdown
and the largest items in the error; pipeline placement with non-decreasing stage ids and
gradient accumulation >= the stages; block-sparse layers limited to the supported block sizes
(1, 4, 8, 16; fp32 up to 8) with a fixed number of non-zeros.

Emulated, opt-in (``numerics``; ``accelerator.precision=fp16``): fp16 storage and autocast
compute, loss scaling, stochastic rounding of fp32 -> fp16 casts (seeded; unbiased in
expectation; a statistical emulation, not the hardware's bit stream).

Estimated (``cost``): a roofline time per op and per pipeline stage from the ops actually run,
block-sparse FLOP savings at the layer density, pipeline fill/drain, Greedy InfoMax stages
overlapping without backward traffic. Every reported number says "estimate"/"estimated"; no IPU
speed is ever measured here. Device constants (``presets``) are tagged sourced/derived/assumed.
"""

from .constraints import (
    IPUConstraintError,
    IPUMemoryError,
    IPUShapeError,
    IPUSimError,
    Placement,
    SignatureGuard,
    SparseLayer,
    find_sparse_layers,
)
from .cost import (
    CostModel,
    ModuleTagger,
    OpRecord,
    OpRecorder,
    PipelineEstimate,
    StepEstimate,
    estimate,
    estimate_pipeline,
    summarize,
)
from .device import IPUSimAccelerator
from .memory import MemoryPlan, fmt_bytes
from .numerics import round_fp16, round_parameters_fp16, stochastic_round_fp16
from .presets import PRESETS, Constant, IPUPreset, get_preset
from .report import format_report

__all__ = [
    "PRESETS",
    "Constant",
    "CostModel",
    "IPUConstraintError",
    "IPUMemoryError",
    "IPUPreset",
    "IPUShapeError",
    "IPUSimAccelerator",
    "IPUSimError",
    "MemoryPlan",
    "ModuleTagger",
    "OpRecord",
    "OpRecorder",
    "PipelineEstimate",
    "Placement",
    "SignatureGuard",
    "SparseLayer",
    "StepEstimate",
    "estimate",
    "estimate_pipeline",
    "find_sparse_layers",
    "fmt_bytes",
    "format_report",
    "get_preset",
    "round_fp16",
    "round_parameters_fp16",
    "stochastic_round_fp16",
    "summarize",
]
