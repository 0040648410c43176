"""One decoding step of the selective scan: mamba-ssm's ``selective_state_update``.

For each sample b and channel d, with the state ``h [b, d, n]`` updated in place::

    delta = softplus(dt + dt_bias)                          (each step optional)
    h     = exp(delta * A) * h + delta * B * x
    out   = (sum_n C * h + D * x) * silu(z)                 (D and z optional)

Shapes: ``state [b, d, n]`` (float32 or float64: the compute dtype; never half), ``x``, ``dt``,
``z`` ``[b, d]``, ``A [d, n]``, ``B``, ``C`` ``[b, n]``, ``D``, ``dt_bias`` ``[d]``; ``out [b, d]``
in x's dtype. It is the scan of :mod:`ablate.ops.selective_scan` for one position with the
state carried over, without the scan's layout changes, chunking and autograd: what sampling
calls once per token per layer.

Paths (``impl``): ``"cuda"`` mamba-ssm's Triton kernel (:mod:`ablate.ops.cuda`; CUDA tensors
that are not float64, and mamba-ssm installed), ``"numba"`` one fused pass over the state
(:func:`ablate.ops.scan_numba.state_update_numba`; CPU, numba installed), ``"ref"`` the formula
above in torch (:mod:`ablate.ops.step_ref`; any device; the test oracle). By default the first that can run these inputs.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from .step_ref import check_state_update, selective_state_update_ref

__all__ = ["IMPLS", "selective_state_update", "selective_state_update_ref"]


def _numba(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
           D: Optional[Tensor] = None, z: Optional[Tensor] = None,
           dt_bias: Optional[Tensor] = None, dt_softplus: bool = False) -> Tensor:
    from .scan_numba import state_update_numba  # lazy: imports numba

    check_state_update(state, x, dt, A, B, C, D, z, dt_bias)
    return state_update_numba(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _cuda(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
          D: Optional[Tensor] = None, z: Optional[Tensor] = None,
          dt_bias: Optional[Tensor] = None, dt_softplus: bool = False) -> Tensor:
    from .cuda import state_update_cuda  # lazy: mamba-ssm is imported only here

    check_state_update(state, x, dt, A, B, C, D, z, dt_bias)
    return state_update_cuda(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


IMPLS: dict[str, Callable[..., Tensor]] = {"ref": selective_state_update_ref, "numba": _numba, "cuda": _cuda}


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                           dt_bias: Optional[Tensor] = None, dt_softplus: bool = False, *,
                           impl: Optional[str] = None) -> Tensor:
    """One step (see the module docstring); ``state`` is updated in place, ``out [b, d]`` returned.
    ``impl`` forces ``"ref"``, ``"numba"`` or ``"cuda"``; by default CUDA tensors take mamba-ssm's
    kernel (the torch formula where it cannot run, logged once), CPU tensors numba's when it
    imports, else the torch formula."""
    if impl is None:
        from .selective_scan import numba_available

        if state.is_cuda:
            impl = "cuda"
        else:
            impl = "numba" if numba_available() else "ref"
    if impl not in IMPLS:
        raise ValueError(f"selective_state_update: impl must be one of {sorted(IMPLS)}, got {impl!r}")
    return IMPLS[impl](state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
