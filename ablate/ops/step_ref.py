"""One decoding step of the selective scan in torch: the reference of
:mod:`ablate.ops.state_update` (semantics and shapes there), and its argument checks."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def check_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor]) -> None:
    """Raise one clear ValueError for the first argument whose shape does not fit."""
    if state.dim() != 3:
        raise ValueError(f"selective_state_update: state must be [b, d, n], got {tuple(state.shape)}")
    b, d, n = state.shape
    for name, v, shape in (("x", x, (b, d)), ("dt", dt, (b, d)), ("A", A, (d, n)), ("B", B, (b, n)),
                           ("C", C, (b, n)), ("D", D, (d,)), ("z", z, (b, d)), ("dt_bias", dt_bias, (d,))):
        if v is not None and tuple(v.shape) != shape:
            raise ValueError(f"selective_state_update: {name} must be {list(shape)} for state "
                             f"{[b, d, n]}, got {list(v.shape)}")
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"selective_state_update: state must be float32 or float64, got {state.dtype}")


def selective_state_update_ref(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                               dt_bias: Optional[Tensor] = None, dt_softplus: bool = False) -> Tensor:
    """The formula in torch, in the state's dtype; ``state`` updated in place."""
    check_state_update(state, x, dt, A, B, C, D, z, dt_bias)
    f = state.dtype
    delta = dt.to(f) + dt_bias.to(f) if dt_bias is not None else dt.to(f)
    delta = F.softplus(delta) if dt_softplus else delta
    xf = x.to(f)
    state.mul_(torch.exp(delta.unsqueeze(-1) * A.to(f))).add_((delta * xf).unsqueeze(-1) * B.to(f).unsqueeze(1))
    out = (state * C.to(f).unsqueeze(1)).sum(-1)
    if D is not None:
        out = out + D.to(f) * xf
    if z is not None:
        out = out * F.silu(z.to(f))
    return out.to(x.dtype)
