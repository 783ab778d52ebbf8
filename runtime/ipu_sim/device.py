"""``IPUSimAccelerator``: the ``ipu-sim`` accelerator (see ``runtime/ipu_sim/__init__.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from imagine_rl.runtime.accelerator_base import Accelerator
from imagine_rl.runtime.config import Config, IPUConfig

from .constraints import (
    IPUConstraintError,
    Placement,
    SignatureGuard,
    auto_placement,
    check_accumulation,
    check_sparse_blocks,
    check_sparse_nnz,
    find_sparse_layers,
    parse_placement,
)
from .cost import ActivationCounter, CostModel, ModuleTagger, OpRecorder, StepEstimate, summarize
from .memory import MemoryPlan, add_parameters, optimizer_slots, pretty_name, storage_bytes
from .numerics import round_parameters_fp16
from .presets import IPUPreset, get_preset

METRIC_PREFIX = "perf/ipu_sim/"


class IPUSimAccelerator(Accelerator):
    """Runs on the host (cpu) with the results of cpu; enforces the IPU's limits and estimates
    its speed. fp32 results are identical to ``cpu``'s; fp16 emulates fp16 storage (weights
    rounded after every optimizer step, stochastically when asked), fp16 autocast and dynamic
    loss scaling.

    Lifecycle: ``prepare(modules, optimizers)`` places modules on IPUs, checks block-sparse
    layers and the static memory (weights, gradients, optimizer state); the first
    ``train_step(batch)`` fixes the step's input signature, records every op for the cost
    estimate and measures the stashed activations, then checks the memory again with them.
    Later steps check the signature and the sparse non-zero counts. The op trace of a step with
    static shapes does not change, so the estimate is made once.
    """

    name = "ipu-sim"

    def __init__(
        self,
        preset: str | IPUPreset = "ipu2",
        num_ipus: int = 1,
        precision: str = "fp32",
        *,
        stochastic_rounding: bool = True,
        gradient_accumulation: int = 0,
        placement: list[str] | None = None,
        seed: int = 0,
        deterministic: bool = False,
    ) -> None:
        if precision not in ("fp32", "fp16"):
            raise ValueError(
                f"accelerator.precision: the IPU runs fp32 or fp16 (it has no bf16), got "
                f"{precision!r}"
            )
        super().__init__("cpu", precision, deterministic=deterministic)
        self.name = "ipu-sim"
        self.preset = get_preset(preset)
        self.num_ipus = int(num_ipus)
        self.stochastic_rounding = stochastic_rounding
        self.gradient_accumulation = int(gradient_accumulation)
        self.placement_entries = list(placement or [])
        self.half = precision == "fp16"
        self.cost = CostModel(self.preset, half=self.half)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.guard = SignatureGuard()
        self.placement = Placement([], self.num_ipus)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.sparse_layers: list = []
        self.plan = MemoryPlan(self.preset, self.num_ipus)
        self.estimate: StepEstimate | None = None
        self._ipu_cache: dict[str, int] = {}
        self._steps = 0
        self._recorder: OpRecorder | None = None

    @classmethod
    def from_config(cls, config: Config) -> IPUSimAccelerator:
        ipu: IPUConfig = config.ipu
        return cls(
            ipu.preset,
            ipu.num_ipus,
            config.accelerator.resolved_precision,
            stochastic_rounding=ipu.stochastic_rounding,
            gradient_accumulation=ipu.gradient_accumulation,
            placement=ipu.placement,
            seed=config.seed,
            deterministic=config.accelerator.deterministic,
        )

    # ------------------------------------------------------------------ placement
    @property
    def stages(self) -> int:
        return self.placement.stages

    @property
    def micro_batches(self) -> int:
        return self.gradient_accumulation or self.stages

    def ipu_of(self, name: str) -> int:
        ipu = self._ipu_cache.get(name)
        if ipu is None:
            found = self.placement.ipu_of(name)
            ipu = self._ipu_cache[name] = 0 if found is None else found
        return ipu

    def _units(self) -> list[tuple[str, int]]:
        """The modules a placement may name: each root's direct children (or the root itself
        when it has none with parameters), with their parameter bytes, in registration order."""
        units = []
        for root, module in self.modules.items():
            children = [
                (f"{root}.{n}", sum(p.numel() for p in c.parameters()) * 4)
                for n, c in module.named_children()
                if any(True for _ in c.parameters())
            ]
            own = sum(p.numel() for p in module.parameters(recurse=False))
            if children and not own:
                units.extend(children)
            else:
                units.append((root, sum(p.numel() for p in module.parameters()) * 4))
        return units

    def _place(self) -> None:
        units = self._units()
        if self.placement_entries:
            entries = parse_placement(self.placement_entries, self.num_ipus)
            names = [
                f"{root}.{path}" if path else root
                for root, m in self.modules.items()
                for path, _ in m.named_modules()
            ]
            for prefix, _ in entries:
                if not any(n == prefix or n.startswith(prefix + ".") for n in names):
                    valid = ", ".join(n for n, _ in units)
                    raise IPUConstraintError(
                        f"ipu.placement: no module named '{prefix}'; placeable modules: {valid}"
                    )
            placement = Placement(entries, self.num_ipus)
            unplaced = [
                pretty_name(f"{root}.{path}")
                for root, m in self.modules.items()
                for path, _ in m.named_parameters()
                if placement.ipu_of(f"{root}.{path}") is None
            ]
            if unplaced:
                raise IPUConstraintError(
                    f"ipu.placement: parameters on no IPU: {', '.join(unplaced[:3])}"
                    f"{' ...' if len(unplaced) > 3 else ''}; add an entry for their module"
                )
        elif self.num_ipus > 1:
            placement = Placement(auto_placement(units, self.num_ipus), self.num_ipus)
        else:
            placement = Placement([(name, 0) for name in self.modules], 1)
        self.placement = placement
        self._ipu_cache.clear()
        check_accumulation(self.micro_batches, self.stages)

    def prepare(
        self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
    ) -> None:
        """Place the modules, check block-sparse layers and the static memory budget."""
        self.modules = dict(modules)
        self.optimizers = dict(optimizers)
        self._place()
        self.sparse_layers = find_sparse_layers(self.modules)
        check_sparse_blocks(self.sparse_layers, self.preset, self.half)
        self.plan = MemoryPlan(self.preset, self.num_ipus)
        add_parameters(
            self.plan,
            self.modules,
            list(self.optimizers.values()),
            self.ipu_of,
            self.half,
            self.sparse_layers,
        )
        self.plan.check()
        if self.half:
            # fp16 storage from the start (to nearest: initial weights are not an update).
            round_parameters_fp16(
                [p for m in self.modules.values() for p in m.parameters()], stochastic=False
            )

    # ------------------------------------------------------------------ training
    @contextlib.contextmanager
    def train_step(self, batch: Any = None) -> Iterator[None]:
        """One update: signature check; the first one is recorded for the estimate."""
        self.guard.check("update", batch)
        if self.estimate is None:
            yield from self._recorded_step(batch)
        else:
            yield
        self._finish_scaler()
        check_sparse_nnz(self.sparse_layers)
        self._steps += 1

    def _recorded_step(self, batch: Any) -> Iterator[None]:
        tagger = None
        if self.stages > 1:
            tags: dict[nn.Module, int] = {}
            for root, module in self.modules.items():
                for path, sub in module.named_modules():
                    name = f"{root}.{path}" if path else root
                    if any(name == prefix for prefix, _ in self.placement.entries):
                        tags[sub] = self.ipu_of(name)
            tagger = ModuleTagger(tags)
        tensor_stages = {}
        if tagger is not None:
            for root, module in self.modules.items():
                for path, p in [*module.named_parameters(), *module.named_buffers()]:
                    tensor_stages[p.data_ptr()] = self.ipu_of(f"{root}.{path}")
        recorder = OpRecorder(
            self.cost,
            stage=0,
            stage_tagger=tagger,
            sparse_layers=self.sparse_layers,
            tensor_stages=tensor_stages,
        )
        self._recorder = recorder
        params = [p for m in self.modules.values() for p in m.parameters()]
        params += [b for m in self.modules.values() for b in m.buffers()]
        stage_of = tagger.current if tagger is not None else (lambda: 0)
        counter = ActivationCounter(self.half, stage_of, params)
        recorder.activations = counter
        with contextlib.ExitStack() as stack:
            if tagger is not None:
                stack.enter_context(tagger)
            stack.enter_context(recorder)
            stack.enter_context(counter)
            yield
        self._recorder = None
        if tagger is not None:
            tagger.reset()
        self.plan.clear("stashed activations")
        for stage, nbytes in counter.bytes.items():
            if stage is None:  # saved outside every placed module: spread over the IPUs
                for ipu in range(self.stages):
                    self.plan.add(
                        "activations (unplaced)", ipu, "stashed activations", nbytes / self.stages
                    )
            else:
                self.plan.add(f"activations of stage {stage}", stage, "stashed activations", nbytes)
        batch_bytes = sum(t.numel() * storage_bytes(t, self.half) for t in _tensors(batch))
        self.estimate = summarize(
            recorder.records,
            self.cost,
            num_ipus=self.num_ipus,
            stages=self.stages,
            micro_batches=self.micro_batches,
            inter_ipu_bytes=recorder.inter_ipu_bytes,
            host_io_bytes=batch_bytes,
        )
        self.plan.check()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        super().step(optimizer)
        if self.half:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            # The IPU rounds in hardware as it stores: the emulation's own ops cost nothing.
            recorder, paused = self._recorder, False
            if recorder is not None:
                paused, recorder.paused = recorder.paused, True
            try:
                round_parameters_fp16(params, self.stochastic_rounding, self.generator)
            finally:
                if recorder is not None:
                    recorder.paused = paused

    def compile(self, fn):
        """Eager on the host: the op trace is the cost model (the IPU compiles the whole step
        anyway, and the static signature check stands in for its compiler's rules)."""
        return fn

    def seed(self, seed: int) -> None:
        super().seed(seed)
        self.generator.manual_seed(int(seed))

    # ------------------------------------------------------------------ reporting
    def memory_stats(self) -> dict[str, float]:
        per = self.plan.per_ipu()
        budget = self.preset.budget_bytes
        worst = max(row["total"] for row in per.values())
        return {
            "estimated_memory_mib": worst / 2**20,
            "estimated_memory_fraction": worst / budget,
        }

    def metrics(self) -> dict[str, float]:
        """``perf/ipu_sim/*``: estimates only (their names say so), per update."""
        out = {METRIC_PREFIX + k: v for k, v in self.memory_stats().items()}
        est = self.estimate
        if est is not None:
            out.update(
                {
                    METRIC_PREFIX + "estimated_step_time_s": est.step_time_s,
                    METRIC_PREFIX + "estimated_steps_per_s": 1.0 / max(est.step_time_s, 1e-30),
                    METRIC_PREFIX + "estimated_compute_s": est.compute_s,
                    METRIC_PREFIX + "estimated_exchange_s": est.exchange_s,
                    METRIC_PREFIX + "estimated_sync_s": est.sync_s,
                    METRIC_PREFIX + "estimated_inter_ipu_s": est.inter_ipu_s,
                    METRIC_PREFIX + "estimated_host_io_s": est.host_io_s,
                    METRIC_PREFIX + "estimated_fill_drain_s": est.fill_drain_s,
                    METRIC_PREFIX + "estimated_flops": est.flops,
                    METRIC_PREFIX + "estimated_tflops_per_s": est.flops
                    / max(est.step_time_s, 1e-30)
                    / 1e12,
                }
            )
        if self.scaler is not None:
            out[METRIC_PREFIX + "loss_scale"] = float(self.scaler.get_scale())
        return out

    def report(self) -> dict[str, Any]:
        """Everything the estimate rests on: device constants with their tags, placement,
        memory per IPU, the step estimate and its assumptions."""
        est = self.estimate
        return {
            "kind": "ipu-sim estimate (host emulation; no IPU was used, no time here is measured)",
            "preset": self.preset.name,
            "device": self.preset.description,
            "num_ipus": self.num_ipus,
            "precision": self.precision,
            "stochastic_rounding": self.stochastic_rounding if self.half else None,
            "pipeline_stages": self.stages,
            "micro_batches": self.micro_batches,
            "placement": [{"module": m, "ipu": i} for m, i in self.placement.entries],
            "optimizer_slots": {n: optimizer_slots(o) for n, o in self.optimizers.items()},
            "sparse_layers": [
                {"name": s.name, "block": s.block, "density": s.density, "nnz": s.nnz}
                for s in self.sparse_layers
            ],
            "memory": self.plan.summary(),
            "estimate": est.to_dict() if est is not None else None,
            "updates": self._steps,
            "constants": self.preset.table(),
            "assumptions": [
                "op time = max(FLOPs / AMP peak, bytes / SRAM bandwidth) + matmul/conv input "
                "bytes / exchange bandwidth + one BSP sync; ops run one after another",
                "FLOPs are the ops run on the host (torch.utils.flop_counter formulas); "
                "block-sparse matmuls at the layer's density",
                "pipeline: the step splits into micro-batches; (M + S - 1) x slowest stage; "
                "an op outside every placed module (losses, optimizer) runs on the IPU of its "
                "first placed operand; unplaced ops are spread evenly over the IPUs",
                "fp16: the host's rounding emulation costs nothing (the IPU rounds as it stores)",
                "memory: weights/gradients in the storage dtype, optimizer state fp32, "
                "activations = tensors saved for backward on the host",
            ],
        }


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, list | tuple):
        return [t for v in tree for t in _tensors(v)]
    return []
