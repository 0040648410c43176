"""Causal depthwise 1-D convolution (Mamba's short conv before the scan).

``out[:, c, t] = bias[c] + sum_j weight[c, j] * x[:, c, t - (k - 1) + j]`` with zeros before
position 0, so output t never sees inputs after t. Shapes: ``x [b, d, L]``, ``weight [d, k]``,
``bias [d]``; the signature is causal-conv1d's ``causal_conv1d_fn`` (activation ``None`` or
``"silu"``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [b, d, L], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d: weight must be [d, k] with d={x.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"causal_conv1d: bias must be [d] with d={x.shape[1]}, got {tuple(bias.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")


def _act(y: Tensor, activation: Optional[str]) -> Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      activation: Optional[str] = None) -> Tensor:
    """Reference: ``F.conv1d`` with ``groups=d`` on the left-padded input. Returns [b, d, L]."""
    _check(x, weight, bias, activation)
    k = weight.shape[1]
    y = F.conv1d(F.pad(x, (k - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return _act(y, activation)


class _CausalConvFn(torch.autograd.Function):
    """k shifted multiply-adds on slices of x, forward and backward written out. Works on any
    memory layout of x (in Mamba x is a [b, d, L] view of time-major storage) and creates no
    padded copy; the output has x's layout."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        L = x.shape[-1]
        k = weight.shape[1]
        w = weight.unsqueeze(-1)  # [d, k, 1]
        y = torch.mul(x, w[:, k - 1])  # the current position
        for s in range(1, min(k, L)):  # output t also sees x[t - s]
            y[..., s:].addcmul_(x[..., :L - s], w[:, k - 1 - s])
        if bias is not None:
            y.add_(bias.unsqueeze(-1))
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        L = x.shape[-1]
        k = weight.shape[1]
        w = weight.unsqueeze(-1)
        dx = torch.mul(dy, w[:, k - 1])
        dw = torch.empty_like(weight)
        dw[:, k - 1] = (dy * x).sum(dim=(0, 2))
        for s in range(1, k):
            if s < L:
                dx[..., :L - s].addcmul_(dy[..., s:], w[:, k - 1 - s])
                dw[:, k - 1 - s] = (dy[..., s:] * x[..., :L - s]).sum(dim=(0, 2))
            else:
                dw[:, k - 1 - s] = 0
        db = dy.sum(dim=(0, 2)) if ctx.has_bias else None
        return dx, dw, db


def causal_conv1d_fast(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                       activation: Optional[str] = None) -> Tensor:
    """Same numbers as :func:`causal_conv1d_ref` from k shifted multiply-adds: for Mamba's k = 4
    faster than the generic depthwise conv on CPU, forward and backward, and layout-preserving."""
    _check(x, weight, bias, activation)
    return _act(_CausalConvFn.apply(x, weight, bias), activation)


def _cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
          activation: Optional[str] = None) -> Tensor:
    from .cuda import causal_conv1d_cuda  # lazy: causal-conv1d is imported only here
    return causal_conv1d_cuda(x, weight, bias, activation)


IMPLS: dict[str, Callable[..., Tensor]] = {"ref": causal_conv1d_ref, "fast": causal_conv1d_fast,
                                          "cuda": _cuda}


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  activation: Optional[str] = None, *, impl: Optional[str] = None) -> Tensor:
    """Causal depthwise conv ``[b, d, L] -> [b, d, L]``; ``impl`` forces ``"ref"``, ``"fast"`` or
    ``"cuda"`` (causal-conv1d's kernel, falling back to ``"fast"`` where it cannot run); by
    default CUDA tensors take ``"cuda"`` and others ``"fast"``."""
    if impl is None:
        return (_cuda if x.is_cuda else causal_conv1d_fast)(x, weight, bias, activation)
    if impl not in IMPLS:
        raise ValueError(f"causal_conv1d: impl must be one of {sorted(IMPLS)}, got {impl!r}")
    return IMPLS[impl](x, weight, bias, activation)
