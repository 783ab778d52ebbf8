"""Device selection, threads and seeding shared by every agent.

The full accelerator interface (precision policies, compiled update, simulated IPU) builds on
these; agents and world models never name a device themselves, they receive ``device``.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from runtime.config import AcceleratorConfig, ConfigError


def resolve_device(config: AcceleratorConfig) -> torch.device:
    """``auto`` -> cuda when available, else cpu. Asking for cuda without one is an error."""
    if config.name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "accelerator.name: 'cuda' requested but torch sees no CUDA device; "
            "use accelerator=cpu or accelerator=auto"
        )
    return torch.device(config.name)


def configure_threads(config: AcceleratorConfig) -> None:
    """Set torch's intra-op threads (1 is fastest for small ops beside env workers)."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the legacy global generator others use
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
