"""The Mamba (S6) block, parameterised and initialised as mamba-ssm's ``modules/mamba_simple.Mamba``.

Parameter names and shapes match mamba-ssm (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``,
``A_log``, ``D``, ``out_proj``), so a state dict moves between the two. On top of the plain block,
``forward`` takes optional hooks for text-dependent variants; each is the identity at zero:

- ``B_add`` / ``C_add`` ``[B, N]`` or ``[B, N, L]``: added to the input-dependent B / C;
- ``A_log_add`` ``[B, E]`` or ``[B, E, N]``: added to ``A_log``, i.e. A is multiplied by the
  positive per-sample scale ``exp(A_log_add)`` (the decay stays negative);
- ``D_add`` ``[B, E]``: added to the skip D, giving a per-sample D;
- ``x_add`` / ``z_add`` ``[B, L, E]``: added to the two halves of ``in_proj``'s output (the
  conv/scan branch x and the gate z), e.g. a cross-attention read of the text;
- ``initial_state`` ``[B, E, N]``: the SSM state before position 0;
- ``mask`` ``[B, L]`` bool: positions marked False are inert (see :meth:`Mamba.forward`).

Legend: B batch, L sequence length, D model width, E inner width (expand * D), N state size,
R dt rank.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops import causal_conv1d, selective_scan, selective_state_update
from .labels import label


def dt_rank_for(d_model: int, dt_rank: Union[int, str] = "auto") -> int:
    """mamba-ssm's default rank of the dt projection: ``ceil(D / 16)``."""
    return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


class Mamba(nn.Module):
    """One Mamba mixer: ``[B, L, D] -> [B, L, D]`` (no norm, no residual: the caller adds them)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False):
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = dt_rank_for(d_model, dt_rank)
        E, N, R = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        # an nn.Conv1d only to hold weight [E, 1, k] / bias [E] in mamba-ssm's layout; the
        # convolution itself is ablate.ops.causal_conv1d
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, bias=conv_bias, padding=d_conv - 1)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=bias)

        # dt_proj: weight so that the initial dt spread is independent of R; bias so that
        # softplus(bias) is log-uniform in [dt_min, dt_max] (mamba-ssm's "dt_init")
        std = R ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation: A = -(1, 2, ..., N) for every channel
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)  # [E, N]
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(E))
        self.D._no_weight_decay = True

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, *,
                B_add: Optional[Tensor] = None, C_add: Optional[Tensor] = None,
                A_log_add: Optional[Tensor] = None, D_add: Optional[Tensor] = None,
                x_add: Optional[Tensor] = None, z_add: Optional[Tensor] = None,
                initial_state: Optional[Tensor] = None,
                return_last_state: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """``x: [B, L, D] -> [B, L, D]`` (and the final state ``[B, E, N]`` if asked).

        Where ``mask`` is False the position is inert: its conv input is zero (so it leaks into no
        neighbour through the conv window) and its dt is zero (so the state neither decays nor
        receives input there). Outputs at inert positions are meaningless; callers drop them.
        """
        b, L, _ = x.shape
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        # Work time-major ([L, B, .] storage, [B, E, L] views for the ops): the scan steps over
        # contiguous [B, E, N] slices, so no transpose copy of E-wide tensors is ever made.
        xt = x.transpose(0, 1)  # [L, B, D]
        keep = None
        if mask is not None:
            keep_t = mask.t().unsqueeze(-1)  # [L, B, 1]
            keep = keep_t.contiguous().permute(1, 2, 0)  # [B, 1, L] view of [L, B, 1]
            xt = torch.where(keep_t, xt, xt.new_zeros(()))
        # in_proj's two halves as two products: their input gradients then add up in place,
        # where one [L, B, 2E] product would concatenate and copy its two output gradients
        W = self.in_proj.weight
        bx, bz = (None, None) if self.in_proj.bias is None else self.in_proj.bias.split(E)
        with label("mamba.in_proj"):
            xs = F.linear(xt, W[:E], bx).permute(1, 2, 0)  # [B, E, L] view of [L, B, E]
            z = F.linear(xt, W[E:], bz).permute(1, 2, 0)
        if x_add is not None:
            xs = xs + _branch_hook(x_add, "x_add", b, L, E)
        if z_add is not None:
            z = z + _branch_hook(z_add, "z_add", b, L, E)
        if keep is not None and (bx is not None or x_add is not None):  # undo what re-fills inert input
            xs = torch.where(keep, xs, xs.new_zeros(()))
        with label("mamba.conv1d"):
            xs = causal_conv1d(xs, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        with label("mamba.x_proj"):
            x_dbl = self.x_proj(xs.permute(2, 0, 1))  # [L, B, R + 2N]
        dt, Bm, Cm = torch.split(x_dbl, [R, N, N], dim=-1)
        # dt @ W^T rather than F.linear: autograd then forms the weight gradient as a
        # (R x BL) @ (BL x E) product, ~8x faster on CPU than F.linear's (E x BL) @ (BL x R)
        with label("mamba.dt_proj"):
            dt = (dt.contiguous() @ self.dt_proj.weight.t()).permute(1, 2, 0)  # [B, E, L]; bias in the scan
        Bm = _add_hook(Bm.permute(1, 2, 0), B_add, "B_add", b, N, L)  # [B, N, L]
        Cm = _add_hook(Cm.permute(1, 2, 0), C_add, "C_add", b, N, L)

        A_log = _at_least_fp32(self.A_log)  # the SSM parameters never run in half precision
        A_scale = None
        if A_log_add is not None and A_log_add.shape == (b, E):
            # a per-channel scale exp(add) of A: kept apart so the CUDA kernel can take it
            A_scale = torch.exp(A_log_add.to(A_log.dtype))  # [B, E]
        elif A_log_add is not None:
            A_log = A_log + _per_sample(A_log_add, "A_log_add", b, E, N)  # [B, E, N]
        A = -torch.exp(A_log)
        D = _at_least_fp32(self.D)
        if D_add is not None:
            if D_add.shape != (b, E):
                raise ValueError(f"Mamba: D_add must be [B, E] = {(b, E)}, got {tuple(D_add.shape)}")
            D = D + D_add  # [B, E]

        with label("mamba.scan"):  # inert positions: delta exactly 0 (after bias and softplus)
            out = selective_scan(xs, dt, A, Bm, Cm, D, z=z, delta_bias=_at_least_fp32(self.dt_proj.bias),
                                 delta_softplus=True, return_last_state=return_last_state,
                                 initial_state=initial_state, A_scale=A_scale, delta_mask=mask)
        y, last = out if return_last_state else (out, None)
        with label("mamba.out_proj"):
            y = self.out_proj(y.permute(2, 0, 1)).transpose(0, 1)  # [B, L, D] view of [L, B, D]
        return (y, last) if return_last_state else y


class MambaState:
    """A Mamba mixer's decoding state: ``conv [d_conv - 1, B, E]`` the last inputs of the causal
    conv (pre-conv x branch), oldest first (time-major: a step reads and shifts whole
    ``[B, E]`` rows), ``ssm [B, E, N]`` the SSM state (fp32)."""

    def __init__(self, conv: Tensor, ssm: Tensor):
        self.conv, self.ssm = conv, ssm


def prefill(m: Mamba, x: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, MambaState]:
    """``m(x, mask)`` and the state after the last position, to continue with :func:`step`.
    The conv state is recomputed from the last ``d_conv - 1`` inputs (inert ones zero)."""
    b, L, _ = x.shape
    y, last = m(x, mask, return_last_state=True)
    k, E = m.d_conv, m.d_inner
    tail = x[:, max(0, L - (k - 1)):]  # [B, <=k-1, D]
    W = m.in_proj.weight
    xs = F.linear(tail, W[:E], None if m.in_proj.bias is None else m.in_proj.bias[:E])  # [B, n, E]
    if mask is not None:
        xs = torch.where(mask[:, max(0, L - (k - 1)):].unsqueeze(-1), xs, xs.new_zeros(()))
    conv = xs.new_zeros(k - 1, b, E)
    if xs.shape[1]:
        conv[-xs.shape[1]:] = xs.transpose(0, 1)
    return y, MambaState(conv, last.to(torch.promote_types(last.dtype, torch.float32)).contiguous())


def step(m: Mamba, x: Tensor, state: MambaState, impl: Optional[str] = None) -> Tensor:
    """The next position(s) after those ``state`` summarises (``state`` updated in place):
    ``x [B, D] -> [B, D]`` one position, O(1) in the sequence length (the recurrence mamba-ssm's
    ``Mamba.step`` runs, through :func:`ablate.ops.selective_state_update`: mamba-ssm's kernel on
    a GPU, one fused pass on CPU; ``impl`` forces a path); ``x [B, n, D] -> [B, n, D]`` n
    positions in order as one scan continuing from the state (a var scale)."""
    if x.dim() == 3:
        return step(m, x[:, 0], state, impl).unsqueeze(1) if x.shape[1] == 1 else _extend(m, x, state)
    E, N, R = m.d_inner, m.d_state, m.dt_rank
    W = m.in_proj.weight
    bx, bz = (None, None) if m.in_proj.bias is None else m.in_proj.bias.split(E)
    xs, z = F.linear(x, W[:E], bx), F.linear(x, W[E:], bz)  # [B, E]
    w = m.conv1d.weight[:, 0]  # [E, k]; tap k - 1 reads the current position
    k = w.shape[1]
    u = xs * w[:, k - 1] if m.conv1d.bias is None else torch.addcmul(m.conv1d.bias, xs, w[:, k - 1])
    for j in range(k - 1):  # row-wise multiply-adds: a sum over a size-k last dim is slow on CPU
        u = u.addcmul_(state.conv[j], w[:, j])
    state.conv = torch.cat([state.conv[1:], xs.unsqueeze(0)])
    u = F.silu(u)
    dt, Bm, Cm = torch.split(m.x_proj(u), [R, N, N], dim=-1)
    y = selective_state_update(state.ssm, u, dt @ m.dt_proj.weight.t(), -torch.exp(_at_least_fp32(m.A_log)), Bm, Cm,
                               _at_least_fp32(m.D), z=z, dt_bias=_at_least_fp32(m.dt_proj.bias), dt_softplus=True,
                               impl=impl)
    return m.out_proj(y.to(x.dtype))


def _extend(m: Mamba, x: Tensor, state: MambaState) -> Tensor:
    """``x [B, n, D]``: the n positions after ``state`` in one causal conv and one scan (from the
    state's conv window and SSM state), ``state`` then moved past them."""
    n = x.shape[1]
    E, N, R = m.d_inner, m.d_state, m.dt_rank
    W = m.in_proj.weight
    bx, bz = (None, None) if m.in_proj.bias is None else m.in_proj.bias.split(E)
    xs = F.linear(x, W[:E], bx).transpose(1, 2)  # [B, E, n]
    z = F.linear(x, W[E:], bz).transpose(1, 2)
    window = torch.cat([state.conv.to(xs.dtype).permute(1, 2, 0), xs], dim=-1)  # [B, E, k - 1 + n]
    state.conv = window[:, :, n:].permute(2, 0, 1).contiguous()
    u = causal_conv1d(window, m.conv1d.weight.squeeze(1), m.conv1d.bias, activation="silu")[:, :, -n:]
    dt, Bm, Cm = torch.split(m.x_proj(u.transpose(1, 2)), [R, N, N], dim=-1)  # [B, n, .]
    y, last = selective_scan(u, (dt @ m.dt_proj.weight.t()).transpose(1, 2), -torch.exp(_at_least_fp32(m.A_log)),
                             Bm.transpose(1, 2), Cm.transpose(1, 2), _at_least_fp32(m.D), z=z,
                             delta_bias=_at_least_fp32(m.dt_proj.bias), delta_softplus=True,
                             return_last_state=True, initial_state=state.ssm)
    state.ssm = last.to(state.ssm.dtype).contiguous()
    return m.out_proj(y.transpose(1, 2))


def _at_least_fp32(p: Tensor) -> Tensor:
    return p.to(torch.promote_types(p.dtype, torch.float32))


def _add_hook(X: Tensor, add: Optional[Tensor], name: str, b: int, n: int, L: int) -> Tensor:
    """``X [B, N, L] + add`` with ``add`` of shape [B, N] (broadcast over L) or [B, N, L]."""
    if add is None:
        return X
    if add.shape == (b, n):
        return X + add.unsqueeze(-1)
    if add.shape == (b, n, L):
        return X + add
    raise ValueError(f"Mamba: {name} must be [B, N] = {(b, n)} or [B, N, L] = {(b, n, L)}, "
                     f"got {tuple(add.shape)}")


def _branch_hook(add: Tensor, name: str, b: int, L: int, e: int) -> Tensor:
    """``[B, L, E]`` -> a ``[B, E, L]`` view, to add to a branch."""
    if add.shape != (b, L, e):
        raise ValueError(f"Mamba: {name} must be [B, L, E] = {(b, L, e)}, got {tuple(add.shape)}")
    return add.permute(0, 2, 1)


def _per_sample(add: Tensor, name: str, b: int, e: int, n: int) -> Tensor:
    """``[B, E]`` (broadcast over N) or ``[B, E, N]`` -> ``[B, E, N]``-broadcastable."""
    if add.shape == (b, e):
        return add.unsqueeze(-1)
    if add.shape == (b, e, n):
        return add
    raise ValueError(f"Mamba: {name} must be [B, E] = {(b, e)} or [B, E, N] = {(b, e, n)}, "
                     f"got {tuple(add.shape)}")
