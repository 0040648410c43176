"""Causal depthwise 1-D convolution (Mamba's short conv before the scan): the reference and the
CPU/any-device path (the CUDA one is :mod:`ablate.ops.cuda`; :mod:`ablate.ops.causal_conv1d`
chooses).

``out[:, c, t] = bias[c] + sum_j weight[c, j] * x[:, c, t - (k - 1) + j]`` with zeros before
position 0, so output t never sees inputs after t. Shapes: ``x [b, d, L]``, ``weight [d, k]``,
``bias [d]``; the signature is causal-conv1d's ``causal_conv1d_fn`` (activation ``None`` or
``"silu"``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import check_conv, conv_activation


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      activation: Optional[str] = None) -> Tensor:
    """Reference: ``F.conv1d`` with ``groups=d`` on the left-padded input. Returns [b, d, L]."""
    check_conv(x, weight, bias, activation)
    k = weight.shape[1]
    y = F.conv1d(F.pad(x, (k - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return conv_activation(y, activation)


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
    check_conv(x, weight, bias, activation)
    return conv_activation(_CausalConvFn.apply(x, weight, bias), activation)
