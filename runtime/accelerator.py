"""Build the accelerator a config names: ``make_accelerator(config)``, from a registry.

``Accelerator`` (``runtime.accelerator_base``) is the one interface that decides where and how
training runs; see that module for what it offers. This module turns a config into one:

- ``resolve_device`` / ``resolve_precision`` / ``resolve_compile`` read the config's choices
  (``auto`` included) the way every accelerator kind needs them;
- ``register_accelerator(name, factory)`` makes ``accelerator=<name>`` build
  ``factory(config, planned_updates)``; ``accelerator_names()`` lists the names;
- ``make_accelerator(config, planned_updates)`` looks ``config.accelerator.name`` up (an unknown
  name is a ``ConfigError`` listing the known ones).

Registered here: ``auto``, ``cpu`` and ``cuda`` (``Accelerator``: real bf16 autocast, TF32
matmuls, compiled update step when asked, times measured with CUDA events) and ``ipu-sim``
(``runtime.ipu_sim.IPUSimAccelerator``). The registry imports every kind; no kind imports the
registry (the base class and ``AcceleratorError`` live in modules of their own), so imports run
one way. ``Accelerator``, ``AcceleratorError`` and ``seed_everything`` are re-exported, so the
names importable from here are the same as before the split.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from imagine_rl.runtime import distributed
from imagine_rl.runtime.accelerator_base import PRECISIONS, Accelerator, seed_everything
from imagine_rl.runtime.config import AcceleratorConfig, Config, ConfigError
from imagine_rl.runtime.errors import AcceleratorError
from imagine_rl.runtime.ipu_sim import IPUSimAccelerator


def resolve_device(config: AcceleratorConfig) -> torch.device:
    """``auto`` -> cuda when available, else cpu. Asking for cuda without one is an error.
    ``ipu-sim`` runs on the host (cpu). Under ``torchrun`` each rank gets the GPU of its
    ``LOCAL_RANK``."""
    if config.name == "ipu-sim":
        return torch.device("cpu")
    if config.name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "accelerator.name: 'cuda' requested but torch sees no CUDA device; "
            "use accelerator=cpu or accelerator=auto"
        )
    if config.name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if distributed.launch_world_size() > 1:
        return torch.device("cuda", distributed.cuda_device_index())
    return torch.device("cuda")


def resolve_precision(config: Config) -> str:
    """fp32 | bf16 | fp16: ``accelerator.precision``, the one precision key, with ``auto`` as
    fp32 on every accelerator (``AcceleratorConfig.resolved_precision``). On ipu-sim it is fp32
    or fp16: ``runtime.config.validate`` refuses bf16 there."""
    return config.accelerator.resolved_precision


# A compiled update pays on cpu once it has repaid its cold compile: see the README's speed
# table (scripts/bench_train_step.py compile=both) for the measured compile time and savings.
CPU_COMPILE_MIN_UPDATES = 5000


def resolve_compile(config: Config, planned_updates: int | None = None) -> bool:
    """Whether ``agent.compile`` (``true``, ``false`` or ``auto``) compiles on this device.

    ``auto``: on for cuda (whole-update graphs replayed as CUDA graphs); on for cpu when the run
    plans at least ``CPU_COMPILE_MIN_UPDATES`` updates (``planned_updates``; off when unknown),
    so a short run or test is not kept waiting by a compile it would never repay; never
    for ipu-sim (its op trace is the cost model). An agent that cannot compile some
    configuration turns it off itself.
    """
    choice = config.agent.compile
    if choice != "auto":
        return bool(choice)
    if config.accelerator.name == "ipu-sim":
        return False
    if resolve_device(config.accelerator).type == "cuda":
        return True
    return planned_updates is not None and planned_updates >= CPU_COMPILE_MIN_UPDATES


def configure_threads(config: AcceleratorConfig) -> None:
    """Set torch's intra-op threads (1 is fastest for small ops beside env workers)."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)


# ``factory(config, planned_updates)`` -> the accelerator; ``planned_updates`` is the run's
# length in updates when known (it decides ``agent.compile=auto`` on cpu).
AcceleratorFactory = Callable[[Config, int | None], Accelerator]

_FACTORIES: dict[str, AcceleratorFactory] = {}


def register_accelerator(name: str, factory: AcceleratorFactory) -> None:
    """Make ``accelerator=<name>`` build ``factory(config, planned_updates)``.

    A registry rather than a chain of ``if``s, so that ``make_accelerator`` names no kind and a
    kind need not be imported by the code that picks one. A name is registered once: a second
    registration would silently change what every config with that name builds.
    """
    if name in _FACTORIES:
        raise ValueError(
            f"accelerator {name!r} is already registered; register the new one under another name"
        )
    _FACTORIES[name] = factory


def accelerator_names() -> tuple[str, ...]:
    """The names ``make_accelerator`` knows, sorted."""
    return tuple(sorted(_FACTORIES))


def make_accelerator(config: Config, planned_updates: int | None = None) -> Accelerator:
    """The accelerator ``config.accelerator`` (and ``config.ipu`` for ipu-sim) describes;
    ``planned_updates`` (the run's length) decides ``agent.compile=auto`` on cpu."""
    name = config.accelerator.name
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(
            f"accelerator.name: unknown accelerator {name!r}; "
            f"use one of {', '.join(accelerator_names())}"
        )
    return factory(config, planned_updates)


def _make_torch_accelerator(config: Config, planned_updates: int | None) -> Accelerator:
    """``auto``, ``cpu`` and ``cuda``: the device ``resolve_device`` picks."""
    acc = config.accelerator
    return Accelerator(
        resolve_device(acc),
        resolve_precision(config),
        deterministic=acc.deterministic,
        compiling=resolve_compile(config, planned_updates),
        tf32=acc.tf32,
    )


def _make_ipu_sim(config: Config, planned_updates: int | None) -> Accelerator:
    """``ipu-sim``: one process only (it never compiles, so ``planned_updates`` is unused)."""
    if distributed.context().enabled:
        raise AcceleratorError(
            "accelerator=ipu-sim simulates the IPUs of one process; run it without torchrun "
            "(or use accelerator=cpu/cuda under torchrun)"
        )
    return IPUSimAccelerator.from_config(config)


register_accelerator("auto", _make_torch_accelerator)
register_accelerator("cpu", _make_torch_accelerator)
register_accelerator("cuda", _make_torch_accelerator)
register_accelerator("ipu-sim", _make_ipu_sim)


__all__ = [
    "CPU_COMPILE_MIN_UPDATES",
    "PRECISIONS",
    "Accelerator",
    "AcceleratorError",
    "AcceleratorFactory",
    "accelerator_names",
    "configure_threads",
    "make_accelerator",
    "register_accelerator",
    "resolve_compile",
    "resolve_device",
    "resolve_precision",
    "seed_everything",
]
