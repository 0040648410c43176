"""Fused CPU causal depthwise conv + SiLU (numba), forward and backward, float32 and float64.

Same function as :func:`ablate.ops.conv.causal_conv1d_ref` (semantics in
:mod:`ablate.ops.causal_conv1d`). Imported lazily by the dispatcher; importing it imports numba.

Layout: time-major ``[L, b, d]`` (the Mamba block's storage: its ``[b, d, L]`` views cost no copy
here), channels innermost so every loop over channels vectorises; one task per sample.

Forward: one pass, ``out[t] = act(bias + sum_j w[:, j] * x[t - (k - 1) + j])``; nothing saved but
the input. Backward, per sample, two passes over time: the first writes the pre-activation's
gradient ``g[t] = dy[t] * act'(pre[t])`` (``pre`` recomputed from the window) into ``dx`` and
adds up the weight and bias gradients; the second turns it, ascending in t and in place, into
``dx[s] = sum_j w[:, j] * g[s + (k - 1) - j]`` (slot s is rewritten only once slots s..s+k-1 are
read). Versus the torch path's k shifted multiply-adds and a separate SiLU, every tensor is read
and written once per pass.
"""
from __future__ import annotations

from typing import Optional

import torch
from numba import njit
from torch import Tensor

from .common import check_conv
from .numba_math import const, exp2
from .scan_numba import run_tasks

_FASTMATH = {"contract"}


@njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True, inline="always")
def _pre(x, w, bias, t, bi, o):
    """Row ``o [d]`` = the pre-activation at time t of sample bi: ``bias + sum_j w[j] x[t-(k-1)+j]``."""
    d = o.shape[0]
    k = w.shape[0]
    for c in range(d):
        o[c] = bias[c]
    for j in range(k):
        s = t - (k - 1) + j
        if s >= 0:
            xs = x[s, bi]
            wj = w[j]
            for c in range(d):
                o[c] += wj[c] * xs[c]


@njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def conv_fwd(lo_task, hi_task, tid, x, w, bias, out, silu):
    """Samples [lo_task, hi_task): ``out [L, b, d]`` from ``x [L, b, d]``, ``w [k, d]``
    (tap-major), ``bias [d]``; SiLU when ``silu``."""
    L, b, d = x.shape
    one = const(x, 1.0)
    nlog2e = const(x, -1.4426950408889634)
    for bi in range(lo_task, hi_task):
        for t in range(L):
            o = out[t, bi]
            _pre(x, w, bias, t, bi, o)
            if silu:
                for c in range(d):
                    p = o[c]
                    o[c] = p / (one + exp2(p * nlog2e))


@njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def conv_bwd(lo_task, hi_task, tid, x, w, bias, dy, dx, dw_s, db_s, silu, pre):
    """Backward for samples [lo_task, hi_task): writes ``dx [L, b, d]``; adds the weight and
    bias gradients into the thread's partial sums ``dw_s[tid] [k, d]``, ``db_s[tid] [d]``.
    Scratch: ``pre[tid] [d]``."""
    L, b, d = x.shape
    k = w.shape[0]
    one = const(x, 1.0)
    nlog2e = const(x, -1.4426950408889634)
    p = pre[tid]
    dw = dw_s[tid]
    db = db_s[tid]
    for bi in range(lo_task, hi_task):
        for t in range(L):  # pass 1: g[t] into dx[t]; weight and bias gradients
            _pre(x, w, bias, t, bi, p)
            g = dx[t, bi]
            gy = dy[t, bi]
            if silu:
                for c in range(d):
                    sg = one / (one + exp2(p[c] * nlog2e))
                    g[c] = gy[c] * sg * (one + p[c] * (one - sg))
            else:
                for c in range(d):
                    g[c] = gy[c]
            for c in range(d):
                db[c] += g[c]
            for s in range(max(0, t - (k - 1)), t + 1):  # the inputs in t's window
                xs = x[s, bi]
                dwj = dw[s - t + k - 1]
                for c in range(d):
                    dwj[c] += g[c] * xs[c]
        for s in range(L):  # pass 2, in place: dx[s] = sum_j w[j] g[s + k - 1 - j]
            o = dx[s, bi]
            wl = w[k - 1]
            for c in range(d):
                o[c] = wl[c] * o[c]
            for j in range(k - 1):
                t = s + (k - 1) - j
                if t < L:
                    gt = dx[t, bi]
                    wj = w[j]
                    for c in range(d):
                        o[c] += wj[c] * gt[c]


def _np(t: Tensor):  # noqa: ANN202
    return t.detach().numpy()


class _ConvFn(torch.autograd.Function):
    """``out [L, b, d]`` from time-major ``x [L, b, d]``, ``w [k, d]``, ``bias [d]``."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor, has_bias: bool, silu: bool) -> Tensor:
        L, b, d = x.shape
        out = x.new_empty(L, b, d)
        nt = max(1, min(torch.get_num_threads(), b))
        run_tasks(conv_fwd, b, nt, _np(x), _np(w), _np(bias), out.numpy(), int(silu))
        ctx.save_for_backward(x, w, bias)
        ctx.has_bias, ctx.silu = has_bias, silu
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        x, w, bias = ctx.saved_tensors
        L, b, d = x.shape
        k = w.shape[0]
        nt = max(1, min(torch.get_num_threads(), b))
        dx = torch.empty_like(x)
        dw = x.new_zeros(nt, k, d)
        db = x.new_zeros(nt, d)
        run_tasks(conv_bwd, b, nt, _np(x), _np(w), _np(bias), _np(dout.contiguous()), dx.numpy(), dw.numpy(),
                  db.numpy(), int(ctx.silu), x.new_empty(nt, d).numpy())
        return dx, dw.sum(0), db.sum(0) if ctx.has_bias else None, None, None


def causal_conv1d_numba(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        activation: Optional[str] = None) -> Tensor:
    """The fused kernel on CPU tensors (float32 and float64; half inputs computed in float32):
    ``x [b, d, L]``, ``weight [d, k]``, ``bias [d]`` -> ``[b, d, L]`` (a view of time-major
    storage). Same numbers as the reference up to rounding."""
    check_conv(x, weight, bias, activation)
    if x.device.type != "cpu":
        raise ValueError(f"causal_conv1d: impl 'numba' runs on CPU tensors only, got {x.device}")
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    xt = x.to(f).permute(2, 0, 1).contiguous()  # [L, b, d]; free for a view of time-major storage
    w = weight.to(f).t().contiguous()  # [k, d]
    bvec = bias.to(f) if bias is not None else x.new_zeros(x.shape[1], dtype=f)
    out = _ConvFn.apply(xt, w, bvec, bias is not None, activation in ("silu", "swish"))
    return out.permute(1, 2, 0).to(x.dtype)
