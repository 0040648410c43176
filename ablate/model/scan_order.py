"""Scan orders over an image token grid, and running one mixer per direction.

A permutation ``p: [L]`` reads the raster-ordered sequence ``x: [B, L, D]`` as ``x[:, p]``;
``inverse(p)`` puts a result back in raster order. Orders:

- ``forward``: raster (row by row, left to right);
- ``bidirectional``: raster and reversed raster;
- ``cross4``: VMamba's SS2D cross-scan: rows, columns, rows reversed, columns reversed.

:class:`MultiDirection` holds one mixer per direction (own parameters) and returns
``sum_k unpermute_k(mixer_k(permute_k(x)))``. Permutations may also be per sample
(``[K, B, S]``), which is how a variant interleaves text with the image tokens:
:func:`sequence_orders` places the caption in each direction's reading of ``[text; image]``,
:func:`pads_first` moves each sample's padded positions to the front (where Mamba's inert
positions are exactly equivalent to their absence).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from .labels import label

ORDERS = ("forward", "bidirectional", "cross4")


def scan_permutations(order: str, grid: tuple[int, int]) -> Tensor:
    """The directions of ``order`` on an ``(h, w)`` grid: a long tensor ``[K, h * w]``."""
    h, w = grid
    rows = torch.arange(h * w)  # raster index r * w + c, read row by row
    cols = rows.view(h, w).t().reshape(-1)  # read column by column
    if order == "forward":
        perms = [rows]
    elif order == "bidirectional":
        perms = [rows, rows.flip(0)]
    elif order == "cross4":
        perms = [rows, cols, rows.flip(0), cols.flip(0)]
    else:
        raise ValueError(f"scan order must be one of {', '.join(ORDERS)}; got {order!r}")
    return torch.stack(perms)


def inverse(perm: Tensor) -> Tensor:
    """Inverse of permutations along the last dim: ``x[..., p][..., inverse(p)] == x``."""
    inv = torch.empty_like(perm)
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return inv.scatter_(-1, perm, ar)


def permute(x: Tensor, perm: Tensor) -> Tensor:
    """Reorder the sequence dim of ``x: [B, S, ...]`` by ``perm: [S]`` or per sample ``[B, S]``
    (``x[b, perm[b, s]]``); ``perm`` must be a permutation (every index once): the gradient is
    taken as the inverse permutation's reordering, not as a scatter-add.

    One row gather of the ``[B * S, ...]`` view, forward and backward: 3-4x faster on CPU than
    a ``gather`` along dim 1 with an expanded index and its scatter-add (:func:`permute_ref`)."""
    b, s = x.shape[:2]
    rows = _rows(perm, b, s)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _take_rows(x, rows)
    return _Permute.apply(x, rows, _rows(inverse(perm), b, s))


def permute_ref(x: Tensor, perm: Tensor) -> Tensor:
    """:func:`permute` by ``index_select`` / ``gather`` along dim 1 (its reference twin)."""
    if perm.dim() == 1:
        return x.index_select(1, perm)
    idx = perm.view(perm.shape + (1,) * (x.dim() - 2)).expand(perm.shape + x.shape[2:])
    return x.gather(1, idx)


def _rows(perm: Tensor, b: int, s: int) -> Tensor:
    """``perm [S]`` or ``[B, S]`` -> the rows ``[B * S]`` of ``x.reshape(B * S, -1)`` to read."""
    return (perm.expand(b, s) + torch.arange(0, b * s, s, device=perm.device).unsqueeze(1)).reshape(-1)


def _take_rows(x: Tensor, rows: Tensor) -> Tensor:
    return x.reshape(x.shape[0] * x.shape[1], -1).index_select(0, rows).view(x.shape)


class _Permute(torch.autograd.Function):
    """``x``'s rows ``rows`` (a permutation); backward reads the gradient's rows ``inv_rows``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rows: Tensor, inv_rows: Tensor) -> Tensor:
        ctx.save_for_backward(inv_rows)
        return _take_rows(x, rows)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inv_rows,) = ctx.saved_tensors
        return _take_rows(grad, inv_rows), None, None


def sequence_orders(image_perms: Tensor, text_len: int, position: str) -> Tensor:
    """Per-direction reading orders over the concatenation ``[text; image]`` (indices in
    ``[0, T + L)``): ``[K, S]``, text at ``position`` of each direction's image order."""
    text = torch.arange(text_len)
    out = []
    for p in image_perms:
        img = p + text_len
        if position == "prefix":
            parts = [text, img]
        elif position == "suffix":
            parts = [img, text]
        else:
            half = img.shape[0] // 2
            parts = [img[:half], text, img[half:]]
        out.append(torch.cat(parts))
    return torch.stack(out)


def pads_first(orders: Tensor, mask: Tensor) -> Tensor:
    """Per-sample orders ``[K, B, S]``: ``orders [K, S]`` with each sample's masked-out positions
    (``mask [B, S]`` False) moved to the front, the others keeping their relative order."""
    m = mask[:, orders].permute(1, 0, 2)  # [K, B, S], mask read in each direction's order
    rank = torch.argsort(m.to(torch.uint8), dim=-1, stable=True)  # False (0) first
    return torch.gather(orders.unsqueeze(1).expand_as(m), -1, rank)


class MultiDirection(nn.Module):
    """One mixer per scan direction, outputs summed in the original order.

    ``make()`` builds a mixer ``f(x: [B, S, D], mask: [B, S] | None, **kw) -> [B, S, D]``
    (e.g. :class:`ablate.model.mamba.Mamba`); each direction gets its own parameters.
    """

    def __init__(self, make: Callable[[], nn.Module], n_directions: int):
        super().__init__()
        self.mixers = nn.ModuleList(make() for _ in range(n_directions))

    def forward(self, x: Tensor, perms: Tensor, mask: Tensor | None = None, **kw: Any) -> Tensor:
        """``x: [B, S, D]``; ``perms: [K, S]`` or ``[K, B, S]``; ``mask: [B, S]`` in x's order."""
        if perms.shape[0] != len(self.mixers):
            raise ValueError(f"MultiDirection: {len(self.mixers)} mixers but {perms.shape[0]} permutations")
        out = None
        for mixer, p in zip(self.mixers, perms):
            with label("scan_order.permute"):
                m = None if mask is None else permute(mask, p)
                xp = permute(x, p)
            y = mixer(xp, m, **kw)
            with label("scan_order.permute"):
                y = permute(y, inverse(p))
            out = y if out is None else out + y
        return out
