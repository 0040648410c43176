"""Batches from a token store as a pure function of the training step.

An epoch is a seeded permutation of the split; the batch at step ``s`` is positions
``s*B .. (s+1)*B - 1`` of the concatenated epochs. Nothing is iterated, so nothing needs saving
for an exact resume: a job restarted at step ``s`` reads exactly the batches it would have read,
and a rank of a multi-process job reads its own slice of the same global batch.

Memory: one permutation of the split at a time (int64, 8 bytes a sample: 8 MB per million),
plus the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ablate.utils import step_seed

__all__ = ["StepSampler", "Batch"]

EPOCH_SALT = 17


@dataclass
class Batch:
    """One batch: sample indices ``[b]``, codes long ``[b, L]``, captions (b strings)."""

    idx: torch.Tensor
    codes: torch.Tensor
    captions: list[str]


class StepSampler:
    """Global sample indices of the batch at ``step`` over ``n`` samples, seeded by ``seed``."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise ValueError("StepSampler: the split is empty")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self._perm: Optional[tuple[int, torch.Tensor]] = None  # (epoch, permutation): the current one

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch, salt=EPOCH_SALT))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def indices(self, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """long ``[B // world]``: rank ``rank``'s share of the global batch at ``step``
        (``B = batch_size``; ranks take interleaved positions, so together they read exactly
        the single-process batch)."""
        b = self.batch_size
        flat = torch.arange(step * b, (step + 1) * b)[rank::world]
        epochs = flat.div(self.n, rounding_mode="floor")
        out = torch.empty(flat.numel(), dtype=torch.long)
        for epoch in epochs.unique().tolist():
            sel = epochs == epoch
            out[sel] = self.permutation(epoch)[flat[sel] % self.n]
        return out
