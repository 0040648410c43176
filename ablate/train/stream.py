"""The token stream training reads: store splits, caption features and the step sampler.

``stream.train_batch(step)`` is a pure function of the step (and of the rank and world size):
the data position never needs saving, and a resumed or re-ranked job reads exactly the batches
an uninterrupted one would. Because it is, the next step's batch can be read ahead in a
background thread while this step computes (reading the memory-mapped codes and featurizing
captions mostly overlaps with the model's compute, which releases the GIL).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import torch

from ablate.data.stream import StepSampler

__all__ = ["TokenStream", "CaptionFeatures"]


class CaptionFeatures:
    """Text features of store samples, per batch: ``(split, idx) -> (feats, mask)`` on the
    device. A frozen encoder with ``text.cache`` encodes every caption of a split once (disk
    cache, held in memory: right for small and medium sets); otherwise, and for the learned
    encoder (whose features are word ids), captions are featurized batch by batch."""

    def __init__(self, encoder: Any, data: dict[str, Any], device: torch.device, cache: bool):
        self.encoder, self.data, self.device = encoder, data, device
        self.whole = cache and not getattr(encoder, "trainable", True)
        self._split: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.whole:
            if split not in self._split:
                feats = self.encoder.featurize(list(self.data[split].iter_captions()))
                self._split[split] = tuple(t.to(self.device) for t in feats)  # type: ignore[assignment]
            idx = idx.to(self.device)
            return tuple(t[idx] for t in self._split[split])  # type: ignore[return-value]
        feats = self.encoder.featurize_batch(self.data[split].captions(idx))
        return tuple(t.to(self.device, non_blocking=True) for t in feats)  # type: ignore[return-value]


class TokenStream:
    """Batches of (codes ``[b, L]``, text features ``[b, T, F]``, mask ``[b, T]``) on the device.

    ``data``: split name -> :class:`~ablate.data.store.SplitReader`; ``null``: the empty
    caption's features (classifier-free guidance), shape ``[1, T(, F)]``."""

    def __init__(self, data: dict[str, Any], encoder: Any, device: torch.device, batch_size: int, seed: int,
                 cache: bool):
        self.data, self.device = data, device
        self.features = CaptionFeatures(encoder, data, device, cache)
        self.sampler = StepSampler(len(data["train"]), batch_size, seed)
        self.null = tuple(t.to(device) for t in encoder.null_features(1))
        self._pool: Optional[ThreadPoolExecutor] = None
        self._ahead: Optional[tuple[tuple[int, int, int], Future]] = None  # (step, share, shares)

    def batch(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes long [b, L], text features [b, T, F], mask [b, T]) of samples ``idx`` of ``split``."""
        codes = self.data[split].codes(idx).to(self.device, non_blocking=True)
        feats, mask = self.features(split, idx)
        return codes, feats, mask

    def _read(self, step: int, share: int, shares: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.batch("train", self.sampler.indices(step, share, shares))

    def train_batch(self, step: int, share: int = 0, shares: int = 1,
                    stride: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training batch of ``step``, or share ``share`` of ``shares`` of it (rows
        ``share::shares``: a rank's micro-batch); starts reading the next share this process
        will ask for in the background: ``share + stride`` of the same step (``stride``: the
        number of ranks), else its first share of step + 1."""
        key = (step, share, shares)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == key:
            out = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].cancel()
            out = self._read(*key)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ablate-batch")
        nxt = (step, share + stride, shares) if share + stride < shares else (step + 1, share % stride, shares)
        self._ahead = (nxt, self._pool.submit(self._read, *nxt))
        return out

    def close(self) -> None:
        """Stop reading ahead (the thread ends; a later train_batch starts it again)."""
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
