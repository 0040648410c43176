"""The selective scan's reference: the plain recurrence, one Python step per position (the test
oracle; see :mod:`ablate.ops.selective_scan` for the semantics and shapes)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import ScanResult, check_scan, compute_dtype, finish, scan_delta


def _bc_ref(X: Tensor, d: int) -> Tensor:
    """B or C as a tensor broadcastable to [b, d, n, L]."""
    if X.dim() == 2:  # [d, n]
        return X.unsqueeze(0).unsqueeze(-1)
    if X.dim() == 3:  # [b, n, L]
        return X.unsqueeze(1)
    return X.repeat_interleave(d // X.shape[1], dim=1)  # [b, g, n, L] -> [b, d, n, L]


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                       delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                       return_last_state: bool = False,
                       initial_state: Optional[Tensor] = None) -> ScanResult:
    """The plain recurrence, one Python step per position: slow, obviously right, differentiable
    by autograd. Returns ``out [b, d, L]`` (and ``last_state [b, d, n]``)."""
    check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype = compute_dtype(u)
    b, d, L = u.shape
    uc = u.to(dtype)
    dt = scan_delta(delta, delta_bias, delta_softplus, dtype)
    Ab = A.to(dtype) if A.dim() == 3 else A.to(dtype).unsqueeze(0)  # [b|1, d, n]
    Bx, Cx = _bc_ref(B.to(dtype), d), _bc_ref(C.to(dtype), d)  # [b|1, d|1, n, L|1]
    h = (initial_state.to(dtype) if initial_state is not None
         else uc.new_zeros(b, d, Ab.shape[-1]))
    ys = []
    for t in range(L):
        dt_t = dt[:, :, t].unsqueeze(-1)  # [b, d, 1]
        Bt = Bx[..., t if Bx.shape[-1] > 1 else 0]
        Ct = Cx[..., t if Cx.shape[-1] > 1 else 0]
        h = torch.exp(dt_t * Ab) * h + dt_t * Bt * uc[:, :, t].unsqueeze(-1)
        ys.append((h * Ct).sum(-1))
    out = finish(torch.stack(ys, dim=-1), uc, D, z).to(u.dtype)
    return (out, h) if return_last_state else out
