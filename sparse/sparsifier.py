"""``sparsify(model, config) -> Sparsifier``: masks on a built model, and their evolution.

Mechanism: every sparse weight gets a ``torch.nn.utils.parametrize`` parametrization
``MaskParametrization`` (``weight = original * mask``; ``mask`` is a buffer of the weight's
dtype, saved in the model's ``state_dict`` as ``<module>.parametrizations.<name>.0.mask``, the
dense parameter as ``<module>.parametrizations.<name>.original``). The optimizer keeps the same
``Parameter`` object it had before (the ``original``), so it may be built before or after.

Invariant: ``original`` is exactly zero wherever ``mask`` is 0. The gradient reaching
``original`` is ``grad(weight) * mask`` (zero at pruned positions), so Adam/SGD state stays zero
there; on top of that the sparsifier re-applies the mask after every step of an attached
optimizer (step post-hook) and in ``Sparsifier.step``, which covers decoupled weight decay and
any optimizer that moves weights without a gradient.

RigL's dense gradient: with ``weight = original * mask`` the gradient of ``original`` is
``dL/dweight * mask``, which is zero exactly where RigL needs to look. So on the optimizer step
before a topology update the parametrization is *armed*: it registers a hook on the effective
weight tensor it returns; the hook receives ``dL/dweight`` itself, the dense gradient, before
the multiplication by the mask. Per layer the captured gradients mirror ``original.grad``:
within a backward pass every use of the weight (once per time step in a recurrent loop) adds to
a pending sum; ``original``'s post-accumulate-grad hook commits it once per pass; and the first
hook of a pass restarts the sum if ``original.grad`` was cleared since (``None`` or all zeros,
i.e. ``zero_grad``), else adds to it (gradient accumulation). So the dense gradient belongs to
exactly the backward passes whose masked gradient the optimizer step used; passes before the
last ``zero_grad`` (e.g. an actor loss backpropagating through the model) do not leak in. Only
armed steps pay for this, and armed layers run dense-masked rather than the compressed kernel
so that the effective weight exists. A uniform loss scale (AMP ``GradScaler``) does not change
which positions are largest.
"""

from __future__ import annotations

import fnmatch
import math
import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import kernels
from .config import SparseConfig
from .distribution import LayerBudget, allocate_units
from .masks import (
    block_sum_abs,
    block_view,
    check_divisible,
    drop_and_grow,
    expand_blocks,
    grid_shape,
    random_blocks,
)

STATE_VERSION = 1
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class MaskParametrization(nn.Module):
    """``weight = original * mask``; optionally captures the dense gradient (see module doc)."""

    def __init__(self, mask: torch.Tensor, block: int = 1, balanced: bool = False) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        # Block-columns kept per block-row, for the compressed kernel (empty when unused).
        self.register_buffer("idx", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.block = block
        self.balanced = balanced
        self.fast = False
        self.capture = False
        self.dense_grad: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._cleared = True
        self._raw: Any = None  # weakref to the parametrized original while armed
        self._commit_handle: Any = None

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        # Recomputed on every access, like any parametrization: wrap many no-grad calls
        # (acting, rollouts of a frozen model) in ``torch.nn.utils.parametrize.cached()``.
        # Not memoized here: ``p.data.lerp_(...)`` (EMA targets) does not bump any version.
        weight = original * self.mask
        # requires_grad first: a frozen model (a behaviour loss imagining in it) never reads
        # ``capture``, so a compiled graph of it does not depend on the arming.
        if weight.requires_grad and self.capture:
            weight.register_hook(self._capture_grad)
        return weight

    def arm(self, original: torch.Tensor) -> None:
        """Capture the dense gradient from now on (``dense_grad``), mirroring ``original.grad``."""
        if self.capture:
            return
        self.disarm()
        self.capture = True
        self._raw = weakref.ref(original)
        self._commit_handle = original.register_post_accumulate_grad_hook(self._commit)

    def disarm(self) -> None:
        self.capture = False
        self.dense_grad = self._pending = None
        self._raw = None
        if self._commit_handle is not None:
            self._commit_handle.remove()
            self._commit_handle = None

    def captured_grad(self) -> torch.Tensor | None:
        """The dense gradient accumulated since ``original.grad`` was last cleared."""
        if self._pending is not None:  # a pass that never reached .grad (autograd.grad)
            return self._pending if self.dense_grad is None else self.dense_grad + self._pending
        return self.dense_grad

    # Every use of the weight in a backward pass calls _capture_grad (a recurrent layer: once
    # per time step); all of them run before original's AccumulateGrad, which depends on them,
    # and then _commit runs once. So the first hook of a pass still sees original.grad as it was
    # before the pass and can tell whether zero_grad() cleared it since the last pass.
    @torch.no_grad()
    def _capture_grad(self, grad: torch.Tensor) -> None:
        if self._pending is None:
            raw = self._raw() if self._raw is not None else None
            self._cleared = raw is None or raw.grad is None or not bool(raw.grad.any())
            self._pending = grad.detach().clone()
        else:
            self._pending.add_(grad)

    @torch.no_grad()
    def _commit(self, _param: torch.Tensor) -> None:
        if self._pending is None:
            return
        if self._cleared or self.dense_grad is None:
            self.dense_grad = self._pending
        else:
            self.dense_grad.add_(self._pending)
        self._pending = None

    def extra_repr(self) -> str:
        density = float(self.mask.count_nonzero()) / max(1, self.mask.numel())
        return (
            f"density={density:.4f}, block={self.block}, balanced={self.balanced}, fast={self.fast}"
        )


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _sparse_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """Forward of a sparsified ``nn.Linear`` whose kernel was chosen to be the compressed one
    (dense-masked while RigL captures the dense gradient, under autocast, and for inputs of
    fewer than ``kernels.min_rows()`` rows, where the kernel costs more than it saves)."""
    p = self.parametrizations.weight[0]
    original = self.parametrizations.weight.original
    if (
        p.fast
        and p.idx.numel()
        and not (p.capture and torch.is_grad_enabled())
        and input.dtype == original.dtype
        and not _autocast(input.device.type)
        and input.numel() >= kernels.min_rows() * input.shape[-1]
    ):
        return kernels.balanced_block_linear(input, original, p.idx, self.bias, p.block)
    return F.linear(input, self.weight, self.bias)


@dataclass
class _Layer:
    name: str  # full parameter name, e.g. "encoder.0.weight"
    module_name: str
    param_name: str
    module: nn.Module
    kind: str  # linear | conv | conv_transpose | param
    shape: tuple[int, ...]
    sparse: bool
    block: int = 1
    balanced: bool = False
    blocks: int = 0  # active blocks (constant over updates)
    kernel: str = "dense"
    rows: float | None = None  # applications (rows / output or input positions) per sample
    p: MaskParametrization | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return self.blocks * self.block * self.block if self.sparse else self.numel

    @property
    def original(self) -> torch.Tensor:
        if self.p is None:
            return getattr(self.module, self.param_name)
        return self.module.parametrizations[self.param_name].original


def _matches(patterns: Sequence[str], names: Sequence[str]) -> bool:
    for pattern in patterns:
        for name in names:
            if fnmatch.fnmatchcase(name, pattern):
                return True
            try:
                if re.fullmatch(pattern, name):
                    return True
            except re.error:
                pass
    return False


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _CONV):
        return "conv"
    if isinstance(module, _CONV_T):
        return "conv_transpose"
    return None


def _candidates(model: nn.Module, config: SparseConfig) -> list[_Layer]:
    layers: list[_Layer] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for pname in module.parametrizations:
                if any(isinstance(p, MaskParametrization) for p in module.parametrizations[pname]):
                    raise ValueError(f"sparse: '{module_name}' is already sparsified")
        kind = _kind(module)
        for pname, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if id(param) in seen:
                continue
            if kind is not None and pname == "weight":
                layer_kind = kind
            elif param.dim() >= 2 and _matches(config.include, [full]):
                layer_kind = "param"
            else:
                continue
            seen.add(id(param))
            sparse = not _matches(config.skip, [n for n in (module_name, full) if n])
            layers.append(
                _Layer(full, module_name, pname, module, layer_kind, tuple(param.shape), sparse)
            )
    return layers


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if torch.is_tensor(obj):
        return obj
    values = (
        obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    )
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _count_rows(
    model: nn.Module, layers: list[_Layer], example_inputs: Any, batch_size: int | None
) -> None:
    """Dry forward: how often each layer is applied per sample."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if batch_size is None:
        first = _first_tensor(inputs)
        batch_size = int(first.shape[0]) if first is not None and first.dim() else 1
    batch = batch_size
    counts: dict[str, float] = {}
    handles = []
    for layer in layers:
        if layer.kind == "param":
            continue

        def hook(module, args, output, layer=layer):
            if layer.kind == "linear":
                rows = output.numel() / output.shape[-1]
            elif layer.kind == "conv":
                rows = output.numel() / output.shape[-(module.weight.dim() - 1)]
            else:
                x = args[0]
                rows = x.numel() / x.shape[-(module.weight.dim() - 1)]
            counts[layer.name] = counts.get(layer.name, 0.0) + rows

        handles.append(layer.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    for layer in layers:
        if layer.name in counts:
            layer.rows = counts[layer.name] / batch


class Sparsifier:
    """Owns the masks of a sparsified model; see ``sparsify``."""

    def __init__(self, model: nn.Module, config: SparseConfig, layers: list[_Layer]) -> None:
        self.model = model
        self.config = config
        self.layers = layers
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self._step = 0
        self._updates = 0
        self._last: dict[str, float] = {}
        self._missing_grad = 0
        self._attached: list[Any] = []  # (weakref to optimizer, handle)
        self._masked = False
        # Applied to each captured dense gradient before RigL scores it; data-parallel training
        # sets it to the mean over processes so every process grows the same connections.
        self.grad_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    # ------------------------------------------------------------------ basics
    @property
    def sparse_layers(self) -> list[_Layer]:
        return [la for la in self.layers if la.sparse]

    @property
    def training_layers(self) -> list[_Layer]:
        """The sparse layers whose weights train (``requires_grad``): the ones topology updates
        change. A frozen layer (e.g. a pretrained perception kept fixed) keeps its mask and
        weights: a regrown connection of a frozen layer would stay at zero."""
        return [la for la in self.sparse_layers if la.original.requires_grad]

    @property
    def armed(self) -> bool:
        """Whether the next backward captures dense gradients (the step before a RigL update).
        The armed forward differs (a hook on each effective weight, the dense-masked path), so
        a compiled caller runs that step eagerly rather than tracing a second graph."""
        return any(la.p.capture for la in self.sparse_layers)

    @property
    def step_count(self) -> int:
        """Optimizer steps seen by ``step``."""
        return self._step

    def masks(self) -> dict[str, torch.Tensor]:
        """Bool element masks by parameter name (fresh tensors, not the buffers)."""
        return {la.name: la.p.mask != 0 for la in self.sparse_layers}

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every sparse ``original`` where its mask is 0."""
        for la in self.sparse_layers:
            la.original.mul_(la.p.mask)

    def _post_step_hook(self, *_: Any) -> None:
        self.apply_masks()
        self._masked = True

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the masks after every ``optimizer.step()`` (idempotent)."""
        for ref, _ in self._attached:
            if ref() is optimizer:
                return
        handle = optimizer.register_step_post_hook(self._post_step_hook)
        self._attached.append((weakref.ref(optimizer), handle))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The attached optimizers still alive (their state is fixed up on updates)."""
        alive = [ref() for ref, _ in self._attached]
        return [opt for opt in alive if opt is not None]

    # ------------------------------------------------------------------ schedule
    def step(
        self, optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None
    ) -> dict[str, float] | None:
        """Call after every ``optimizer.step()``: attaches ``optimizer``, re-masks, counts the
        step, updates the topology when scheduled (zeroing the state of changed connections in
        every attached optimizer) and arms
        dense-gradient capture for the next step when it is a RigL update. Returns the update's
        stats on update steps, else None."""
        optimizers = _as_list(optimizer)
        for opt in optimizers:
            self.attach(opt)
        if not self._masked:  # no attached optimizer's post-hook has re-masked since last step
            self.apply_masks()
        self._masked = False
        self._step += 1
        info = None
        if self.config.is_update_step(self._step):
            info = self.update_topology(self.optimizers())
        self._arm()
        return info

    def _arm(self) -> None:
        armed = self.config.method == "rigl" and self.config.is_update_step(self._step + 1)
        trains = {id(la) for la in self.training_layers}
        for la in self.sparse_layers:
            if armed and id(la) in trains:
                la.p.arm(la.original)
            else:
                la.p.disarm()

    @torch.no_grad()
    def update_topology(
        self, optimizers: Sequence[torch.optim.Optimizer] = (), fraction: float | None = None
    ) -> dict[str, float]:
        """Drop and regrow now (normally called by ``step``) in the layers that train
        (``training_layers``). New connections start at zero; the optimizer state of new and
        dropped connections is zeroed."""
        if self.config.method == "static":
            return {}
        if fraction is None:
            fraction = self.config.drop_fraction_at(self._step)
        changed = total = missing = 0
        for la in self.training_layers:
            p, raw = la.p, la.original
            active = block_view(p.mask, la.block)
            drop_scores = block_sum_abs(raw, la.block).float()
            dense_grad = p.captured_grad()
            if dense_grad is not None and self.grad_reduce is not None:
                dense_grad = self.grad_reduce(dense_grad)
            if self.config.method == "rigl" and dense_grad is not None:
                grow_scores = block_sum_abs(dense_grad, la.block).float()
            else:
                missing += self.config.method == "rigl"
                grow_scores = torch.rand(active.shape, generator=self.generator).to(active.device)
            new_active, k = drop_and_grow(active, drop_scores, grow_scores, fraction, la.balanced)
            n_before, n_after = int(active.sum()), int(new_active.sum())
            assert n_before == n_after == la.blocks, (la.name, n_before, n_after, la.blocks)
            if la.balanced:
                assert bool((new_active.sum(1) == new_active[0].sum()).all()), la.name
            new_mask = expand_blocks(new_active, la.shape, la.block).to(p.mask.dtype)
            keep = p.mask * new_mask  # connections active before and after
            raw.mul_(keep)
            p.mask.copy_(new_mask)
            for opt in optimizers:
                state = opt.state.get(raw)
                for value in (state or {}).values():
                    if torch.is_tensor(value) and value.shape == raw.shape:
                        value.mul_(keep.to(value.dtype))
            if p.fast:
                # In place (balanced: the same shape): a compiled graph reading it stays valid.
                p.idx.copy_(kernels.indices_from_mask(new_active))
            p.disarm()
            changed += k
            total += la.blocks
        self._updates += 1
        self._missing_grad += missing
        self._last = {"sparse/drop_fraction": fraction, "sparse/changed": changed / max(1, total)}
        return dict(self._last, **{"sparse/rigl_missing_grad": float(missing)})

    # ------------------------------------------------------------------ kernels
    def choose_kernels(self, batch: int | None = None, force: str | None = None) -> None:
        """(Re)pick each balanced linear layer's kernel on its current device and dtype."""
        mode = force or self.config.fast_path
        batch = batch or self.config.fast_path_batch
        for la in self.sparse_layers:
            if la.kind != "linear":
                la.kernel = kernels.DENSE_MASKED
                continue
            fast_ok = (
                la.balanced
                and mode != "off"
                and la.blocks < math.prod(grid_shape(la.shape, la.block))
                # Only plain F.linear semantics can be swapped for the kernel.
                and type(la.module).forward is nn.Linear.forward
            )
            kernel = kernels.DENSE_MASKED
            if fast_ok and mode == "on":
                kernel = kernels.BALANCED_BMM
            elif fast_ok:
                raw = la.original
                rows, _ = grid_shape(la.shape, la.block)
                kernel = kernels.choose_kernel(
                    la.shape[0],
                    la.shape[1],
                    la.blocks // rows,
                    la.block,
                    raw.device,
                    raw.dtype,
                    batch,
                )
            la.kernel = kernel
            la.p.fast = kernel == kernels.BALANCED_BMM
            if la.p.fast:
                la.p.idx = kernels.indices_from_mask(block_view(la.p.mask, la.block))
                la.module.forward = _bind(_sparse_linear_forward, la.module)
            else:
                la.p.idx = torch.zeros(0, 0, dtype=torch.long, device=la.p.mask.device)
                la.module.__dict__.pop("forward", None)

    # ------------------------------------------------------------------ reporting
    def report(self) -> list[dict[str, Any]]:
        """One row per candidate layer: shape, density, kernel and FLOPs.

        FLOPs are ``2 * (non-zero weights)`` per application (multiply + add; bias and
        activations not counted). ``flops_per`` says per what: ``sample`` when ``sparsify`` got
        ``example_inputs`` (applications per sample measured by a dry forward: rows for
        linear, output positions for conv, input positions for transposed conv, summed over
        every call, e.g. every time step of a recurrent cell), else ``row`` (linear),
        ``position`` (conv: per output position; transposed conv: per input position) or
        ``application`` (other parameters).
        """
        rows = []
        for la in self.layers:
            apps = la.rows if la.rows is not None else 1.0
            if la.rows is not None:
                per = "sample"
            else:
                per = {"linear": "row", "param": "application"}.get(la.kind, "position")
            rows.append(
                {
                    "name": la.name,
                    "kind": la.kind,
                    "shape": list(la.shape),
                    "sparse": la.sparse,
                    "numel": la.numel,
                    "nnz": la.nnz,
                    "density": la.nnz / la.numel,
                    "block": la.block if la.sparse else None,
                    "balanced": la.balanced if la.sparse else None,
                    "kernel": la.kernel,
                    "dense_flops": 2.0 * la.numel * apps,
                    "sparse_flops": 2.0 * la.nnz * apps,
                    "flops_per": per,
                }
            )
        return rows

    def metrics(self) -> dict[str, float]:
        """Scalars for the logger. ``sparse/density``: non-zeros over sparsified layers;
        ``sparse/density_all``: also counting the skipped (dense) candidates;
        ``sparse/flops_ratio``: sparse over dense FLOPs of all candidates (see ``report``)."""
        rows = self.report()
        sparse_rows = [r for r in rows if r["sparse"]]
        dense_flops = sum(r["dense_flops"] for r in rows)
        out = {
            "sparse/density": sum(r["nnz"] for r in sparse_rows)
            / max(1, sum(r["numel"] for r in sparse_rows)),
            "sparse/density_all": sum(r["nnz"] for r in rows)
            / max(1, sum(r["numel"] for r in rows)),
            "sparse/flops_ratio": sum(r["sparse_flops"] for r in rows) / dense_flops
            if dense_flops
            else 1.0,
            "sparse/step": float(self._step),
            "sparse/updates": float(self._updates),
            "sparse/layers": float(len(sparse_rows)),
            "sparse/fast_layers": float(sum(r["kernel"] == kernels.BALANCED_BMM for r in rows)),
            "sparse/next_drop_fraction": self.config.drop_fraction_at(self._step),
            "sparse/rigl_missing_grad": float(self._missing_grad),
        }
        out.update(self._last)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Masks (bool tensors), schedule position and RNG state; loads with
        ``torch.load(weights_only=True)``."""
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "updates": self._updates,
            "missing_grad": self._missing_grad,
            "rng": self.generator.get_state(),
            "masks": {k: v.cpu() for k, v in self.masks().items()},
            "config": self.config.to_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["masks"]
        by_name = {la.name: la for la in self.sparse_layers}
        if set(masks) != set(by_name):
            raise ValueError(
                f"sparse: checkpoint masks {sorted(masks)} do not match the sparse layers {sorted(by_name)}"
            )
        for name, mask in masks.items():
            la = by_name[name]
            if tuple(mask.shape) != la.shape:
                raise ValueError(
                    f"sparse: mask '{name}' has shape {tuple(mask.shape)}, layer has {la.shape}"
                )
            blocks = int(block_view(mask, la.block).sum())
            if blocks != la.blocks:
                raise ValueError(
                    f"sparse: mask '{name}' keeps {blocks} blocks, layer keeps {la.blocks}"
                )
            la.p.mask.copy_(mask.to(la.p.mask))
            if la.p.fast:
                la.p.idx = kernels.indices_from_mask(block_view(la.p.mask, la.block))
        self._step = int(state["step"])
        self._updates = int(state.get("updates", 0))
        self._missing_grad = int(state.get("missing_grad", 0))
        self.generator.set_state(state["rng"])
        self.apply_masks()
        self._arm()

    # ------------------------------------------------------------------ teardown
    @torch.no_grad()
    def remove(self) -> None:
        """Bake the masks into plain dense parameters and drop hooks and parametrizations."""
        for _, handle in self._attached:
            handle.remove()
        self._attached.clear()
        for la in self.sparse_layers:
            la.p.disarm()
            la.module.__dict__.pop("forward", None)
            parametrize.remove_parametrizations(la.module, la.param_name, leave_parametrized=True)
            la.p = None
            la.sparse = False


def _as_list(optimizer: Any) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return list(optimizer)


def _bind(fn, module):
    return fn.__get__(module, type(module))


def sparsify(
    model: nn.Module,
    config: SparseConfig,
    example_inputs: Any = None,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    batch_size: int | None = None,
) -> Sparsifier:
    """Make ``model`` sparse in place and return the ``Sparsifier`` that owns its masks.

    Candidates: every ``nn.Linear`` / ``nn.Conv{1,2,3}d`` / ``nn.ConvTranspose{1,2,3}d``
    weight, plus parameters matched by ``config.include``; those matched by ``config.skip``
    stay dense. The global budget ``density * (elements of the sparse layers)`` is split by
    ``config.distribution`` into exact per-layer block counts and each layer gets a random mask
    (seeded by ``config.seed``); masked weights are zeroed. ``example_inputs`` (a tensor or a
    tuple of positional inputs; nested dicts/lists are fine) runs one no-grad forward first to
    count FLOPs per sample: per element of the first dim of the first tensor found, or per
    ``batch_size`` samples when given (e.g. ``B * T`` for ``[B, T, ...]`` sequence inputs).
    ``optimizer`` (optional) is attached so masks are re-applied after each of its steps.
    """
    config = config.validate()
    layers = _candidates(model, config)
    b = config.block
    for la in layers:
        if not la.sparse:
            continue
        if la.kind == "param" and len(la.shape) > 2 and b > 1:
            # Blocks tile dims 0 and 1 with the rest read as a kernel: right for convs, not for
            # e.g. a block-diagonal weight [groups, in, out], whose blocks would span groups.
            raise ValueError(
                f"sparse: '{la.name}' (shape {tuple(la.shape)}) is a >2-D parameter matched by "
                f"sparse.include; block structure (sparse.block={b}) is defined for Linear and "
                "conv weights only: use sparse.block=1 or drop it from sparse.include"
            )
        check_divisible(la.name, la.shape, b)
    if example_inputs is not None:
        _count_rows(model, layers, example_inputs, batch_size)
    sparse = [la for la in layers if la.sparse]
    budgets = []
    for la in sparse:
        rows, cols = grid_shape(la.shape, b)
        unit = rows * b * b if config.balanced else b * b
        budgets.append(
            LayerBudget(la.name, la.shape, unit, cols if config.balanced else rows * cols)
        )
    units = allocate_units(budgets, float(config.density), config.distribution)
    sparsifier = Sparsifier(model, config, layers)
    for la, n_units in zip(sparse, units):
        rows, cols = grid_shape(la.shape, b)
        raw = getattr(la.module, la.param_name)
        active = random_blocks(rows, cols, n_units, config.balanced, sparsifier.generator)
        mask = expand_blocks(active, la.shape, b).to(device=raw.device, dtype=raw.dtype)
        with torch.no_grad():
            raw.mul_(mask)
        la.p = MaskParametrization(mask, b, config.balanced)
        la.block, la.balanced = b, config.balanced
        la.blocks = n_units * rows if config.balanced else n_units
        la.kernel = kernels.DENSE_MASKED
        parametrize.register_parametrization(la.module, la.param_name, la.p)
    for la in layers:
        if not la.sparse:
            la.kernel = "dense"
    sparsifier.choose_kernels()
    for opt in _as_list(optimizer):
        sparsifier.attach(opt)
    sparsifier._arm()
    return sparsifier
