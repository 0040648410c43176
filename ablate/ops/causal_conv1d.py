"""Causal depthwise 1-D convolution, dispatched: ``out[:, c, t] = bias[c] + sum_j weight[c, j] *
x[:, c, t - (k - 1) + j]`` (zeros before position 0), causal-conv1d's ``causal_conv1d_fn``
signature. Paths: :func:`~ablate.ops.conv.causal_conv1d_ref` (the oracle),
:func:`~ablate.ops.conv.causal_conv1d_fast` (any device; the fallback), the fused numba kernel
on CPU (:mod:`ablate.ops.conv_numba`, when numba imports), causal-conv1d's kernel on CUDA
(:mod:`ablate.ops.cuda`, optional extra); the last two imported on first use."""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from .conv import causal_conv1d_fast, causal_conv1d_ref

__all__ = ["IMPLS", "causal_conv1d", "causal_conv1d_fast", "causal_conv1d_ref"]


def _cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
          activation: Optional[str] = None) -> Tensor:
    from .cuda import causal_conv1d_cuda  # lazy: causal-conv1d is imported only here
    return causal_conv1d_cuda(x, weight, bias, activation)


def _numba(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           activation: Optional[str] = None) -> Tensor:
    from .conv_numba import causal_conv1d_numba  # lazy: imports numba
    return causal_conv1d_numba(x, weight, bias, activation)


IMPLS: dict[str, Callable[..., Tensor]] = {"ref": causal_conv1d_ref, "fast": causal_conv1d_fast,
                                          "numba": _numba, "cuda": _cuda}


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  activation: Optional[str] = None, *, impl: Optional[str] = None) -> Tensor:
    """Causal depthwise conv ``[b, d, L] -> [b, d, L]``; ``impl`` forces ``"ref"``, ``"fast"``,
    ``"numba"`` (the fused CPU kernel, :mod:`ablate.ops.conv_numba`) or ``"cuda"``
    (causal-conv1d's kernel, falling back to ``"fast"`` where it cannot run); by default CUDA
    tensors take ``"cuda"``, CPU tensors ``"numba"`` when numba imports, others ``"fast"``."""
    if impl is None:
        if x.is_cuda:
            return _cuda(x, weight, bias, activation)
        from .selective_scan import numba_available

        fn = _numba if x.device.type == "cpu" and numba_available() else causal_conv1d_fast
        return fn(x, weight, bias, activation)
    if impl not in IMPLS:
        raise ValueError(f"causal_conv1d: impl must be one of {sorted(IMPLS)}, got {impl!r}")
    return IMPLS[impl](x, weight, bias, activation)
