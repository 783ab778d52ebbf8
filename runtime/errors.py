"""The accelerators' error, in a module of its own so that any accelerator can raise it.

``runtime.accelerator`` builds accelerators by name, so it imports every kind of accelerator
(``runtime.ipu_sim`` among them); were the error defined there, an accelerator raising it
would import its own builder and the two modules would import each other. This module imports
nothing of ours. ``runtime.accelerator`` re-exports it, so ``from runtime.accelerator import
AcceleratorError`` keeps working.
"""

from __future__ import annotations


class AcceleratorError(RuntimeError):
    """The accelerator cannot run this (a device limit, a broken constraint). One-line message
    naming the problem and the fix; scripts print it without a traceback."""


__all__ = ["AcceleratorError"]
