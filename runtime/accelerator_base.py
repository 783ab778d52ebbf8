"""One interface decides where and how training runs: ``Accelerator``.

Agents and world models never name a device or a precision; they ask their accelerator:

- placement: ``place(module)``, ``to_device(tree)``, ``device``;
- precision policy: ``autocast()`` (fp32: nothing; bf16: autocast; fp16: autocast plus a
  dynamic gradient scaler that ``backward``/``step`` apply);
- ``backward(loss, optimizer, clip=...)`` -> the gradient norm before clipping (unscaled),
  optionally w.r.t. given parameters only (``torch.autograd.grad``; other ``.grad`` untouched);
- data parallel under ``torchrun`` (``runtime.distributed``): ``prepare`` broadcasts rank 0's
  parameters and buffers, ``backward`` averages the gradients over ranks before clipping, and
  ``gather(tensor)`` concatenates every rank's values (statistics that steer the updates);
  single-process runs skip all three;
- ``step(optimizer)``; ``train_step(batch)`` wraps one whole update (timing, the scaler's update,
  and for ``ipu-sim`` the static-signature check, constraint checks and the cost estimate);
- ``compile(fn, fullgraph=...)``: ``torch.compile`` when compiling is on (``agent.compile``;
  cuda: CUDA graphs via ``mode="reduce-overhead"``), else ``fn``; ``optimizer(params, ...)``:
  Adam, fused where the device has the kernel;
- ``seed(seed)`` / determinism switches, ``memory_stats()``, ``metrics()`` (per-update
  ``perf/...`` scalars: measured times on cuda, estimates on ipu-sim, none on cpu) and
  ``report()`` (ipu-sim: the estimate report; others: ``{}``).

This module holds the interface and its cpu/cuda implementation; ``runtime.accelerator`` builds
an accelerator by name (``make_accelerator``) and re-exports everything here. They are apart so
that ``runtime.ipu_sim`` can subclass ``Accelerator`` without importing the module that builds
``ipu-sim`` (which would make the two import each other).
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from imagine_rl.runtime import distributed
from imagine_rl.runtime.config import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the legacy global generator others use
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class Accelerator:
    """cpu and cuda (and the base of ``ipu-sim``); see the module docstring.

    ``precision``: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + ``GradScaler``).
    ``compiling``: whether ``compile(fn)`` compiles. ``tf32``: cuda fp32 matmuls on TF32 cores.
    """

    name = "cpu"

    def __init__(
        self,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        *,
        deterministic: bool = False,
        compiling: bool = False,
        tf32: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(
                f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
        self.device = torch.device(device)
        self.name = self.device.type
        self.precision = precision
        self.deterministic = deterministic
        self.compiling = compiling
        self.scaler: torch.amp.GradScaler | None = None
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        # Optimizers stepped since the scaler's last update (it unscales each once per update).
        self._stepped: set[int] = set()
        self._step_time: float | None = None
        self._events: tuple[Any, Any] | None = None
        if self.device.type == "cuda":
            tf32_on = tf32 and not deterministic and precision == "fp32"
            torch.backends.cuda.matmul.allow_tf32 = tf32_on
            torch.backends.cudnn.allow_tf32 = tf32_on
            if deterministic:
                torch.backends.cudnn.benchmark = False

    # ------------------------------------------------------------------ placement
    def place(self, module: nn.Module) -> nn.Module:
        """Move a module's parameters and buffers to the device (in place; returns it)."""
        return module.to(self.device)

    def to_device(self, tree: Any) -> Any:
        """Tensors of a dict/list/tuple tree on the device (non-blocking copies)."""
        if isinstance(tree, torch.Tensor):
            return tree.to(self.device, non_blocking=True)
        if isinstance(tree, dict):
            return {k: self.to_device(v) for k, v in tree.items()}
        if isinstance(tree, list | tuple):
            return type(tree)(self.to_device(v) for v in tree)
        return tree

    def prepare(
        self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
    ) -> None:
        """Called once the modules and optimizers exist. cpu/cuda: nothing to check; under
        ``torchrun`` every rank takes rank 0's parameters and buffers, so all start identical."""
        distributed.broadcast_modules(modules.values())

    # ------------------------------------------------------------------ precision
    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward-pass context of the precision policy (a no-op for fp32)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ training
    @contextlib.contextmanager
    def train_step(self, batch: Any = None) -> Iterator[None]:
        """Wrap one whole update: times it (cuda: CUDA events, read after the caller's sync)
        and updates the fp16 loss scale once every optimizer has stepped."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events = (start, end)
        else:
            tick = time.perf_counter()
            yield
            self._step_time = time.perf_counter() - tick
        self._finish_scaler()

    def _finish_scaler(self) -> None:
        if self.scaler is not None and self._stepped:
            self.scaler.update()
        self._stepped.clear()

    def backward(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        clip: float | None = None,
        params: Iterable[torch.Tensor] | None = None,
        retain_graph: bool = False,
    ) -> torch.Tensor:
        """Gradients of ``loss`` into ``.grad``, unscaled, clipped to ``clip``; returns the norm.

        ``params=None``: ``loss.backward()`` over the whole graph, norm over the optimizer's
        parameters. With ``params``: gradients w.r.t. those only (``torch.autograd.grad``; a
        parameter the loss does not reach gets zeros), so no other ``.grad`` changes.

        Under ``torchrun`` the gradients are averaged over ranks first (still scaled, so an fp16
        overflow on any rank makes every rank skip the step), so every rank clips the same norm.
        """
        if self.scaler is not None and id(optimizer) in self._stepped:
            self._finish_scaler()  # a new update began without train_step around the last one
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        if params is None:
            scaled.backward(retain_graph=retain_graph)
            params = _params_of(optimizer)
        else:
            params = list(params)
            grads = torch.autograd.grad(
                scaled, params, allow_unused=True, retain_graph=retain_graph
            )
            for p, g in zip(params, grads):
                p.grad = g if g is not None else torch.zeros_like(p)
        return self._reduce_and_clip(optimizer, params, clip)

    def backward_groups(
        self,
        loss: torch.Tensor,
        groups: Iterable[tuple[torch.optim.Optimizer, float | None]],
    ) -> list[torch.Tensor]:
        """One backward pass of ``loss`` for several optimizers at once; returns their norms.

        For a loss that is a sum of terms each reaching only its own optimizer's parameters
        (the actor's and the critic's): one pass over the graph instead of one per optimizer.
        Each group's gradients are averaged over ranks, unscaled and clipped to its own
        ``clip``, as ``backward`` does for one. No host sync (the norms stay on the device).
        """
        groups = list(groups)
        if self.scaler is not None and any(id(opt) in self._stepped for opt, _ in groups):
            self._finish_scaler()
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        scaled.backward()
        return [self._reduce_and_clip(opt, _params_of(opt), clip) for opt, clip in groups]

    def _reduce_and_clip(
        self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], clip: float | None
    ) -> torch.Tensor:
        # A parameter without a gradient has none on every rank (same graph), so the flat
        # buffers line up.
        distributed.all_reduce_mean_([p.grad for p in params if p.grad is not None])
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        max_norm = float("inf") if clip is None else clip
        # foreach: a few fused kernels; the norm and the clip factor stay on the device.
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step (skipped by the fp16 scaler when gradients overflowed)."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()
        self._stepped.add(id(optimizer))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 (``tensor`` itself in one process).

        Shapes: ``[N, ...]`` -> ``[world_size * N, ...]``.
        """
        return distributed.all_gather_cat(tensor)

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks (a new tensor; ``tensor`` itself in one process)."""
        if not distributed.context().enabled:
            return tensor
        out = tensor.detach().clone()
        distributed.all_reduce_mean_([out])
        return out

    def compile(self, fn: Callable, *, fullgraph: bool = False) -> Callable:
        """``torch.compile(fn)`` when compiling is on, else ``fn`` unchanged.

        cuda: ``mode="reduce-overhead"``, so each compiled graph (forward and backward) is
        recorded once as a CUDA graph and replayed, its inputs copied into static buffers.
        Outputs of a replay are overwritten by the next one: callers clone what they keep.
        """
        if not self.compiling:
            return fn
        if self.device.type == "cuda":
            return torch.compile(fn, fullgraph=fullgraph, mode="reduce-overhead")
        # cpu: random numbers from torch's own generator (vectorised, and the same stream as
        # eager, so a compiled run draws what an eager run with the same seed draws) rather
        # than inductor's per-element Philox.
        return torch.compile(fn, fullgraph=fullgraph, options={"fallback_random": True})

    def optimizer(
        self, params: Iterable[torch.Tensor], *, lr: float, eps: float
    ) -> torch.optim.Optimizer:
        """Adam with ``fused=True`` (cpu and cuda, ipu-sim runs on cpu): one kernel for all
        parameters, and its step counters stay tensors that no host code reads. It steps
        outside the compiled graphs, so it needs no CUDA-graph capture."""
        return torch.optim.Adam(list(params), lr=lr, eps=eps, fused=True)

    def seed(self, seed: int) -> None:
        seed_everything(seed, self.deterministic)

    # ------------------------------------------------------------------ reporting
    def memory_stats(self) -> dict[str, float]:
        """Measured memory: cuda allocator counters, or the host process's peak RSS."""
        if self.device.type == "cuda":
            mib = 2.0**20
            return {
                "memory_allocated_mib": torch.cuda.memory_allocated(self.device) / mib,
                "max_memory_allocated_mib": torch.cuda.max_memory_allocated(self.device) / mib,
                "memory_reserved_mib": torch.cuda.memory_reserved(self.device) / mib,
            }
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is KiB on Linux, bytes on macOS.
        return {"host_max_rss_mib": peak / (2.0**20 if sys.platform == "darwin" else 1024.0)}

    def metrics(self) -> dict[str, float]:
        """Per-update scalars for ``metrics.jsonl``. cuda: measured step time and memory; cpu:
        none (the loop already logs wall-clock throughput)."""
        if self.device.type != "cuda":
            return {}
        out = {f"perf/cuda/{k}": v for k, v in self.memory_stats().items()}
        if self._events is not None:
            start, end = self._events
            end.synchronize()
            out["perf/cuda/step_time_s"] = start.elapsed_time(end) / 1000.0
        if self.scaler is not None:
            out["perf/cuda/loss_scale"] = float(self.scaler.get_scale())
        return out

    def report(self) -> dict[str, Any]:
        """A summary for the end of a run; only ipu-sim has one."""
        return {}


__all__ = ["PRECISIONS", "Accelerator", "seed_everything"]
