"""Selective scan (Mamba's S6 recurrence): a sequential reference and two fast CPU paths.

Semantics and shapes follow mamba-ssm's ``selective_scan_fn``. Per channel d and state n::

    delta = softplus(delta + delta_bias)            (each step optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h_{-1} = initial_state or 0
    y_t   = sum_n C_t * h_t
    out   = (y + D * u) * silu(z)                                   (D and z optional)

Shapes (lower case as in mamba-ssm: b batch, d channels, n state size, L length, g groups)::

    u, delta, z      [b, d, L]
    A                [d, n]  or [b, d, n] (batch-dependent A, e.g. text-dependent decay)
    B, C             [d, n] (time-invariant) or [b, n, L] or [b, g, n, L] (channel d uses group
                     d // (d / g), as mamba-ssm's "(g h)" layout)
    D                [d] or [b, d]
    delta_bias       [d]
    initial_state    [b, d, n]
    out              [b, d, L] in u's dtype; last_state [b, d, n] in the compute dtype

Arithmetic runs in float64 when ``u`` is float64 and in float32 otherwise (half inputs are
upcast, as mamba-ssm's reference does).

Implementations (``impl``), one module each, all below this dispatcher and above
:mod:`ablate.ops.common` (checks and the shared prologue/epilogue): ``"cuda"`` mamba-ssm's kernel
(:mod:`ablate.ops.cuda`, optional ``cuda`` extra, CUDA tensors); ``"ref"``
:func:`~ablate.ops.scan_ref.selective_scan_ref` (the test oracle, autograd through a Python loop);
``"torch"`` :func:`~ablate.ops.scan_torch.selective_scan_fast` (custom autograd: no per-step
graph, reverse-time recurrence in backward, states recomputed chunk by chunk); ``"numba"``
:func:`selective_scan_numba` (the same algorithm fused into one compiled CPU kernel,
:mod:`ablate.ops.scan_numba`; needs the optional numba package, imported on first use).
:func:`selective_scan` picks one in :func:`_dispatch`: numba for CPU tensors with input-dependent
B and C when numba imports, the torch path otherwise.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from .common import ScanResult, check_delta_mask, compute_dtype, scan_delta
from .scan_ref import selective_scan_ref
from .scan_torch import selective_scan_fast

__all__ = ["IMPLS", "ScanResult", "default_impl", "numba_available", "selective_scan", "selective_scan_fast",
           "selective_scan_numba", "selective_scan_ref"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# numba kernel (lazy: numba is imported on the first call that wants it)

_numba_state: dict[str, object] = {}


def numba_available() -> bool:
    """Whether the numba kernel can run here (imports numba once; a failure is logged once)."""
    if "ok" not in _numba_state:
        try:
            from . import scan_numba  # noqa: F401  (imports numba)
            _numba_state["ok"] = True
        except Exception as exc:  # ImportError, or a numba/llvmlite that fails to load
            _numba_state["ok"] = False
            log.info("selective_scan: numba kernel unavailable (%s: %s); using the torch path",
                     type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return bool(_numba_state["ok"])


def selective_scan_numba(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                         delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                         return_last_state: bool = False, initial_state: Optional[Tensor] = None,
                         *, delta_mask: Optional[Tensor] = None, chunk_len: Optional[int] = None,
                         d_block: Optional[int] = None) -> ScanResult:
    """Same numbers as :func:`selective_scan_ref` from the fused numba kernel (CPU tensors only;
    ImportError without numba); ``delta_mask`` as in :func:`selective_scan`, applied in the
    kernel. ``chunk_len`` and ``d_block`` tune speed, never results; see
    :func:`ablate.ops.scan_numba.selective_scan_numba`."""
    if u.device.type != "cpu":
        raise ValueError(f"selective_scan: impl 'numba' runs on CPU tensors only, got {u.device}")
    from .scan_numba import selective_scan_numba as kernel
    return kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                  return_last_state=return_last_state, initial_state=initial_state,
                  delta_mask=delta_mask, chunk_len=chunk_len, d_block=d_block)


# ----------------------------------------------------------------------------------------------
# dispatch

def _cuda(*args: object, **kw: object) -> ScanResult:
    from .cuda import selective_scan_cuda  # lazy: mamba-ssm is imported only here
    return selective_scan_cuda(*args, **kw)


IMPLS: dict[str, Callable[..., ScanResult]] = {
    "ref": selective_scan_ref, "torch": selective_scan_fast, "numba": selective_scan_numba,
    "cuda": _cuda}
_default: list[Optional[str]] = [None]  # a stack; None = choose per call


@contextlib.contextmanager
def default_impl(impl: Optional[str]) -> Iterator[None]:
    """Within the block, :func:`selective_scan` calls without ``impl`` use ``impl`` (e.g. to time
    a model on the torch path); ``None`` restores the automatic choice."""
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"selective_scan: impl must be one of {sorted(IMPLS)}, got {impl!r}")
    _default.append(impl)
    try:
        yield
    finally:
        _default.pop()


def _dispatch(u: Tensor, B: Tensor, C: Tensor, impl: Optional[str]) -> Callable[..., ScanResult]:
    """The implementation for these inputs: ``impl`` if given, else the enclosing
    :func:`default_impl`, else for CUDA tensors mamba-ssm's kernel (which falls back to the torch
    path, logged once, for what it cannot express or when mamba-ssm is absent), for CPU tensors
    with input-dependent B and C numba when it imports (the kernel runs time-invariant ones
    unvectorised, slower than the torch path), else torch."""
    impl = impl if impl is not None else _default[-1]
    if impl is None:
        if u.device.type == "cuda":
            return _cuda
        if u.device.type == "cpu" and B.dim() > 2 and C.dim() > 2 and numba_available():
            return selective_scan_numba
        return selective_scan_fast
    if impl not in IMPLS:
        raise ValueError(f"selective_scan: impl must be one of {sorted(IMPLS)}, got {impl!r}")
    return IMPLS[impl]


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, initial_state: Optional[Tensor] = None,
                   A_scale: Optional[Tensor] = None, *, delta_mask: Optional[Tensor] = None,
                   impl: Optional[str] = None) -> ScanResult:
    """The selective scan (see the module docstring for shapes); ``impl`` forces ``"ref"``,
    ``"torch"``, ``"numba"`` or ``"cuda"``, otherwise the best available path is chosen.

    ``delta_mask [b, L]`` bool: where False the step's delta is 0 *after* bias and softplus, so
    the state passes through unchanged (an inert position). The numba kernel applies it in
    place; the other paths get ``delta`` with bias, softplus and mask applied beforehand.

    ``A_scale [b, d]`` (positive, with A ``[d, n]``) makes A per sample: ``A_b = A_scale_b * A``.
    The CUDA path folds it into delta and u (:mod:`ablate.ops.cuda`); the CPU paths take the
    ``[b, d, n]`` product."""
    if torch.is_autocast_enabled(u.device.type):
        # the state and its sums stay fp32 under autocast (as in mamba-ssm); inputs may be half
        with torch.autocast(device_type=u.device.type, enabled=False):
            return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state, A_scale, delta_mask=delta_mask, impl=impl)
    fn = _dispatch(u, B, C, impl)
    mask_kw = {}
    if delta_mask is not None:
        check_delta_mask(delta_mask, u)
        if fn is selective_scan_numba:
            mask_kw = dict(delta_mask=delta_mask)
        else:
            delta = scan_delta(delta, delta_bias, delta_softplus, compute_dtype(u), delta_mask)
            delta_bias, delta_softplus = None, False
    if A_scale is not None:
        if A.dim() != 2 or A_scale.shape != (u.shape[0], A.shape[0]):
            raise ValueError(f"selective_scan: A_scale must be [b, d] = {(u.shape[0], A.shape[0])} "
                             f"with A [d, n]; got A_scale {tuple(A_scale.shape)}, A {tuple(A.shape)}")
        if fn is _cuda:
            return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                      return_last_state=return_last_state, initial_state=initial_state, A_scale=A_scale)
        A = A_scale.unsqueeze(-1) * A
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              return_last_state=return_last_state, initial_state=initial_state, **mask_kw)
