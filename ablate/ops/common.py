"""What every path of the two SSM ops shares: argument checks, dtypes, the scan's prologue and
epilogue. A leaf: the paths (``scan_ref``, ``scan_torch``, ``scan_numba``, ``cuda``, ``conv``)
import it, and the dispatchers (``selective_scan``, ``causal_conv1d``) import the paths, so no
module of :mod:`ablate.ops` imports one above it."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

ScanResult = Union[Tensor, tuple[Tensor, Tensor]]


def compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def check_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
               z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor]) -> None:
    """Raise one clear ValueError for the first argument whose shape does not fit."""
    if u.dim() != 3 or u.shape[-1] < 1:
        raise ValueError(f"selective_scan: u must be [b, d, L] with L >= 1, got {tuple(u.shape)}")
    b, d, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must match u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must match u {tuple(u.shape)}, got {tuple(z.shape)}")
    if A.dim() == 2 and A.shape[0] == d:
        n = A.shape[1]
    elif A.dim() == 3 and A.shape[:2] == (b, d):
        n = A.shape[2]
    else:
        raise ValueError(f"selective_scan: A must be [d, n] or [b, d, n] with b={b}, d={d}, "
                         f"got {tuple(A.shape)}")
    for name, X in (("B", B), ("C", C)):
        ok = ((X.dim() == 2 and X.shape == (d, n))
              or (X.dim() == 3 and X.shape == (b, n, L))
              or (X.dim() == 4 and X.shape[0] == b and X.shape[2:] == (n, L)
                  and X.shape[1] >= 1 and d % X.shape[1] == 0))
        if not ok:
            raise ValueError(f"selective_scan: {name} must be [d, n], [b, n, L] or [b, g, n, L] "
                             f"(g dividing d) with b={b}, d={d}, n={n}, L={L}; got {tuple(X.shape)}")
    if D is not None and D.shape not in ((d,), (b, d)):
        raise ValueError(f"selective_scan: D must be [d] or [b, d] with b={b}, d={d}, got {tuple(D.shape)}")
    if delta_bias is not None and delta_bias.shape != (d,):
        raise ValueError(f"selective_scan: delta_bias must be [d] with d={d}, got {tuple(delta_bias.shape)}")
    if initial_state is not None and initial_state.shape != (b, d, n):
        raise ValueError(f"selective_scan: initial_state must be [b, d, n] = {(b, d, n)}, "
                         f"got {tuple(initial_state.shape)}")


def finish(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    """``(y + D * u) * silu(z)`` with D of shape [d] or [b, d]; all [b, d, L]."""
    if D is not None:
        y = y + u * D.to(y.dtype).unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def scan_delta(delta: Tensor, delta_bias: Optional[Tensor], softplus: bool, dtype: torch.dtype,
               mask: Optional[Tensor] = None) -> Tensor:
    """The scan's step sizes ``softplus(delta + delta_bias)`` (each part optional) in ``dtype``,
    [b, d, L]; 0 where ``mask`` [b, L] is False."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype).unsqueeze(-1)
    delta = F.softplus(delta) if softplus else delta
    return delta if mask is None else torch.where(mask.unsqueeze(1), delta, delta.new_zeros(()))


def check_delta_mask(mask: Tensor, u: Tensor) -> None:
    if mask.dtype != torch.bool or mask.shape != (u.shape[0], u.shape[-1]):
        raise ValueError(f"selective_scan: delta_mask must be a bool [b, L] = {(u.shape[0], u.shape[-1])}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def check_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [b, d, L], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d: weight must be [d, k] with d={x.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"causal_conv1d: bias must be [d] with d={x.shape[1]}, got {tuple(bias.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")


def conv_activation(y: Tensor, activation: Optional[str]) -> Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y
