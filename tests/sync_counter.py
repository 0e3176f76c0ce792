"""Counting host syncs: the calls that read a tensor's value on the host.

On a GPU each such call makes the host wait until the device has finished the work queued
before it, which serialises the two; on the CPU the same calls are counted, so a test on CPU
catches what would stall a GPU.
"""

from __future__ import annotations

import sys

import torch

#: Tensor methods that read a tensor's value on the host (each a device sync on a GPU).
HOST_SYNCS = frozenset(
    {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "nonzero", "equal", "allclose", "is_nonzero"}
)


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Records, in order, every call of :data:`HOST_SYNCS` made while it is active.

    Attributes:
        calls: The method names.
        callers: The file of the code that made each call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.callers: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_SYNCS:
            self.calls.append(name)
            self.callers.append(sys._getframe(1).f_code.co_filename)
        return func(*args, **(kwargs or {}))

    def made_by(self, folder: str) -> int:
        """How many of the calls came from code under ``folder``."""
        return sum(caller.startswith(folder) for caller in self.callers)
