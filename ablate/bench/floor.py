"""The selective scan's compute floor on this CPU: the numba kernels' arithmetic with nothing else.

:func:`floor_fwd` and :func:`floor_bwd` do, per state element, exactly the arithmetic of
:func:`ablate.ops.scan_numba.scan_fwd` and :func:`~ablate.ops.scan_numba.scan_bwd` (the same
``exp2`` polynomial, multiplies and fused multiply-adds, the backward's recomputation and
adjoint recurrence and its two dot products), in the same vectorised loop shape (channels
innermost, 8 float32 lanes per instruction here), on one small tile that stays in the L1 cache:
no loads from memory, no index arithmetic, no per-step bookkeeping, no threads. Its time for as
many state elements as a scan of shape (b, d, n, L) is the floor that scan's kernel could reach;
``ablate bench ops`` prints every path's time over it.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ablate.ops.numba_math import const, dot, exp2

W = 64  # channels of the tile (a multiple of the vector width); n rows of them


@njit(fastmath={"contract"}, error_model="numpy", cache=True)
def floor_fwd(steps, h, a, dt, du, y, b, c):
    """``steps`` forward steps of the scan's inner loop over the tile ``h [n, W]``."""
    n, w = h.shape
    for _ in range(steps):
        for j in range(w):
            y[j] = const(h, 0.0)
        for i in range(n):
            bv = b[i]
            cv = c[i]
            hs = h[i]
            as_ = a[i]
            for j in range(w):
                hv = exp2(dt[j] * as_[j]) * hs[j] + du[j] * bv
                hs[j] = hv
                y[j] += cv * hv
    return y.sum()


@njit(fastmath={"contract"}, error_model="numpy", cache=True)
def floor_bwd(steps, h, hn, e, g, gt, a, dt, du, dy, y, ddu, ddt, dA, b, c, dB, dC):
    """``steps`` backward steps: the recomputation of one step's states and decays, then the
    adjoint step (its gradients and the two dot products per state row), on the tile."""
    n, w = h.shape
    for _ in range(steps):
        for j in range(w):
            ddu[j] = const(h, 0.0)
            ddt[j] = const(h, 0.0)
        for i in range(n):  # row i: recompute its states and decays, then its adjoint step
            bv = b[i]
            cv = c[i]
            hp = h[i]
            hs = hn[i]
            es = e[i]
            gs = g[i]
            as_ = a[i]
            dAs = dA[i]
            for j in range(w):
                ev = exp2(dt[j] * as_[j])
                es[j] = ev
                hv = ev * hp[j] + du[j] * bv
                hs[j] = hv
                y[j] += cv * hv  # the gate's gradient needs y again
            for j in range(w):
                gv = gs[j] + cv * dy[j]
                gt[j] = gv
                ddu[j] += gv * bv
                ev = es[j]
                wv = gv * ev * hp[j]
                ddt[j] += wv * as_[j]
                dAs[j] += wv * dt[j]
                gs[j] = gv * ev
            dB[i] += dot(gt, du, w)
            dC[i] += dot(hs, dy, w)
    return ddu.sum() + ddt.sum() + dB.sum() + dC.sum()


def tile(n: int) -> tuple[np.ndarray, ...]:
    """The float32 operands of both floor kernels for state size ``n`` (L1-resident; values keep
    every exp2 in range and the states bounded)."""
    rng = np.random.default_rng(0)
    f = np.float32
    h, hn, e, g, dA = (np.zeros((n, W), f) for _ in range(5))
    gt = np.zeros(W, f)
    a = (-rng.random((n, W)) - 0.1).astype(f) * f(1.4426950408889634)
    dt, du, dy, y, ddu, ddt = (rng.random(W).astype(f) * f(0.1) for _ in range(6))
    b, c, dB, dC = (rng.standard_normal(n).astype(f) for _ in range(4))
    return h, hn, e, g, gt, dA, a, dt, du, dy, y, ddu, ddt, b, c, dB, dC


def run(steps: int, t: tuple[np.ndarray, ...], backward: bool = True) -> float:
    """``steps`` forward steps (and as many backward steps) of the floor on tile ``t``."""
    h, hn, e, g, gt, dA, a, dt, du, dy, y, ddu, ddt, b, c, dB, dC = t
    out = floor_fwd(steps, h, a, dt, du, y, b, c)
    if backward:
        out += floor_bwd(steps, h, hn, e, g, gt, a, dt, du, dy, y, ddu, ddt, dA, b, c, dB, dC)
    return out
