"""The processes of one cell: rank, world size, and the few collective operations the training
loop needs. :data:`SINGLE` is the one-process passthrough (every call is a no-op), so the loop
reads the same with one process or many.

Legend: rank r of world W; a step's global batch is split into S = W x grad_accum shares, share
``r + W * micro`` on rank r (see :func:`ablate.model.random_mask`).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch.nn as nn

__all__ = ["Dist", "SINGLE"]


class Dist:
    """One process: rank 0 of 1. Subclasses talk to a real process group."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """True on the rank that writes (database, checkpoints, logs)."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the step runs (DistributedDataParallel around ``model`` when W > 1)."""
        return model

    def no_sync(self, net: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on micro-batches before the ``last`` one."""
        return contextlib.nullcontext()

    def sum(self, value: float) -> float:
        """``value`` summed over ranks."""
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (a collective decision)."""
        return flag

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def barrier(self) -> None:
        """Wait for every rank."""


SINGLE = Dist()
