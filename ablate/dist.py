"""The processes of one cell: rank, world size, and the few collective operations the training
loop needs. :data:`SINGLE` is the one-process passthrough (every call is a no-op), so the loop
reads the same with one process or many.

Legend: rank r of world W; a step's global batch is split into S = W x grad_accum shares, share
``r + W * micro`` on rank r (see :func:`ablate.paradigm.random_mask`).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch.nn as nn

__all__ = ["Dist", "SINGLE", "TorchDist", "from_env"]


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

    def gather_tensors(self, x: Any) -> Any:
        """Every rank's ``x`` concatenated in rank order on rank 0 (None elsewhere)."""
        return x

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Leave the process group."""


SINGLE = Dist()


class TorchDist(Dist):
    """A rank of a ``torch.distributed`` process group (gloo on CPU, NCCL on CUDA), set up from
    the environment every launcher provides: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` (and ``LOCAL_RANK`` for the GPU). Every collective times out after
    ``timeout_s``: a rank that died makes the others fail instead of hang."""

    def __init__(self, timeout_s: float = 300.0, device_type: str = "cpu"):
        import datetime
        import os

        import torch.distributed as td

        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.backend = "nccl" if device_type == "cuda" else "gloo"
        if not td.is_initialized():
            td.init_process_group(self.backend, rank=self.rank, world_size=self.world,
                                  timeout=datetime.timedelta(seconds=timeout_s))
        self._td = td

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        # some backbones leave parameters unused on some steps (e.g. a critic head): tolerate it
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                       find_unused_parameters=True)

    def no_sync(self, net: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()

    def _reduce(self, value: float, op: Any) -> float:
        import torch

        t = torch.tensor([float(value)], dtype=torch.float64,
                         device="cuda" if self.backend == "nccl" else "cpu")
        self._td.all_reduce(t, op=op)
        return float(t.item())

    def sum(self, value: float) -> float:
        return self._reduce(value, self._td.ReduceOp.SUM)

    def any(self, flag: bool) -> bool:
        return self._reduce(1.0 if flag else 0.0, self._td.ReduceOp.MAX) > 0

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        self._td.broadcast_object_list(box, src=0)
        return box[0]

    def gather_tensors(self, x: Any) -> Any:
        """Rank 0: every rank's ``x`` (tensors of any first-dimension length, same trailing
        shape), concatenated in rank order; other ranks: None."""
        import torch

        parts: list = [None] * self.world if self.rank == 0 else None
        self._td.gather_object(x.cpu(), parts, dst=0)
        return torch.cat(parts) if self.rank == 0 else None

    def barrier(self) -> None:
        self._td.barrier()

    def close(self) -> None:
        if self._td.is_initialized():
            self._td.destroy_process_group()


def from_env(timeout_s: float = 300.0, device_type: str = "cpu") -> Dist:
    """:class:`TorchDist` when the environment names a world of more than one process, else
    :data:`SINGLE`."""
    import os

    return TorchDist(timeout_s, device_type) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else SINGLE
