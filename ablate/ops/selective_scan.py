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

Implementations (``impl``): ``"cuda"`` mamba-ssm's kernel (:mod:`ablate.ops.cuda`, optional
``cuda`` extra, CUDA tensors); ``"ref"`` :func:`selective_scan_ref` (the test oracle, autograd
through a Python loop); ``"torch"`` :func:`selective_scan_fast` (custom autograd: no per-step
graph, reverse-time recurrence in backward, states recomputed chunk by chunk); ``"numba"``
:func:`selective_scan_numba` (the same algorithm fused into one compiled CPU kernel per
direction, :mod:`ablate.ops.scan_numba`; needs the optional numba package).
:func:`selective_scan` picks one in :func:`_dispatch`: numba for CPU tensors with input-dependent
B and C when numba imports, the torch path otherwise.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

ScanResult = Union[Tensor, tuple[Tensor, Tensor]]
log = logging.getLogger(__name__)

# Elements of one [K, b, d, n] chunk buffer. The fast path keeps at most five (10 MiB in float32),
# small enough to stay in cache, large enough to amortise Python overhead over K steps; 2^19
# measured best (against 2^18 .. 2^21) at b=64, d=256, n=16 on a 2-core EPYC.
CHUNK_ELEMENTS = 1 << 19
_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
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


def _finish(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    """``(y + D * u) * silu(z)`` with D of shape [d] or [b, d]; all [b, d, L]."""
    if D is not None:
        y = y + u * D.to(y.dtype).unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _delta(delta: Tensor, delta_bias: Optional[Tensor], softplus: bool, dtype: torch.dtype) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype).unsqueeze(-1)
    return F.softplus(delta) if softplus else delta


# ----------------------------------------------------------------------------------------------
# reference


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
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype = _compute_dtype(u)
    b, d, L = u.shape
    uc = u.to(dtype)
    dt = _delta(delta, delta_bias, delta_softplus, dtype)
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
    out = _finish(torch.stack(ys, dim=-1), uc, D, z).to(u.dtype)
    return (out, h) if return_last_state else out


# ----------------------------------------------------------------------------------------------
# fast path
#
# Canonical layout: channels d split into G groups of H (d = G * H, B/C shared within a group),
# time-major, state dim n before the channel dim:
#   u, delta, y       [L, b, G, 1, H]
#   state             [b, G, n, H]          (chunk buffers [K, b, G, n, H])
#   A                 [G, n, H] or [b, G, n, H]
#   B, C              [L, b, G, n, 1] (input-dependent) or [G, n, H] (time-invariant)
# so one step is one contiguous [b, G, n, H] slice, contractions over n are batched
# (1 x n) @ (n x H) matmuls and contractions over H are (1 x H) @ (H x n) ones.


def _groups_of(X: Tensor) -> Optional[int]:
    """Groups of a B/C argument: None if time-invariant, else g (1 for [b, n, L])."""
    return None if X.dim() == 2 else (1 if X.dim() == 3 else X.shape[1])


def _canonical_groups(B: Tensor, C: Tensor, d: int) -> int:
    """The G both B and C can be expressed in (their own g when they agree)."""
    gs = [g for g in (_groups_of(B), _groups_of(C)) if g is not None]
    if not gs:
        return 1
    if len(gs) == 1 or gs[0] == gs[1]:
        return gs[0]
    lo, hi = sorted(gs)
    return hi if hi % lo == 0 else d


def _bc_canonical(X: Tensor, G: int, d: int) -> Tensor:
    """B or C in the canonical layout (differentiable; small tensors)."""
    H = d // G
    if X.dim() == 2:  # [d, n] -> [G, n, H]
        return X.view(G, H, -1).transpose(1, 2).contiguous()
    X4 = X.unsqueeze(1) if X.dim() == 3 else X  # [b, g, n, L]
    if X4.shape[1] != G:  # only when B and C have different groups: refine to G
        X4 = X4.repeat_interleave(G // X4.shape[1], dim=1)
    return X4.permute(3, 0, 1, 2).unsqueeze(-1).contiguous()  # [L, b, G, n, 1]


def _seq_canonical(v: Tensor, G: int) -> Tensor:
    """[b, d, L] -> [L, b, G, 1, H]; free when v is a view of time-major storage."""
    b, d, L = v.shape
    return v.permute(2, 0, 1).contiguous().view(L, b, G, 1, d // G)


class _ScanFn(torch.autograd.Function):
    """The bare recurrence ``y_t = C_t . h_t``, ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``
    on canonical-layout tensors (see above).

    Works in chunks of K steps: exp and products are vectorised over a chunk, then one in-place
    ``addcmul`` per step advances the state; at most five ``[K, b, G, n, H]`` buffers exist. Forward
    keeps the state at each chunk boundary; backward recomputes a chunk's states from its
    boundary and runs the adjoint recurrence ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}``
    backwards in time.
    """

    @staticmethod
    def forward(ctx, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                h0: Optional[Tensor], K: int) -> tuple[Tensor, Tensor]:
        L, b, G, _, H = u.shape
        n = A.shape[-2]
        du = dt * u
        A2 = A * _LOG2E  # exp2 is ~2.5x faster than exp on CPU; same accuracy
        n_chunks = -(-L // K)
        # the state before each chunk, and the last one: separate tensors rather than one
        # [chunks + 1, ...] block, which would exceed glibc's mmap threshold (32 MiB) and be
        # page-faulted afresh on every call
        bounds = [u.new_zeros(b, G, n, H) if h0 is None else h0]
        dA = u.new_empty(K, b, G, n, H)
        h = u.new_empty(K, b, G, n, H)
        y = u.new_empty(L, b, G, 1, H)
        dAv, hv = dA.unbind(0), h.unbind(0)
        for c in range(n_chunks):
            s = c * K
            k = min(K, L - s)
            e = s + k
            torch.mul(dt[s:e], A2, out=dA[:k]).exp2_()
            torch.mul(du[s:e], _at(B, s, e), out=h[:k])
            hv[0].addcmul_(dAv[0], bounds[c])
            for i in range(1, k):
                hv[i].addcmul_(dAv[i], hv[i - 1])
            bounds.append(hv[k - 1].clone())
            _contract_n(y[s:e], _at(C, s, e), h[:k])
        ctx.save_for_backward(u, dt, A, B, C, *bounds)
        ctx.K = K
        ctx.has_h0 = h0 is not None
        ctx.set_materialize_grads(False)
        return y, bounds[-1].clone()

    @staticmethod
    def backward(ctx, dy: Optional[Tensor], dlast: Optional[Tensor]):
        u, dt, A, B, C, *bounds = ctx.saved_tensors
        K = ctx.K
        L, b, G, _, H = u.shape
        n = A.shape[-2]
        dy = dy.contiguous() if dy is not None else torch.zeros_like(u)
        du = dt * u
        A2 = A * _LOG2E
        dA = u.new_empty(K, b, G, n, H)
        x = u.new_empty(K, b, G, n, H)  # delta B u, then the gradient wrt delta * A
        h = u.new_empty(K, b, G, n, H)
        g = u.new_empty(K, b, G, n, H)  # dL/dh_t
        dAv, xv, hv, gv = dA.unbind(0), x.unbind(0), h.unbind(0), g.unbind(0)
        carry = dlast.clone() if dlast is not None else None  # dL/dh from the steps after the chunk
        d_du = torch.empty_like(u)
        d_dt = torch.empty_like(u)  # through the decay only
        dB = torch.zeros_like(B) if B.dim() == 3 else torch.empty_like(B)
        dC = torch.zeros_like(C) if C.dim() == 3 else torch.empty_like(C)
        dA_acc = u.new_zeros(K, b, G, n, H)
        for c in reversed(range(len(bounds) - 1)):
            s = c * K
            k = min(K, L - s)
            e = s + k
            torch.mul(dt[s:e], A2, out=dA[:k]).exp2_()
            torch.mul(du[s:e], _at(B, s, e), out=x[:k])
            torch.addcmul(xv[0], dAv[0], bounds[c], out=hv[0])
            for i in range(1, k):
                torch.addcmul(xv[i], dAv[i], hv[i - 1], out=hv[i])
            torch.mul(dy[s:e], _at(C, s, e), out=g[:k])
            if carry is not None:
                gv[k - 1].add_(carry)
            for i in range(k - 2, -1, -1):
                gv[i].addcmul_(dAv[i + 1], gv[i + 1])
            carry = torch.mul(dAv[0], gv[0]) if carry is None else torch.mul(dAv[0], gv[0], out=carry)
            # the chunk's gradients, vectorised over its k steps
            _contract_n(d_du[s:e], _at(B, s, e), g[:k])
            _contract_h(dB, s, e, g[:k], du[s:e])
            _contract_h(dC, s, e, h[:k], dy[s:e])
            w = torch.sub(h[:k], x[:k], out=x[:k]).mul_(g[:k])  # g * dA * h_{t-1} = dL/d(delta A)
            dA_acc[:k].addcmul_(w, dt[s:e])  # summed over steps once, after the loop
            torch.sum(w.mul_(A), dim=-2, keepdim=True, out=d_dt[s:e])
        dA_param = dA_acc.sum(dim=0) if A.dim() == 4 else dA_acc.sum(dim=(0, 1))
        d_u = d_du * dt
        d_delta = torch.addcmul(d_dt, d_du, u)
        d_h0 = carry if ctx.has_h0 else None
        return d_u, d_delta, dA_param, dB, dC, d_h0, None


def _at(X: Tensor, s: int, e: int) -> Tensor:
    """Steps s..e of an input-dependent B/C, or the time-invariant one itself."""
    return X[s:e] if X.dim() == 5 else X


def _contract_n(out: Tensor, X: Tensor, S: Tensor) -> None:
    """out [k, b, G, 1, H] = sum_n X * S, with S [k, b, G, n, H] and X [k, b, G, n, 1] or [G, n, H]."""
    if X.dim() == 3:
        torch.sum(S * X, dim=-2, keepdim=True, out=out)
        return
    k, b, G, n, H = S.shape
    m = k * b * G
    torch.bmm(X.view(m, 1, n), S.view(m, n, H), out=out.view(m, 1, H))


def _contract_h(dX: Tensor, s: int, e: int, S: Tensor, v: Tensor) -> None:
    """Gradient of B/C from S [k, b, G, n, H] and v [k, b, G, 1, H]: dX[s:e] = sum_H S * v for an
    input-dependent dX [L, b, G, n, 1]; dX += sum_{k, b} S * v for a time-invariant [G, n, H]."""
    if dX.dim() == 3:
        dX.add_((S * v).sum(dim=(0, 1)))
        return
    k, b, G, n, H = S.shape
    m = k * b * G
    # (1 x H) @ (H x n) with S transposed: a GEMM row, far faster than the (n x H) @ (H x 1) GEMV
    torch.bmm(v.view(m, 1, H), S.view(m, n, H).transpose(1, 2), out=dX[s:e].view(m, 1, n))


def selective_scan_fast(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                        delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                        return_last_state: bool = False,
                        initial_state: Optional[Tensor] = None, *,
                        chunk_len: Optional[int] = None) -> ScanResult:
    """Same numbers as :func:`selective_scan_ref` without an autograd node per step, in memory
    O(b d n (L / K + 5 K)). Layout changes, the prologue (bias, softplus) and the epilogue (D, z)
    are ordinary autograd ops on [b, d, L]-sized tensors; only the recurrence is custom.
    ``chunk_len`` (K, steps per chunk) defaults to ``CHUNK_ELEMENTS // (b d n)``; results do not
    depend on it. Inputs that are views of time-major ``[L, b, d]`` storage avoid a copy, and the
    output is such a view."""
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype = _compute_dtype(u)
    b, d, L = u.shape
    n = A.shape[-1]
    G = _canonical_groups(B, C, d)
    H = d // G
    uc = u.to(dtype)
    dt = _delta(delta, delta_bias, delta_softplus, dtype)
    A_c = A.to(dtype).reshape(*A.shape[:-2], G, H, n).transpose(-1, -2).contiguous()  # [(b,) G, n, H]
    h0 = None
    if initial_state is not None:
        h0 = initial_state.to(dtype).reshape(b, G, H, n).transpose(-1, -2).contiguous()
    K = chunk_len or CHUNK_ELEMENTS // max(1, b * d * n)
    K = max(1, min(L, K))
    y, last = _ScanFn.apply(_seq_canonical(uc, G), _seq_canonical(dt, G), A_c,
                            _bc_canonical(B.to(dtype), G, d), _bc_canonical(C.to(dtype), G, d), h0, K)
    y = y.view(L, b, d).permute(1, 2, 0)  # [b, d, L] view of time-major storage
    out = _finish(y, uc, D, z).to(u.dtype)
    if not return_last_state:
        return out
    return out, last.transpose(-1, -2).reshape(b, d, n)


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
                         *, chunk_len: Optional[int] = None,
                         d_block: Optional[int] = None) -> ScanResult:
    """Same numbers as :func:`selective_scan_ref` from the fused numba kernel (CPU tensors only;
    ImportError without numba). ``chunk_len`` and ``d_block`` tune speed, never results; see
    :func:`ablate.ops.scan_numba.selective_scan_numba`."""
    if u.device.type != "cpu":
        raise ValueError(f"selective_scan: impl 'numba' runs on CPU tensors only, got {u.device}")
    from .scan_numba import selective_scan_numba as kernel
    return kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                  return_last_state=return_last_state, initial_state=initial_state,
                  chunk_len=chunk_len, d_block=d_block)


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
                   A_scale: Optional[Tensor] = None, *, impl: Optional[str] = None) -> ScanResult:
    """The selective scan (see the module docstring for shapes); ``impl`` forces ``"ref"``,
    ``"torch"``, ``"numba"`` or ``"cuda"``, otherwise the best available path is chosen.

    ``A_scale [b, d]`` (positive, with A ``[d, n]``) makes A per sample: ``A_b = A_scale_b * A``.
    The CUDA path folds it into delta and u (:mod:`ablate.ops.cuda`); the CPU paths take the
    ``[b, d, n]`` product."""
    if torch.is_autocast_enabled(u.device.type):
        # the state and its sums stay fp32 under autocast (as in mamba-ssm); inputs may be half
        with torch.autocast(device_type=u.device.type, enabled=False):
            return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state, A_scale, impl=impl)
    fn = _dispatch(u, B, C, impl)
    if A_scale is not None:
        if A.dim() != 2 or A_scale.shape != (u.shape[0], A.shape[0]):
            raise ValueError(f"selective_scan: A_scale must be [b, d] = {(u.shape[0], A.shape[0])} "
                             f"with A [d, n]; got A_scale {tuple(A_scale.shape)}, A {tuple(A.shape)}")
        if fn is _cuda:
            return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                      return_last_state=return_last_state, initial_state=initial_state, A_scale=A_scale)
        A = A_scale.unsqueeze(-1) * A
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              return_last_state=return_last_state, initial_state=initial_state)
