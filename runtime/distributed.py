"""Data-parallel training on ``torch.distributed``: one process per rank, launched by ``torchrun``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``init_distributed`` reads them and joins the process group (gloo on cpu, NCCL on cuda) only when
``WORLD_SIZE > 1``. Without them everything here is a single-process no-op, so library code calls
these helpers unconditionally.

What is kept identical across ranks, and how:

- parameters and buffers: broadcast from rank 0 once the modules exist
  (``Accelerator.prepare`` -> ``broadcast_modules``);
- gradients: averaged over ranks by one flat all-reduce per ``Accelerator.backward`` (the
  equivalent of ``DistributedDataParallel``'s averaging, which cannot hook the
  ``torch.autograd.grad`` calls the actor and critic use), before clipping and the optimizer
  step, so every rank clips the same norm and takes bit-identical steps;
- statistics that steer updates and come from each rank's own data (the return normaliser's
  percentiles): computed from every rank's values (``all_gather_cat``);
- the schedule: one small all-reduce per vector env step (``all_reduce_sums`` on a gloo "control"
  group, even under NCCL) sums the env steps of all ranks, so counters and the replay-ratio clock
  count global steps, and tells every rank whether any rank was asked to stop and whether every
  replay shard can be sampled, so all ranks run the same number of updates.

Failure: a rank that raises inside ``session`` tears its process group down before re-raising;
the other ranks' next collective then fails at once (gloo: "Connection closed by peer") instead
of waiting. ``distributed.timeout`` bounds the wait for a rank that hangs without failing, and
``torchrun`` itself stops the remaining workers when one exits with an error.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# Rank r seeds its envs and RNGs with ``seed + r * RANK_SEED_STRIDE``: far above the per-env
# offsets (``seed + i`` for env i) so no two ranks ever share an env seed.
RANK_SEED_STRIDE = 1_000_003
_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How gloo reports a peer that died or hung (its messages name gloo's source files; NCCL
# raises DistBackendError).
_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out")


class DistributedError(RuntimeError):
    """Ranks disagree (config) or the launch environment is incomplete; one-line message."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0


_control_group: Any = None  # gloo group for small CPU collectives (the default one under gloo)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as error:
        raise DistributedError(
            f"environment variable {name}={value!r} is not an integer"
        ) from error


def launch_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): what ``init_distributed`` will join."""
    return _env_int("WORLD_SIZE") or 1


def context() -> DistributedContext:
    """This process's rank and world size (a single-process context before/without init)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=_env_int("LOCAL_RANK") or 0,
        backend=str(dist.get_backend()),
    )


def rank_seed(seed: int, rank: int | None = None) -> int:
    """The seed of ``rank`` (default: this process's): ``seed`` on rank 0, distinct elsewhere."""
    rank = context().rank if rank is None else rank
    return int(seed) + rank * RANK_SEED_STRIDE


def resolve_backend(backend: str, device_type: str) -> str:
    """``auto`` -> nccl for cuda, gloo otherwise; nccl without cuda is an error."""
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise DistributedError(
            "distributed.backend=nccl needs the cuda accelerator; use distributed.backend=gloo "
            "(or auto) on cpu"
        )
    return backend


def cuda_device_index(backend: str | None = None) -> int:
    """The GPU of this rank: its ``LOCAL_RANK``. NCCL needs one GPU per rank; gloo may share."""
    local_rank = _env_int("LOCAL_RANK") or 0
    count = torch.cuda.device_count()
    if count == 0 or launch_world_size() <= 1:
        return 0
    if local_rank >= count:
        if (backend or context().backend) == "nccl":
            raise DistributedError(
                f"LOCAL_RANK {local_rank} but this node has {count} GPU(s): NCCL needs one GPU "
                f"per rank; use --nproc_per_node={count} or distributed.backend=gloo"
            )
        return local_rank % count
    return local_rank


def init_distributed(
    backend: str = "auto", timeout: float = 1800.0, device_type: str = "cpu"
) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment.

    A no-op (single-process context) unless ``WORLD_SIZE > 1``; idempotent.
    """
    global _control_group
    if dist.is_available() and dist.is_initialized():
        return context()
    world_size = launch_world_size()
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [name for name in _ENV_VARS if os.environ.get(name) in (None, "")]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: launch with torchrun "
            "(e.g. torchrun --standalone --nproc_per_node=2 --no-python imagine-rl train ...)"
        )
    backend = resolve_backend(backend, device_type)
    if device_type == "cuda":
        torch.cuda.set_device(cuda_device_index(backend))
    # torch.distributed.nn and torch.distributed._shard bind ``group.WORLD`` as a default
    # argument when first imported. Imported after the group exists (torch._dynamo imports
    # them, and every optimizer imports torch._dynamo) they would keep the group alive for
    # good, so ``abort`` could not close its connections; imported now, the default is None.
    for module in ("torch.distributed.nn", "torch.distributed._shard"):
        importlib.import_module(module)

    wait = datetime.timedelta(seconds=timeout)
    dist.init_process_group(backend, rank=_env_int("RANK"), world_size=world_size, timeout=wait)
    # Counters and flags are tiny CPU values: a gloo group avoids a GPU round trip per env step.
    if backend == "gloo":
        _control_group = dist.group.WORLD
    else:
        _control_group = dist.new_group(backend="gloo", timeout=wait)
    return context()


def shutdown() -> None:
    """Leave the process group (all ranks, at the end of a run)."""
    global _control_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def abort() -> None:
    """Tear the process group down after a failure without waiting for anyone: the other ranks'
    pending and next collectives fail at once instead of hanging until the timeout."""
    with contextlib.suppress(Exception):
        shutdown()


@contextlib.contextmanager
def session(
    backend: str = "auto", timeout: float = 1800.0, device_type: str = "cpu"
) -> Iterator[DistributedContext]:
    """``init_distributed`` for the ``with`` block; on an exception ``abort`` (so the other ranks
    stop too) and re-raise, else ``shutdown``."""
    ctx = init_distributed(backend, timeout, device_type)
    try:
        yield ctx
    except BaseException:
        abort()
        raise
    shutdown()


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank died, left or hung."""
    if isinstance(error, dist.DistBackendError):
        return True
    text = str(error)
    return (
        isinstance(error, RuntimeError)
        and "gloo" in text
        and any(marker in text for marker in _PEER_FAILURE)
    )


# --------------------------------------------------------------------------------------
# Collectives (all no-ops in a single process)
# --------------------------------------------------------------------------------------


def _enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Average ``tensors`` over ranks in place: one flat all-reduce per (device, dtype)."""
    if not _enabled():
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    world = dist.get_world_size()
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for tensor in group:
            n = tensor.numel()
            tensor.copy_(flat[offset : offset + n].view_as(tensor))
            offset += n


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` with rank ``src``'s values (one flat broadcast per device/dtype)."""
    if not _enabled():
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src)
        offset = 0
        with torch.no_grad():
            for tensor in group:
                n = tensor.numel()
                tensor.copy_(flat[offset : offset + n].view_as(tensor))
                offset += n


def broadcast_modules(modules: Iterable[nn.Module], src: int = 0) -> None:
    """Every parameter and buffer of ``modules`` takes rank ``src``'s value."""
    if not _enabled():
        return
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen and tensor.numel() > 0:
                seen.add(id(tensor))
                tensors.append(tensor.data)
    broadcast_(tensors, src)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (same shape on all ranks).

    Shapes: ``[N, ...]`` -> ``[world_size * N, ...]``.
    """
    if not _enabled():
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, 0)


def all_reduce_sums(values: list[float]) -> list[float]:
    """Sum each value over ranks (float64 on the CPU control group)."""
    if not _enabled():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, group=_control_group)
    return tensor.tolist()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def check_same_config(config: dict[str, Any]) -> None:
    """Raise ``DistributedError`` on every rank unless all ranks hold the same config dict.

    A hash is all-gathered first; only on a mismatch are the configs themselves gathered, so the
    message can name the keys that differ.
    """
    if not _enabled():
        return
    text = json.dumps(config, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest, group=_control_group)
    if len(set(digests)) == 1:
        return
    flats: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flats, _flatten(config), group=_control_group)
    reference = flats[0]
    differences = []
    for rank, flat in enumerate(flats[1:], start=1):
        for key in sorted(set(reference) | set(flat)):
            if reference.get(key) != flat.get(key):
                differences.append(
                    f"{key}: rank 0 has {reference.get(key)!r}, rank {rank} has {flat.get(key)!r}"
                )
    shown = "; ".join(differences[:5]) + (" ..." if len(differences) > 5 else "")
    raise DistributedError(
        f"config differs across ranks ({shown}); launch every rank with the same arguments"
    )


__all__ = [
    "RANK_SEED_STRIDE",
    "DistributedContext",
    "DistributedError",
    "abort",
    "all_gather_cat",
    "all_reduce_mean_",
    "all_reduce_sums",
    "broadcast_",
    "broadcast_modules",
    "check_same_config",
    "context",
    "cuda_device_index",
    "init_distributed",
    "is_peer_failure",
    "launch_world_size",
    "rank_seed",
    "resolve_backend",
    "session",
    "shutdown",
]
