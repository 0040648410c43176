"""The CUDA paths: mamba-ssm's ``selective_scan_fn`` and causal-conv1d's ``causal_conv1d_fn``.

Both packages are the optional ``cuda`` extra. They are imported on the first call that wants a
GPU kernel and never at module import, so a CPU-only install never touches them.

The kernel computes mamba-ssm's function only: A ``[d, n]``, D ``[d]``, no initial state, no
float64. The text-dependent variants need more, and this module maps what it can onto the
kernel:

- per-(sample, channel) scale of A (``A_scale [b, d]``, ``A_b = s_b * A``): since
  ``exp(delta * s * A) = exp((s * delta) * A)`` and ``delta * B * u = (s * delta) * B * (u / s)``,
  the kernel runs with ``delta' = s * softplus(delta + bias)`` (softplus and bias applied here,
  before the scale) and ``u' = u / s``. D and the gate z then act on the *original* u, so they
  are applied outside the kernel;
- D of shape ``[b, d]``: the kernel runs without D and z; ``(y + D * u) * silu(z)`` follows;
- a full batch-dependent A ``[b, d, n]``, an initial state, float64, a non-CUDA tensor, or a
  missing package: the kernel cannot express it, so the torch path runs (on the GPU) and the
  reason is logged once per reason.

``kernel`` arguments exist so the reparameterisation can be tested on CPU against the reference
with the reference standing in for the kernel (same semantics as ``selective_scan_fn``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import check_conv, check_scan
from .conv import causal_conv1d_fast
from .scan_torch import selective_scan_fast
from .step_ref import selective_state_update_ref

log = logging.getLogger(__name__)

_state: dict[str, Any] = {}
_said: set[tuple[str, str]] = set()


def _once(op: str, reason: str) -> None:
    """Log once per (op, reason) that the CUDA kernel of ``op`` did not run, and why."""
    if (op, reason) not in _said:
        _said.add((op, reason))
        log.warning("%s: CUDA kernel not used (%s); running the torch path", op, reason)


def _why_not(kernel: Optional[Callable[..., Any]], x: Tensor, package: str) -> Optional[str]:
    """Why a kernel of ``package`` cannot take ``x`` (not installed, not on a GPU, float64), or None."""
    if kernel is None:
        return f"{package} is not installed (pip install .[cuda])"
    if not x.is_cuda:
        return "tensors are not on a CUDA device"
    if x.dtype == torch.float64:
        return "float64 inputs"
    return None


def mamba_kernel() -> Optional[Callable[..., Any]]:
    """mamba-ssm's ``selective_scan_fn``, or None if the package does not import (logged once)."""
    if "scan" not in _state:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            _state["scan"] = selective_scan_fn
        except Exception as exc:  # ImportError, or a build for another CUDA/torch
            _state["scan"] = None
            log.info("mamba-ssm unavailable (%s: %s)", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return _state["scan"]


def conv_kernel() -> Optional[Callable[..., Any]]:
    """causal-conv1d's ``causal_conv1d_fn``, or None if the package does not import."""
    if "conv" not in _state:
        try:
            from causal_conv1d import causal_conv1d_fn
            _state["conv"] = causal_conv1d_fn
        except Exception as exc:
            _state["conv"] = None
            log.info("causal-conv1d unavailable (%s: %s)", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return _state["conv"]


def state_update_kernel() -> Optional[Callable[..., Any]]:
    """mamba-ssm's ``selective_state_update`` (one decoding step of the SSM, state updated in
    place: the kernel ``Mamba.step`` uses), or None if the package does not import."""
    if "step" not in _state:
        try:
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update
            _state["step"] = selective_state_update
        except Exception as exc:
            _state["step"] = None
            log.info("mamba-ssm's state update unavailable (%s)", type(exc).__name__)
    return _state["step"]


def cuda_available() -> bool:
    """Whether the mamba-ssm kernel can run here (a GPU and an importable package)."""
    return torch.cuda.is_available() and mamba_kernel() is not None


def unsupported(u: Tensor, A: Tensor, initial_state: Optional[Tensor]) -> Optional[str]:
    """Why the kernel cannot run these inputs, or None."""
    if not u.is_cuda:
        return "tensors are not on a CUDA device"
    if u.dtype == torch.float64:
        return "float64 inputs"
    if A.dim() == 3:
        return "a full batch-dependent A [b, d, n] (only a per-channel scale maps onto the kernel)"
    if initial_state is not None:
        return "an initial state"
    return None


def selective_scan_kernel(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                          delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                          return_last_state: bool = False, A_scale: Optional[Tensor] = None,
                          *, kernel: Callable[..., Any]):
    """The scan through ``kernel`` (``selective_scan_fn`` semantics), with ``A_scale [b, d]`` and
    a per-sample ``D [b, d]`` mapped onto it as the module docstring describes. Inputs must be
    kernel-expressible (A ``[d, n]``, no initial state)."""
    outside = A_scale is not None or (D is not None and D.dim() == 2)
    if not outside:
        return kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                      delta_softplus=delta_softplus, return_last_state=return_last_state)
    dtype = torch.float32 if u.dtype != torch.float64 else torch.float64
    uk, dk = u, delta
    if A_scale is not None:
        s = A_scale.to(dtype).unsqueeze(-1)  # [b, d, 1], positive
        dk = delta.to(dtype)
        if delta_bias is not None:
            dk = dk + delta_bias.to(dtype).unsqueeze(-1)
        if delta_softplus:
            dk = F.softplus(dk)
        dk = (dk * s).to(delta.dtype)
        uk = (u.to(dtype) / s).to(u.dtype)
        delta_bias, delta_softplus = None, False
    out = kernel(uk, dk, A, B, C, D=None, z=None, delta_bias=delta_bias,
                 delta_softplus=delta_softplus, return_last_state=return_last_state)
    y, last = out if return_last_state else (out, None)
    y = y.to(dtype)
    if D is not None:
        Dd = D.to(dtype)
        y = y + u.to(dtype) * (Dd.unsqueeze(-1) if Dd.dim() == 2 else Dd.view(1, -1, 1))
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y


def selective_scan_cuda(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                        delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                        return_last_state: bool = False, initial_state: Optional[Tensor] = None,
                        A_scale: Optional[Tensor] = None):
    """mamba-ssm's kernel where it can express the inputs, else the torch path (logged once)."""
    check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    kernel = mamba_kernel()
    reason = "mamba-ssm is not installed (pip install .[cuda])" if kernel is None else unsupported(u, A, initial_state)
    if reason is not None:
        _once("selective_scan", reason)
        if A_scale is not None:
            A = A_scale.unsqueeze(-1) * A
        return selective_scan_fast(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                   delta_softplus=delta_softplus, return_last_state=return_last_state,
                                   initial_state=initial_state)
    return selective_scan_kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                 delta_softplus=delta_softplus, return_last_state=return_last_state,
                                 A_scale=A_scale, kernel=kernel)


def causal_conv1d_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                       activation: Optional[str] = None) -> Tensor:
    """causal-conv1d's kernel (widths 2 to 4, no float64), else the fast torch path."""
    check_conv(x, weight, bias, activation)
    kernel = conv_kernel()
    reason = _why_not(kernel, x, "causal-conv1d")
    if reason is None and not 2 <= weight.shape[-1] <= 4:
        reason = f"kernel width {weight.shape[-1]} (the CUDA kernel takes 2 to 4)"
    if reason is not None:
        _once("causal_conv1d", reason)
        return causal_conv1d_fast(x, weight, bias, activation)
    return kernel(x, weight, bias, activation=activation)


def state_update_cuda(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                      D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                      dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                      kernel: Optional[Callable[..., Any]] = None) -> Tensor:
    """mamba-ssm's ``selective_state_update`` (``kernel``: a stand-in with its semantics, for
    tests), else the torch formula (logged once): float64, a CPU tensor, or no mamba-ssm."""
    if kernel is None:
        kernel = state_update_kernel()
        reason = _why_not(kernel, state, "mamba-ssm") or _why_not(kernel, x, "mamba-ssm")
        if reason is not None:
            _once("selective_state_update", reason)
            return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    c = lambda v: None if v is None else v.contiguous()  # noqa: E731
    f = state.dtype  # float32 (the kernel's): the parameters in it, the activations as they are
    return kernel(state, c(x), c(dt), A.to(f), c(B), c(C), None if D is None else D.to(f), z=c(z),
                  dt_bias=None if dt_bias is None else dt_bias.to(f), dt_softplus=dt_softplus)
