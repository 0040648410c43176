"""Fused CPU selective-scan kernels (numba), forward and backward, for float32 and float64.

Imported lazily by :mod:`ablate.ops.selective_scan`; importing this module imports numba and
raises ImportError without it. Kernels compile on first use per dtype (~3 s forward, ~3 s
backward on a 2-core EPYC) into numba's on-disk cache (``cache=True``); a later process loads
them in ~0.4 s.

Layout (one task = one sample ``bi`` and a block of channels ``[d0, d1)``; the state of a task is
``[n, w]`` with channels innermost, so every per-step update is a vector loop over channels)::

    u, dt, z, out      [L, b, d]        (time-major, as the Mamba block stores them)
    A2                 [bA, n, d]       A * log2(e), bA in {1, b}
    B, C               [LB, bB, G, n]   time-varying: LB = L, bB = b; time-invariant: [1, 1, d, n]
                                        (G = d, one channel per group)
    Dv                 [bD, d]          bD in {1, b}; zeros when there is no D
    h0, last           [b, n, d]
    ck                 [n_chunks - 1, b, n, d]   state after each chunk but the last

Channel ``c`` reads group ``c // (d / G)`` of B (and of C, whose G may differ); a task walks
*segments* of channels over which both groups are constant.

Forward keeps the state at chunk boundaries only (every K steps). Backward recomputes one chunk
of states (and of decays ``exp(dt A)``) into per-thread buffers from its boundary, then runs the
adjoint recurrence ``g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}`` backwards through it; nothing of
size [b, d, L, n] is ever built. The prologue ``delta = softplus(dt + delta_bias)``, 0 at masked
steps, is fused (one row per step, recomputed in backward, which returns the gradient of the raw
dt through sigmoid and sums delta_bias's per sample), and so is the epilogue
``(y + D u) * silu(z)`` (y recomputed in backward).

Threads: the kernels are ``nogil`` functions over a range of tasks; :func:`run_tasks` runs them
on ``torch.get_num_threads()`` Python threads (a 1-core job uses one core). Not numba's
``parallel=True``: the parfor pipeline tripled compile time (19 s against 6 s per dtype) and
brings its own OpenMP/workqueue pool beside torch's.

exp is :func:`ablate.ops.numba_math.exp2` (``exp(x) = 2^(x log2 e)``), a vectorisable
polynomial with a relative error of at most 1 machine epsilon (measured, float32 and float64);
softplus and its derivative are :mod:`~ablate.ops.numba_math`'s (within 2 and 3 ulp).
Arithmetic is IEEE except that a * b + c may become one fused multiply-add (``contract``), and
the dot products that reduce over channels are reassociated so that they vectorise (their
summation order differs from a sequential sum). ``error_model="numpy"``: a division by zero
gives inf/NaN as in torch instead of a Python exception, whose check would stop vectorisation.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Optional

import numpy as np
import torch
from numba import njit
from torch import Tensor

from .numba_math import const, dot, exp2, softplus, softplus_grad
from .common import ScanResult, check_delta_mask, check_scan, compute_dtype

# Fused multiply-add only: a * b + c may round once instead of twice. No other fast-math
# licence (no reassociation, no finite-math or no-NaN assumptions). Measured against strict
# IEEE: forward 19% and backward 7% faster.
_FASTMATH = {"contract"}

# ------------------------------------------------------------------------------------ helpers


@njit(nogil=True, cache=True, inline="always")
def _from(row, lo):
    """``row[lo:]``, without the slice's bounds arithmetic in the common case ``lo == 0`` (a
    row view per state row and step is the kernels' inner-loop overhead)."""
    return row if lo == 0 else row[lo:]


@njit(nogil=True, cache=True)
def _segments(d0, d1, hB, hC, segs):
    """Split channels [d0, d1) into runs over which both B's group (channel // hB) and C's
    (channel // hC) are constant; ``segs[k] = (start - d0, length, B group, C group)``.
    Returns the number of runs."""
    k = 0
    s = d0
    while s < d1:
        e = min((s // hB + 1) * hB, (s // hC + 1) * hC, d1)
        segs[k, 0] = s - d0
        segs[k, 1] = e - s
        segs[k, 2] = s // hB
        segs[k, 3] = s // hC
        k += 1
        s = e
    return k


@njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True, inline="always")
def _delta_row(raw, bias, masked, softplus_, out, w):
    """The step's delta row into ``out`` (returned): ``softplus(raw + bias)``, or ``raw + bias``
    without ``softplus_``; 0 where ``masked`` (an inert step: the state passes through)."""
    if masked:
        for j in range(w):
            out[j] = const(out, 0.0)
    elif softplus_:
        for j in range(w):
            out[j] = softplus(raw[j] + bias[j])
    else:
        for j in range(w):
            out[j] = raw[j] + bias[j]
    return out


# ------------------------------------------------------------------------------------ kernels
#
# One task = one sample bi and channels [d0, d1); tasks [lo_task, hi_task) run in the calling
# thread, whose scratch is slot ``tid`` of the *_s arrays.
#
# Every inner loop runs ``for j in range(m)`` over 1-D views that start at the segment, so that
# the index is provably non-negative (numba's negative-index wraparound then compiles away) and
# every view is typed C-contiguous: a view taken as X[i, :, d0:d1][k] would be typed 'A' and its
# loops compile to gathers, 7x slower.


@njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def scan_fwd(lo_task, hi_task, tid, u, dt, bias, keep, A2, B, C, Dv, z, h0, out, last, ck,
             fuse_dt, softplus_, has_keep, has_z, has_h0, save_ck, K, dblk, h_s, row_s):
    """Forward: writes ``out`` [L, b, d], ``last`` [b, n, d] and, if ``save_ck``, ``ck``.
    With ``fuse_dt`` the step's delta is ``softplus(dt + bias)`` (``softplus_``, else
    ``dt + bias``) and 0 where ``has_keep`` and ``keep`` [L, b] is False; without, ``dt`` as is.
    Scratch: ``h_s`` [threads, n, dblk], ``row_s`` [threads, 3, dblk]."""
    L, b, d = u.shape
    n = A2.shape[1]
    nblk = (d + dblk - 1) // dblk
    segs = np.empty((dblk, 4), np.int64)
    zero = const(u, 0.0)
    one = const(u, 1.0)
    nlog2e = const(u, -1.4426950408889634)
    h = h_s[tid]
    dtr = row_s[tid, 0]
    dur = row_s[tid, 1]
    yr = row_s[tid, 2]
    for task in range(lo_task, hi_task):
        bi = task // nblk
        d0 = (task % nblk) * dblk
        d1 = min(d, d0 + dblk)
        w = d1 - d0
        nseg = _segments(d0, d1, d // B.shape[2], d // C.shape[2], segs)
        ai = bi if A2.shape[0] > 1 else 0
        dv = Dv[bi if Dv.shape[0] > 1 else 0, d0:d1]
        bk = bias[d0:d1]
        bb = bi if B.shape[1] > 1 else 0
        bc = bi if C.shape[1] > 1 else 0
        for i in range(n):
            hi_ = h[i]
            if has_h0:
                h0i = h0[bi, i, d0:d1]
                for j in range(w):
                    hi_[j] = h0i[j]
            else:
                for j in range(w):
                    hi_[j] = zero
        for t in range(L):
            ut = u[t, bi, d0:d1]
            dtt = dt[t, bi, d0:d1]
            if fuse_dt:
                dtt = _delta_row(dtt, bk, has_keep and not keep[t, bi], softplus_, dtr, w)
            # one array written per row loop: a loop that writes several arrays needs more
            # runtime aliasing checks than LLVM makes before it vectorises
            for j in range(w):
                dur[j] = dtt[j] * ut[j]
            for j in range(w):
                yr[j] = zero
            tb = t if B.shape[0] > 1 else 0
            tc = t if C.shape[0] > 1 else 0
            for sg in range(nseg):
                lo = segs[sg, 0]
                m = segs[sg, 1]
                Bt = B[tb, bb, segs[sg, 2]]
                Ct = C[tc, bc, segs[sg, 3]]
                dts = _from(dtt, lo)
                dus = _from(dur, lo)
                ys = _from(yr, lo)
                for i in range(n):
                    bv = Bt[i]
                    cv = Ct[i]
                    hs = _from(h[i], lo)
                    as_ = _from(A2[ai, i], d0 + lo)
                    for j in range(m):
                        hv = exp2(dts[j] * as_[j]) * hs[j] + dus[j] * bv
                        hs[j] = hv
                        ys[j] += cv * hv
            ot = out[t, bi, d0:d1]
            if has_z:
                zt = z[t, bi, d0:d1]
                for j in range(w):
                    zz = zt[j]
                    ot[j] = (yr[j] + dv[j] * ut[j]) * zz / (one + exp2(zz * nlog2e))
            else:
                for j in range(w):
                    ot[j] = yr[j] + dv[j] * ut[j]
            if save_ck and (t + 1) % K == 0 and t + 1 < L:
                c = (t + 1) // K - 1
                for i in range(n):
                    cki = ck[c, bi, i, d0:d1]
                    hi_ = h[i]
                    for j in range(w):
                        cki[j] = hi_[j]
        for i in range(n):
            li = last[bi, i, d0:d1]
            hi_ = h[i]
            for j in range(w):
                li[j] = hi_[j]


@njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def scan_bwd(lo_task, hi_task, tid, u, dt, bias, keep, A, A2, B, C, Dv, z, h0, ck, dout, dlast,
             fuse_dt, softplus_, has_keep, has_bias, has_z, has_h0, has_dlast, K, dblk,
             du_o, ddt_o, dbias_o, dA_o, dB_o, dC_o, dD_o, dz_o, dh0_o,
             hb_s, eb_s, g_s, yb_s, db_s, row_s):
    """Backward of :func:`scan_fwd` given ``dout`` [L, b, d] (and ``dlast`` [b, n, d]).

    Writes ``du_o``, ``ddt_o`` (the gradient of ``dt``, before bias and softplus), ``dz_o``
    [L, b, d], ``dh0_o`` [b, n, d] and accumulates into zero-initialised ``dA_o`` [b, n, d],
    ``dD_o`` and (``has_bias``) ``dbias_o`` [b, d] (per sample; the caller sums over b for shared
    A / D and for the bias) and ``dB_o`` / ``dC_o`` [P, LB, bB, G, n]: P = channel blocks for
    time-varying B/C, P = tasks for time-invariant ones (the caller sums over P).
    Scratch: ``hb_s`` [threads, K + 1, n, dblk] (states), ``eb_s`` [threads, K, n, dblk]
    (decays), ``g_s`` [threads, n, dblk] (adjoint state), ``yb_s`` [threads, K, dblk] (y),
    ``db_s`` [threads, K, dblk] (the steps' deltas, with ``fuse_dt``), ``row_s`` [threads, 6, dblk].
    """
    L, b, d = u.shape
    n = A.shape[1]
    nblk = (d + dblk - 1) // dblk
    n_chunks = (L + K - 1) // K
    segs = np.empty((dblk, 4), np.int64)
    zero = const(u, 0.0)
    one = const(u, 1.0)
    nlog2e = const(u, -1.4426950408889634)
    hb = hb_s[tid]
    eb = eb_s[tid]
    g = g_s[tid]
    yb = yb_s[tid]
    db = db_s[tid]
    dur = row_s[tid, 1]
    dyr = row_s[tid, 2]
    ddur = row_s[tid, 3]
    ddtr = row_s[tid, 4]
    gtmp = row_s[tid, 5]
    for task in range(lo_task, hi_task):
        bi = task // nblk
        blk = task % nblk
        d0 = blk * dblk
        d1 = min(d, d0 + dblk)
        w = d1 - d0
        nseg = _segments(d0, d1, d // B.shape[2], d // C.shape[2], segs)
        ai = bi if A.shape[0] > 1 else 0
        dv = Dv[bi if Dv.shape[0] > 1 else 0, d0:d1]
        dD_acc = dD_o[bi, d0:d1]
        dbias_acc = dbias_o[bi, d0:d1]
        bk = bias[d0:d1]
        bb = bi if B.shape[1] > 1 else 0
        bc = bi if C.shape[1] > 1 else 0
        # partial-sum slot: per task for time-invariant B / C, else per channel block
        pB = bi * nblk + blk if dB_o.shape[1] == 1 and dB_o.shape[2] == 1 else blk
        pC = bi * nblk + blk if dC_o.shape[1] == 1 and dC_o.shape[2] == 1 else blk
        for i in range(n):
            gi = g[i]
            if has_dlast:
                dli = dlast[bi, i, d0:d1]
                for j in range(w):
                    gi[j] = dli[j]
            else:
                for j in range(w):
                    gi[j] = zero
        for c in range(n_chunks - 1, -1, -1):
            s0 = c * K
            k = min(K, L - s0)
            for i in range(n):  # the state before the chunk
                h_ = hb[0, i]
                if c > 0:
                    src = ck[c - 1, bi, i, d0:d1]
                    for j in range(w):
                        h_[j] = src[j]
                elif has_h0:
                    src = h0[bi, i, d0:d1]
                    for j in range(w):
                        h_[j] = src[j]
                else:
                    for j in range(w):
                        h_[j] = zero
            for tt in range(k):  # recompute the chunk: states, decays and y
                t = s0 + tt
                ut = u[t, bi, d0:d1]
                dtt = dt[t, bi, d0:d1]
                if fuse_dt:  # kept for the adjoint pass
                    dtt = _delta_row(dtt, bk, has_keep and not keep[t, bi], softplus_, db[tt], w)
                yt = yb[tt]
                for j in range(w):  # one array written per row loop (see scan_fwd)
                    dur[j] = dtt[j] * ut[j]
                for j in range(w):
                    yt[j] = zero
                tb = t if B.shape[0] > 1 else 0
                tc = t if C.shape[0] > 1 else 0
                for sg in range(nseg):
                    lo = segs[sg, 0]
                    m = segs[sg, 1]
                    Bt = B[tb, bb, segs[sg, 2]]
                    Ct = C[tc, bc, segs[sg, 3]]
                    dts = _from(dtt, lo)
                    dus = _from(dur, lo)
                    ys = _from(yt, lo)
                    for i in range(n):
                        bv = Bt[i]
                        cv = Ct[i]
                        hp = _from(hb[tt, i], lo)
                        hn = _from(hb[tt + 1, i], lo)
                        es = _from(eb[tt, i], lo)
                        as_ = _from(A2[ai, i], d0 + lo)
                        for j in range(m):
                            ev = exp2(dts[j] * as_[j])
                            es[j] = ev
                            hv = ev * hp[j] + dus[j] * bv
                            hn[j] = hv
                            ys[j] += cv * hv
            for tt in range(k - 1, -1, -1):  # the adjoint recurrence, backwards
                t = s0 + tt
                ut = u[t, bi, d0:d1]
                dtt = db[tt] if fuse_dt else dt[t, bi, d0:d1]
                got = dout[t, bi, d0:d1]
                yt = yb[tt]
                if has_z:  # through out = (y + D u) silu(z): dy, dz
                    zt = z[t, bi, d0:d1]
                    dzt = dz_o[t, bi, d0:d1]
                    for j in range(w):  # sigmoid(z), in the adjoint's row (free until the rows)
                        gtmp[j] = one / (one + exp2(zt[j] * nlog2e))
                    for j in range(w):
                        sg = gtmp[j]
                        dzt[j] = got[j] * (yt[j] + dv[j] * ut[j]) * sg * (one + zt[j] * (one - sg))
                    for j in range(w):
                        dyr[j] = got[j] * zt[j] * gtmp[j]
                else:
                    for j in range(w):
                        dyr[j] = got[j]
                for j in range(w):
                    dur[j] = dtt[j] * ut[j]
                for j in range(w):
                    dD_acc[j] += dyr[j] * ut[j]
                for j in range(w):
                    ddur[j] = zero
                for j in range(w):
                    ddtr[j] = zero
                tb = t if B.shape[0] > 1 else 0
                tc = t if C.shape[0] > 1 else 0
                for sg in range(nseg):
                    lo = segs[sg, 0]
                    m = segs[sg, 1]
                    gb = segs[sg, 2]
                    gc = segs[sg, 3]
                    Bt = B[tb, bb, gb]
                    Ct = C[tc, bc, gc]
                    dBt = dB_o[pB, tb, bb, gb]
                    dCt = dC_o[pC, tc, bc, gc]
                    gt = _from(gtmp, lo)
                    dts = _from(dtt, lo)
                    dus = _from(dur, lo)
                    dys = _from(dyr, lo)
                    ddus = _from(ddur, lo)
                    ddts = _from(ddtr, lo)
                    for i in range(n):
                        bv = Bt[i]
                        cv = Ct[i]
                        gs = _from(g[i], lo)
                        es = _from(eb[tt, i], lo)
                        hp = _from(hb[tt, i], lo)
                        as_ = _from(A[ai, i], d0 + lo)
                        dAs = _from(dA_o[bi, i], d0 + lo)
                        for j in range(m):
                            gv = gs[j] + cv * dys[j]  # dL/dh_t
                            gt[j] = gv
                            ddus[j] += gv * bv
                            ev = es[j]
                            wv = gv * ev * hp[j]  # dL/d(dt A)
                            ddts[j] += wv * as_[j]
                            dAs[j] += wv * dts[j]
                            gs[j] = gv * ev  # dL/dh_{t-1} through h_t
                        dBt[i] += dot(gt, dus, m)
                        dCt[i] += dot(_from(hb[tt + 1, i], lo), dys, m)
                dut = du_o[t, bi, d0:d1]
                ddtt = ddt_o[t, bi, d0:d1]
                for j in range(w):
                    dut[j] = ddur[j] * dtt[j] + dyr[j] * dv[j]
                for j in range(w):
                    ddtt[j] = ddtr[j] + ddur[j] * ut[j]
                if has_keep and not keep[t, bi]:  # delta was 0 whatever dt and the bias
                    for j in range(w):
                        ddtt[j] = zero
                elif softplus_:
                    raw = dt[t, bi, d0:d1]
                    for j in range(w):
                        ddtt[j] *= softplus_grad(raw[j] + bk[j])
                if has_bias:
                    for j in range(w):
                        dbias_acc[j] += ddtt[j]
        for i in range(n):
            dst = dh0_o[bi, i, d0:d1]
            gi = g[i]
            for j in range(w):
                dst[j] = gi[j]


@njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def state_step(lo_task, hi_task, tid, h, u, dt, bias, A2, B, C, Dv, z, out, fuse_dt, softplus_, has_z,
               row_s):
    """One decoding step for samples [lo_task, hi_task): ``h [b, d, n]`` updated in place,
    ``out [b, d]`` written. The delta is ``softplus(dt + bias)`` (``softplus_``, else
    ``dt + bias``) with ``fuse_dt``, else ``dt [b, d]`` as is; ``A2 [d, n]`` = A log2(e);
    ``B``, ``C`` ``[b, n]``; ``Dv``, ``bias`` ``[d]`` (zeros: none); ``u``, ``z`` ``[b, d]``.
    Per channel one pass over its n contiguous state entries (the loop that vectorises), then y
    as a reassociated dot product; first the sample's delta row (a loop over channels, vectorised
    too). Scratch: ``row_s`` [threads, d]."""
    b, d, n = h.shape
    one = const(h, 1.0)
    nlog2e = const(h, -1.4426950408889634)
    for bi in range(lo_task, hi_task):
        Bb = B[bi]
        Cb = C[bi]
        delta = dt[bi]
        if fuse_dt:
            delta = _delta_row(delta, bias, False, softplus_, row_s[tid], d)
        for c in range(d):
            dl = delta[c]
            x = u[bi, c]
            du = dl * x
            hs = h[bi, c]
            a = A2[c]
            for i in range(n):  # no sum in this loop: a sequential one would keep it scalar
                hs[i] = exp2(dl * a[i]) * hs[i] + du * Bb[i]
            y = dot(Cb, hs, n) + Dv[c] * x
            if has_z:
                zz = z[bi, c]
                y = y * zz / (one + exp2(zz * nlog2e))
            out[bi, c] = y


# ------------------------------------------------------------------------------------ torch side

# Bytes of one per-thread chunk buffer ([K, n, w]): the backward keeps two (states and decays),
# and both should stay in a 1 MiB L2 cache. Sets K = 16 at n = 16, d = 256 in float32.
CHUNK_BYTES = 1 << 18
_LOG2E = 1.4426950408889634


_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1),
                                       thread_name_prefix="ablate-scan")
        return _pool


def run_tasks(kernel, n_tasks: int, threads: int, *args) -> None:
    """``kernel(lo, hi, tid, *args)`` over tasks ``[0, n_tasks)`` on ``threads`` threads, the
    caller's included. The kernels release the GIL; tasks are handed out in pieces (4 per
    thread) from a shared queue, so a thread slowed by a neighbour's job takes fewer."""
    threads = max(1, min(threads, n_tasks))
    if threads == 1:
        kernel(0, n_tasks, 0, *args)
        return
    n_pieces = min(n_tasks, 4 * threads)
    bounds = [n_tasks * i // n_pieces for i in range(n_pieces + 1)]
    queue = deque(zip(bounds[:-1], bounds[1:]))

    def work(tid: int) -> None:
        while True:
            try:
                lo, hi = queue.popleft()  # atomic
            except IndexError:
                return
            kernel(lo, hi, tid, *args)

    futures = [_executor().submit(work, tid) for tid in range(1, threads)]
    try:
        work(0)
    finally:  # never return (or raise) while a worker still writes into the caller's buffers
        wait(futures)
    for f in futures:
        f.result()  # re-raises a worker's error


def _np(x: Tensor) -> np.ndarray:
    return x.detach().numpy()


class _NumbaScanFn(torch.autograd.Function):
    """``(out [L, b, d], last [b, n, d])`` from kernel-layout inputs (see the module docstring).
    The step's delta is ``softplus(dt + bias)`` (``softplus`` True, else ``dt + bias``), 0 where
    ``keep`` [L, b] is False; ``bias`` and ``keep`` may be None, and with neither and no softplus
    ``dt`` is the delta itself. ``Dv`` is None when there is no D (zeros go to the kernel);
    ``z`` and ``h0`` may be None. Saves the inputs and the chunk-boundary states ``ck`` only
    when ``save``."""

    @staticmethod
    def forward(ctx, u: Tensor, dt: Tensor, bias: Optional[Tensor], keep: Optional[Tensor], softplus: bool,
                A: Tensor, B: Tensor, C: Tensor, Dv: Optional[Tensor], z: Optional[Tensor],
                h0: Optional[Tensor], K: int, dblk: int, save: bool):
        L, b, d = u.shape
        n = A.shape[1]
        n_tasks = b * -(-d // dblk)
        nt = max(1, min(torch.get_num_threads(), n_tasks))
        A2 = A * _LOG2E  # exp(x A) = 2^(x A log2 e): the kernel's exp is a 2^x
        Dk = Dv if Dv is not None else u.new_zeros(1, d)
        bk = bias if bias is not None else u.new_zeros(d)
        kp = keep if keep is not None else torch.ones(1, 1, dtype=torch.bool)
        dummy = u.new_zeros(1, 1, 1)
        out, last = u.new_empty(L, b, d), u.new_empty(b, n, d)
        ck = u.new_empty(-(-L // K) - 1 if save else 0, b, n, d)
        fuse = softplus or bias is not None or keep is not None
        run_tasks(scan_fwd, n_tasks, nt, _np(u), _np(dt), _np(bk), _np(kp), _np(A2), _np(B), _np(C),
                  _np(Dk), _np(_or(z, dummy)), _np(_or(h0, dummy)), out.numpy(), last.numpy(), ck.numpy(),
                  int(fuse), int(softplus), int(keep is not None), int(z is not None), int(h0 is not None),
                  int(save), K, dblk, u.new_empty(nt, n, dblk).numpy(), u.new_empty(nt, 3, dblk).numpy())
        if save:
            ctx.save_for_backward(u, dt, bk, kp, A, A2, B, C, Dk, z, h0, ck)
            ctx.K, ctx.dblk, ctx.has_D = K, dblk, Dv is not None
            ctx.flags = (int(fuse), int(softplus), int(keep is not None), int(bias is not None))
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout: Optional[Tensor], dlast: Optional[Tensor]):
        u, dt, bk, kp, A, A2, B, C, Dk, z, h0, ck = ctx.saved_tensors
        K, dblk = ctx.K, ctx.dblk
        has_bias = ctx.flags[3]
        L, b, d = u.shape
        n = A.shape[1]
        nblk = -(-d // dblk)
        nt = max(1, min(torch.get_num_threads(), b * nblk))
        dummy = u.new_zeros(1, 1, 1)
        dout = dout.contiguous() if dout is not None else torch.zeros_like(u)
        du, ddt = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if z is not None else dummy
        dA, dD, dh0 = u.new_zeros(b, n, d), u.new_zeros(b, d), u.new_empty(b, n, d)
        dbias = u.new_zeros(b if has_bias else 1, d)

        def part(X: Tensor) -> Tensor:  # partial sums: per task (time-invariant), per block
            invariant = X.shape[0] == 1 and X.shape[1] == 1
            return u.new_zeros((b * nblk if invariant else nblk,) + tuple(X.shape))

        dB, dC = part(B), part(C)
        run_tasks(scan_bwd, b * nblk, nt, _np(u), _np(dt), _np(bk), _np(kp), _np(A), _np(A2), _np(B),
                  _np(C), _np(Dk), _np(_or(z, dummy)), _np(_or(h0, dummy)), _np(ck), _np(dout),
                  _np(_or(dlast, dummy).contiguous()), *ctx.flags,
                  int(z is not None), int(h0 is not None), int(dlast is not None), K, dblk,
                  du.numpy(), ddt.numpy(), dbias.numpy(), dA.numpy(), dB.numpy(), dC.numpy(), dD.numpy(),
                  dz.numpy(), dh0.numpy(),
                  u.new_empty(nt, K + 1, n, dblk).numpy(), u.new_empty(nt, K, n, dblk).numpy(),
                  u.new_empty(nt, n, dblk).numpy(), u.new_empty(nt, K, dblk).numpy(),
                  u.new_empty(nt, K if ctx.flags[0] else 0, dblk).numpy(), u.new_empty(nt, 6, dblk).numpy())
        dA = dA if A.shape[0] > 1 else dA.sum(0, keepdim=True)
        dD = (dD if Dk.shape[0] > 1 else dD.sum(0, keepdim=True)) if ctx.has_D else None
        return (du, ddt, dbias.sum(0) if has_bias else None, None, None, dA, dB.sum(0), dC.sum(0), dD,
                dz if z is not None else None, dh0 if h0 is not None else None, None, None, None)


def _or(x: Optional[Tensor], default: Tensor) -> Tensor:
    return default if x is None else x


def _bc_kernel(X: Tensor, d: int) -> Tensor:
    """B or C in the kernel layout [LB, bB, G, n] (differentiable; small tensors)."""
    if X.dim() == 2:  # [d, n]: time-invariant, one group per channel
        return X.contiguous().view(1, 1, d, X.shape[1])
    if X.dim() == 3:  # [b, n, L]
        return X.permute(2, 0, 1).unsqueeze(2).contiguous()
    return X.permute(3, 0, 1, 2).contiguous()  # [b, g, n, L] -> [L, b, g, n]


def selective_scan_numba(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                         delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                         return_last_state: bool = False, initial_state: Optional[Tensor] = None,
                         *, delta_mask: Optional[Tensor] = None, chunk_len: Optional[int] = None,
                         d_block: Optional[int] = None) -> ScanResult:
    """The fused kernel; same arguments and numbers as ``selective_scan_ref``. ``delta_mask``
    ``[b, L]`` bool: where False the delta is 0 (after bias and softplus), i.e. the state
    passes through the step unchanged (see :func:`ablate.ops.selective_scan.selective_scan`).

    ``chunk_len`` (K: steps between saved states, and the backward's recompute window) and
    ``d_block`` (channels per task) change speed, never results. Inputs that are views of
    time-major ``[L, b, d]`` storage avoid a copy, and the output is such a view.
    Time-invariant B or C ([d, n]) run one channel per group, i.e. unvectorised.
    """
    check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if delta_mask is not None:
        check_delta_mask(delta_mask, u)
    dtype = compute_dtype(u)
    b, d, L = u.shape
    n = A.shape[-1]
    item = torch.finfo(dtype).bits // 8

    def tm(v: Tensor) -> Tensor:  # [b, d, L] -> [L, b, d]; free for views of time-major storage
        return v.to(dtype).permute(2, 0, 1).contiguous()

    keep = None if delta_mask is None else delta_mask.t().contiguous()  # [L, b]
    bias = None if delta_bias is None else delta_bias.to(dtype).contiguous()
    A_k = A.to(dtype).transpose(-1, -2)  # [(b,) n, d]
    A_k = (A_k.unsqueeze(0) if A_k.dim() == 2 else A_k).contiguous()
    D_k = None if D is None else D.to(dtype).reshape(-1, d).contiguous()
    h0 = None if initial_state is None else initial_state.to(dtype).transpose(1, 2).contiguous()
    if d_block is None:
        nblk = max(1, -(-torch.get_num_threads() // max(1, b)))  # split channels if b is small
        d_block = min(d, (-(-d // nblk) + 15) // 16 * 16)
    dblk = max(1, min(d, d_block))
    K = chunk_len or CHUNK_BYTES // (n * dblk * item)
    K = max(1, min(L, K))
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    out, last = _NumbaScanFn.apply(tm(u), tm(delta), bias, keep, bool(delta_softplus), A_k, _bc_kernel(B.to(dtype), d),
                                   _bc_kernel(C.to(dtype), d), D_k,
                                   None if z is None else tm(z), h0, K, dblk, save)
    out = out.permute(1, 2, 0).to(u.dtype)  # [b, d, L] view of time-major storage
    return (out, last.transpose(1, 2)) if return_last_state else out


def state_update_numba(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                       dt_bias: Optional[Tensor] = None, dt_softplus: bool = False) -> Tensor:
    """:func:`ablate.ops.state_update.selective_state_update` by :func:`state_step` (CPU; no
    autograd: a decoding step); ``state`` (float32 or float64) updated in place."""
    if state.device.type != "cpu":
        raise ValueError(f"selective_state_update: impl 'numba' runs on CPU tensors only, got {state.device}")
    f = state.dtype
    work = state if state.is_contiguous() else state.contiguous()
    with torch.no_grad():
        xf = x.to(f).contiguous()
        out = torch.empty_like(xf)
        Dv = D.to(f).contiguous() if D is not None else xf.new_zeros(state.shape[1])
        zf = z.to(f).contiguous() if z is not None else xf
        bias = dt_bias.to(f).contiguous() if dt_bias is not None else xf.new_zeros(state.shape[1])
        b = state.shape[0]
        nt = max(1, min(torch.get_num_threads(), b))
        run_tasks(state_step, b, nt, work.numpy(), xf.numpy(), dt.to(f).contiguous().numpy(), bias.numpy(),
                  (A.to(f) * _LOG2E).contiguous().numpy(), B.to(f).contiguous().numpy(),
                  C.to(f).contiguous().numpy(), Dv.numpy(), zf.numpy(), out.numpy(),
                  int(dt_softplus or dt_bias is not None), int(dt_softplus), int(z is not None),
                  xf.new_empty(nt, state.shape[1]).numpy())
        if work is not state:
            state.copy_(work)
    return out.to(x.dtype)
