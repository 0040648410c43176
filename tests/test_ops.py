"""SSM ops, Mamba block and scan orders: fast paths against their reference twins, and the
properties a plausible bug would break (causality, masks, inverse permutations, hooks).

Equivalence tolerance for the selective scan in float64: atol = rtol = 1e-10 on outputs and on
every gradient (the paths sum the same terms in different orders, and the numba kernel's exp is
its own polynomial, accurate to ~2 ulp; observed error ~1e-14).

The numba kernel tests are skipped without numba; the first run compiles the kernels (float64
and float32, ~15 s cold on a 2-core CPU) into numba's on-disk cache, later runs load them.
"""
from __future__ import annotations

import importlib
import os
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ablate.model.mamba import Mamba
from ablate.model.scan_order import MultiDirection, inverse, permute, permute_ref, scan_permutations
from ablate.ops import (causal_conv1d, causal_conv1d_fast, causal_conv1d_ref, default_impl,
                        numba_available, selective_scan, selective_scan_fast, selective_scan_numba,
                        selective_scan_ref)

scan_module = importlib.import_module("ablate.ops.selective_scan")  # the module, not the function
# numba is a dependency: CI (CI=true) runs these tests and fails if it is missing, never skips
needs_numba = pytest.mark.skipif(not numba_available() and not os.environ.get("CI"),
                                 reason="numba is not installed (outside CI)")

TOL = dict(atol=1e-10, rtol=1e-10)
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(b=2, d=4, L=7, n=16, b_layout="bnl", c_layout="bnl", groups=2, batch_A=False,
                batch_D=False, with_D=True, with_z=True, with_bias=True, with_h0=True,
                dtype=F64, seed=0):
    """All selective-scan arguments as leaf tensors; ``*_layout`` in {"dn", "bnl", "bgnl"}."""
    g = _gen(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    def bc(layout):
        shapes = {"dn": (d, n), "bnl": (b, n, L), "bgnl": (b, groups, n, L)}
        return r(*shapes[layout])

    A = -torch.rand(*((b, d, n) if batch_A else (d, n)), generator=g, dtype=dtype) * 2 - 0.1
    return dict(
        u=r(b, d, L), delta=r(b, d, L, scale=0.5), A=A.requires_grad_(), B=bc(b_layout), C=bc(c_layout),
        D=(r(b, d) if batch_D else r(d)) if with_D else None,
        z=r(b, d, L) if with_z else None,
        delta_bias=r(d, scale=0.5) if with_bias else None,
        initial_state=r(b, d, n) if with_h0 else None,
    )


def outputs_and_grads(fn, args, softplus=True, **kw):
    """``fn``'s output, last state and the gradients of a random projection of both wrt every
    differentiable input (not a bool mask)."""
    names = [k for k, v in args.items() if v is not None and v.requires_grad]
    y, last = fn(**args, delta_softplus=softplus, return_last_state=True, **kw)
    # drawn by shape, not *_like: the fast path returns a differently strided (time-major) view
    gy = torch.randn(y.shape, generator=_gen(1), dtype=F64).to(y.dtype)
    gl = torch.randn(last.shape, generator=_gen(2), dtype=F64).to(last.dtype)
    grads = torch.autograd.grad((y * gy).sum() + (last * gl).sum(), [args[k] for k in names])
    return {"out": y, "last_state": last, **{f"grad_{k}": v for k, v in zip(names, grads)}}


def assert_same(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **(tol or TOL), msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------------------------- selective scan

@pytest.mark.parametrize("b_layout", ["dn", "bnl", "bgnl"])
@pytest.mark.parametrize("c_layout", ["dn", "bnl", "bgnl"])
@pytest.mark.parametrize("L,n", [(1, 16), (7, 1), (9, 16)])
def test_fast_matches_ref_all_layouts(b_layout, c_layout, L, n):
    args = make_inputs(L=L, n=n, b_layout=b_layout, c_layout=c_layout,
                       batch_A=(b_layout == "bnl"), batch_D=(c_layout == "bgnl"))
    ref = outputs_and_grads(selective_scan_ref, args)
    for chunk_len in (1, 3, None):  # chunk boundaries must not matter
        assert_same(ref, outputs_and_grads(selective_scan_fast, args, chunk_len=chunk_len))


@pytest.mark.parametrize("flags", [
    dict(with_D=False, with_z=False, with_bias=False, with_h0=False),
    dict(with_D=True, with_z=False, with_bias=False, with_h0=False),
    dict(with_D=False, with_z=True, with_bias=False, with_h0=False),
    dict(with_D=False, with_z=False, with_bias=True, with_h0=False),
    dict(with_D=False, with_z=False, with_bias=False, with_h0=True),
    dict(batch_A=True, batch_D=True),
])
@pytest.mark.parametrize("softplus", [False, True])
def test_fast_matches_ref_optional_args(flags, softplus):
    args = make_inputs(L=5, **flags)
    if not softplus:  # keep delta positive as a real dt would be
        args["delta"] = (args["delta"].detach().abs() + 0.05).requires_grad_()
    assert_same(outputs_and_grads(selective_scan_ref, args, softplus),
                outputs_and_grads(selective_scan_fast, args, softplus, chunk_len=2))


@pytest.mark.parametrize("gb,gc,d", [(2, 4, 8), (2, 3, 6)])
def test_fast_matches_ref_mismatched_groups(gb, gc, d):
    args = make_inputs(d=d, L=6, n=3, b_layout="bgnl", c_layout="dn")
    g = _gen(5)
    args["B"] = torch.randn(2, gb, 3, 6, generator=g, dtype=F64).requires_grad_()
    args["C"] = torch.randn(2, gc, 3, 6, generator=g, dtype=F64).requires_grad_()
    assert_same(outputs_and_grads(selective_scan_ref, args), outputs_and_grads(selective_scan_fast, args))


def test_fast_matches_ref_strided_inputs():
    """Expanded (stride-0) A, transposed B/C and time-major u: layouts must not change numbers."""
    g = _gen(11)
    A0 = (-torch.rand(4, 3, generator=g, dtype=F64) - 0.1).requires_grad_()
    args = make_inputs(L=6, n=3, with_h0=False)
    args["A"] = A0.unsqueeze(0).expand(2, 4, 3)
    args["B"] = torch.randn(2, 6, 3, generator=g, dtype=F64).transpose(1, 2).detach().requires_grad_()
    args["u"] = torch.randn(6, 2, 4, generator=g, dtype=F64).permute(1, 2, 0).detach().requires_grad_()
    ref = outputs_and_grads(selective_scan_ref, args)
    fast = outputs_and_grads(selective_scan_fast, args)
    assert_same(ref, fast)
    ga = [torch.autograd.grad(fn(**args).sum(), A0)[0] for fn in (selective_scan_ref, selective_scan_fast)]
    torch.testing.assert_close(ga[0], ga[1], **TOL)


def test_groups_map_channels_to_consecutive_blocks():
    """Channel d uses group d // (d_total / g), as mamba-ssm's "(g h)" layout: with g groups,
    making B equal across groups must give the same result as the ungrouped [b, n, L] B."""
    args = make_inputs(d=6, L=4, n=3, b_layout="bnl", c_layout="bnl")
    y1 = selective_scan_fast(**args)
    grouped = dict(args, B=args["B"].unsqueeze(1).expand(2, 3, 3, 4),
                   C=args["C"].unsqueeze(1).expand(2, 3, 3, 4))
    torch.testing.assert_close(selective_scan_fast(**grouped), y1, **TOL)
    # and group 1 (channels 2, 3) really reads B[:, 1]: change only it
    B2 = grouped["B"].detach().clone()
    B2[:, 1] += 1.0
    y2 = selective_scan_fast(**dict(grouped, B=B2))
    changed = (y2 - y1).abs().amax(dim=(0, 2)) > 1e-12  # per channel
    assert changed.tolist() == [False, False, True, True, False, False]


def test_float32_fast_close_to_float64_ref():
    args = make_inputs(b=3, d=8, L=40, n=16, dtype=torch.float32)
    args64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in args.items()}
    ref = outputs_and_grads(selective_scan_ref, args64)
    fast = outputs_and_grads(selective_scan_fast, args)
    for k in ref:
        assert fast[k].dtype == torch.float32
        scale = ref[k].abs().max()
        assert (fast[k].double() - ref[k]).abs().max() <= 1e-5 * scale + 1e-6, k


def test_reference_recurrence_by_hand():
    """One channel, one state, no options: h_t = exp(dt A) h_{t-1} + dt B u, y = C h."""
    u = torch.tensor([[[1.0, 2.0, -1.0]]], dtype=F64)
    dt = torch.tensor([[[0.5, 1.0, 0.25]]], dtype=F64)
    A, B, C = (torch.tensor([[v]], dtype=F64) for v in (-2.0, 3.0, 0.5))
    h, ys = 0.0, []
    for t in range(3):
        h = math.exp(dt[0, 0, t].item() * -2.0) * h + dt[0, 0, t].item() * 3.0 * u[0, 0, t].item()
        ys.append(0.5 * h)
    for fn in (selective_scan_ref, selective_scan_fast):
        torch.testing.assert_close(fn(u, dt, A, B, C)[0, 0], torch.tensor(ys, dtype=F64), **TOL)


def test_fast_path_has_no_per_step_graph():
    """The autograd graph of the fast path must not grow with L (no per-step nodes)."""
    def n_nodes(L):
        args = make_inputs(L=L)
        y = selective_scan_fast(**args, delta_softplus=True)
        seen, stack = set(), [y.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            stack.extend(f for f, _ in node.next_functions)
        return len(seen)
    assert n_nodes(4) == n_nodes(40)


def test_dispatch_and_errors():
    args = make_inputs(L=3)
    torch.testing.assert_close(selective_scan(**args, impl="ref"), selective_scan_ref(**args), **TOL)
    torch.testing.assert_close(selective_scan(**args, impl="torch"), selective_scan_fast(**args), **TOL)
    with pytest.raises(ValueError, match="impl must be one of"):
        selective_scan(**args, impl="cuda-please")
    with pytest.raises(ValueError, match="selective_scan: A must be"):
        selective_scan(**dict(args, A=torch.zeros(5, 16, dtype=F64)))
    with pytest.raises(ValueError, match="selective_scan: B must be"):
        selective_scan(**dict(args, B=torch.zeros(2, 3, 16, 3, dtype=F64)))  # 3 groups do not divide d=4
    with pytest.raises(ValueError, match="initial_state must be"):
        selective_scan(**dict(args, initial_state=torch.zeros(2, 4, 15, dtype=F64)))


def test_initial_state_continues_a_split_sequence():
    """Scanning [0, t) then [t, L) from the returned state equals one scan over [0, L)."""
    args = make_inputs(L=9, with_h0=False, with_z=True)
    full = selective_scan_fast(**args, delta_softplus=True)
    cut = lambda v, sl: v[..., sl] if v is not None and v.dim() == 3 and v.shape[-1] == 9 else v
    first = {k: cut(v, slice(0, 4)) for k, v in args.items()}
    second = {k: cut(v, slice(4, 9)) for k, v in args.items()}
    y1, h = selective_scan_fast(**first, delta_softplus=True, return_last_state=True)
    y2 = selective_scan_fast(**dict(second, initial_state=h), delta_softplus=True)
    torch.testing.assert_close(torch.cat([y1, y2], dim=-1), full, **TOL)


# ---------------------------------------------------------------------------------- numba kernel

@needs_numba
@pytest.mark.parametrize("b_layout", ["dn", "bnl", "bgnl"])
@pytest.mark.parametrize("c_layout", ["dn", "bnl", "bgnl"])
@pytest.mark.parametrize("L,n", [(1, 16), (7, 1), (9, 16)])
def test_numba_matches_ref_all_layouts(b_layout, c_layout, L, n):
    args = make_inputs(L=L, n=n, b_layout=b_layout, c_layout=c_layout,
                       batch_A=(b_layout == "bnl"), batch_D=(c_layout == "bgnl"))
    ref = outputs_and_grads(selective_scan_ref, args)
    # chunk boundaries (K = 1, 3, 4, auto) and channel blocks (3 channels straddle the 2-channel
    # groups; 1 is one channel per task) must not matter
    for chunk_len, d_block in ((1, None), (3, 3), (4, 1), (None, None)):
        assert_same(ref, outputs_and_grads(selective_scan_numba, args, chunk_len=chunk_len,
                                           d_block=d_block))


@needs_numba
@pytest.mark.parametrize("flags", [
    dict(with_D=False, with_z=False, with_bias=False, with_h0=False),
    dict(with_D=True, with_z=False, with_bias=False, with_h0=False),
    dict(with_D=False, with_z=True, with_bias=False, with_h0=False),
    dict(with_D=False, with_z=False, with_bias=True, with_h0=False),
    dict(with_D=False, with_z=False, with_bias=False, with_h0=True),
    dict(batch_A=True, batch_D=True),
])
@pytest.mark.parametrize("softplus", [False, True])
def test_numba_matches_ref_optional_args(flags, softplus):
    args = make_inputs(L=5, **flags)
    if not softplus:
        args["delta"] = (args["delta"].detach().abs() + 0.05).requires_grad_()
    assert_same(outputs_and_grads(selective_scan_ref, args, softplus),
                outputs_and_grads(selective_scan_numba, args, softplus, chunk_len=2))


@needs_numba
def test_numba_matches_ref_wide_state_and_groups():
    """n = 64, several groups, L = 37 (not a multiple of K = 8), channels split in blocks."""
    args = make_inputs(b=2, d=12, L=37, n=64, b_layout="bgnl", c_layout="bgnl", groups=3,
                       batch_A=True, batch_D=True)
    ref = outputs_and_grads(selective_scan_ref, args)
    assert_same(ref, outputs_and_grads(selective_scan_numba, args, chunk_len=8, d_block=5))
    args["B"] = torch.randn(2, 2, 64, 37, generator=_gen(3), dtype=F64).requires_grad_()  # gb=2, gc=3
    assert_same(outputs_and_grads(selective_scan_ref, args),
                outputs_and_grads(selective_scan_numba, args, chunk_len=8))


@needs_numba
def test_numba_matches_ref_strided_inputs():
    g = _gen(11)
    A0 = (-torch.rand(4, 3, generator=g, dtype=F64) - 0.1).requires_grad_()
    args = make_inputs(L=6, n=3, with_h0=False)
    args["A"] = A0.unsqueeze(0).expand(2, 4, 3)
    args["B"] = torch.randn(2, 6, 3, generator=g, dtype=F64).transpose(1, 2).detach().requires_grad_()
    args["u"] = torch.randn(6, 2, 4, generator=g, dtype=F64).permute(1, 2, 0).detach().requires_grad_()
    args["D"] = torch.randn(1, generator=g, dtype=F64).expand(4).detach().requires_grad_()
    assert_same(outputs_and_grads(selective_scan_ref, args), outputs_and_grads(selective_scan_numba, args))


@needs_numba
def test_numba_float32_close_to_float64_ref():
    args = make_inputs(b=3, d=8, L=40, n=16, dtype=torch.float32)
    args64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in args.items()}
    ref = outputs_and_grads(selective_scan_ref, args64)
    got = outputs_and_grads(selective_scan_numba, args, chunk_len=16)
    for k in ref:
        assert got[k].dtype == torch.float32
        assert (got[k].double() - ref[k]).abs().max() <= 1e-5 * ref[k].abs().max() + 1e-6, k


@needs_numba
def test_numba_exp2_accuracy_and_special_values():
    import numpy as np

    from ablate.ops.numba_math import exp2_array
    for dtype, lo, hi in ((np.float32, -160.0, 140.0), (np.float64, -1100.0, 1100.0)):
        fi = np.finfo(dtype)
        x = np.concatenate([np.linspace(lo, hi, 200001), np.linspace(-1, 1, 20001)]).astype(dtype)
        with np.errstate(over="ignore"):
            ref = np.exp2(x.astype(np.float64)).astype(dtype)  # correctly rounded for float32
        got = exp2_array(x)
        normal = (ref >= fi.tiny) & (ref <= fi.max)
        assert np.max(np.abs(got[normal] / ref[normal] - 1)) <= 2 * fi.eps, dtype  # ~2 ulp
        sub = (ref > 0) & (ref < fi.tiny)  # subnormal results: within one subnormal step
        assert np.max(np.abs(got[sub] - ref[sub])) <= fi.smallest_subnormal, dtype
        assert np.all(got[ref == 0] == 0) and np.all(np.isinf(got[np.isinf(ref)])), dtype
        special = exp2_array(np.array([np.nan, -np.inf, np.inf, 0.0, -0.0], dtype))
        assert np.isnan(special[0]) and special[1:].tolist() == [0.0, np.inf, 1.0, 1.0]


def _masked_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False, initial_state=None, delta_mask=None):
    """The reference scan with ``delta_mask``'s meaning written out: delta = softplus(delta +
    bias) where the mask is True, 0 where False (differentiable through torch)."""
    dt = delta if delta_bias is None else delta + delta_bias.unsqueeze(-1)
    dt = F.softplus(dt) if delta_softplus else dt
    dt = dt if delta_mask is None else dt * delta_mask.unsqueeze(1).to(dt.dtype)
    return selective_scan_ref(u, dt, A, B, C, D, z, None, False, return_last_state, initial_state)


@needs_numba
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 1, 3), (2, 7, 13, 5), (3, 33, 20, 16)])
@pytest.mark.parametrize("flags", [
    dict(with_D=False, with_z=False, with_bias=False, with_h0=False),
    dict(with_D=False, with_z=False, with_bias=True, with_h0=False),
    dict(with_D=True, with_z=True, with_bias=True, with_h0=True),
    dict(with_D=True, with_z=True, with_bias=False, with_h0=True, batch_D=True),
])
@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_numba_fused_delta_matches_ref(shape, flags, softplus, masked, threads):
    """delta + delta_bias, softplus and the delta mask inside the kernel: outputs and the
    gradients of every input (delta and delta_bias through softplus and the mask) equal the
    reference's, for odd sizes, L = 1, one and two threads; chunks of 3 steps, blocks of 4
    channels (so a task can start mid-sequence and mid-group)."""
    torch.set_num_threads(threads)  # restored by conftest's fixture
    b, d, L, n = shape
    args = make_inputs(b=b, d=d, L=L, n=n, groups=1, seed=L + n, **flags)
    g = _gen(5)
    # deltas across softplus's range, past its threshold 20 too; positive without softplus
    raw = torch.randn(b, d, L, generator=g, dtype=F64) * 8
    raw[..., ::3] += 22.0
    args["delta"] = (raw if softplus else raw.abs() * 0.05 + 0.01).requires_grad_()
    if masked:
        mask = torch.rand(b, L, generator=g) > 0.4
        mask[0, 0] = False  # a masked step at the start, always
        args["delta_mask"] = mask
    else:
        args["delta_mask"] = None
    ref = outputs_and_grads(_masked_ref, args, softplus)
    got = outputs_and_grads(selective_scan_numba, args, softplus, chunk_len=3, d_block=4)
    assert_same(ref, got, atol=1e-12, rtol=1e-12)
    if masked:  # a masked step's delta, and so its raw delta's gradient, is exactly 0
        assert torch.all(got["grad_delta"].permute(0, 2, 1)[~mask] == 0)


@needs_numba
def test_numba_delta_mask_is_applied_and_checked():
    """The mask changes the result (the state passes through masked steps), and the
    dispatcher gives every path the same masked scan."""
    args = make_inputs(b=2, d=6, L=9, n=4)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 3:5] = mask[1, 0] = False
    y = selective_scan_numba(**args, delta_softplus=True, delta_mask=mask)
    assert (y - selective_scan_numba(**args, delta_softplus=True)).abs().max() > 1e-3
    for impl in ("ref", "torch", "numba"):
        torch.testing.assert_close(selective_scan(**args, delta_softplus=True, delta_mask=mask, impl=impl),
                                   y, **TOL)
    # all-masked: the state is the initial state, and y only reads it through C
    _, last = selective_scan_numba(**args, delta_softplus=True, return_last_state=True,
                                   delta_mask=torch.zeros(2, 9, dtype=torch.bool))
    torch.testing.assert_close(last, args["initial_state"], atol=0, rtol=0)
    for bad in (mask.float(), mask[:, :8]):
        with pytest.raises(ValueError, match="delta_mask must be a bool"):
            selective_scan(**args, delta_mask=bad, impl="numba")
        with pytest.raises(ValueError, match="delta_mask must be a bool"):
            selective_scan(**args, delta_mask=bad, impl="torch")


def _ulps(got, want, dtype):
    """|got - want| in units of the last place of ``want`` rounded to ``dtype`` (subnormal
    results: in units of the smallest subnormal)."""
    import numpy as np

    fi = np.finfo(dtype)
    ulp = np.maximum(np.spacing(np.abs(want.astype(dtype))).astype(np.longdouble), fi.smallest_subnormal)
    return np.abs(got.astype(np.longdouble) - want) / ulp


def _exact_ulps(got, x, kind: str, dtype, every: int, mp: bool = False):
    """Error in ulps of ``got`` against ``kind`` (``softplus``, ``sigmoid`` or ``exp``) of ``x``,
    computed in extended precision: numpy's long double where it is wider than float64, else (or
    with ``mp``) mpmath at 40 digits on every ``every``-th point (as slow as it is exact)."""
    import numpy as np

    if not mp and (np.finfo(np.longdouble).eps < np.finfo(np.float64).eps or dtype is np.float32):
        xl = x.astype(np.longdouble)
        want = {"softplus": lambda: np.log1p(np.exp(xl)), "sigmoid": lambda: 1 / (1 + np.exp(-xl)),
                "exp": lambda: np.exp(xl)}[kind]()
        if kind != "exp":
            want = np.where(x > 20, xl if kind == "softplus" else 1, want)
        return _ulps(got, want, dtype)
    import mpmath

    fi = np.finfo(dtype)
    out = []
    with mpmath.workdps(40):
        for xi, gi in zip(x[::every].tolist(), got[::every].tolist()):
            xm = mpmath.mpf(xi)
            if kind == "exp":
                w = mpmath.exp(xm)
            elif xi > 20:
                w = xm if kind == "softplus" else mpmath.mpf(1)
            else:
                w = mpmath.log1p(mpmath.exp(xm)) if kind == "softplus" else 1 / (1 + mpmath.exp(-xm))
            ulp = max(float(np.spacing(abs(dtype(float(w))))), float(fi.smallest_subnormal))
            out.append(float(abs(mpmath.mpf(gi) - w)) / ulp)
    return np.array(out)


@needs_numba
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_numba_softplus_accuracy_and_torch_threshold(dtype_name):
    """softplus (and its derivative, sigmoid) within 2 (3) ulp of log1p(exp(x)) computed in
    extended precision (long double, or mpmath where long double is float64), from far below 0
    (subnormal and zero results) to past torch's threshold, where, as torch's F.softplus, it is
    x itself (and its derivative 1); measured 1.5 (2.2) ulp in both precisions. natural exp
    within 2 ulp (measured 1.15)."""
    import numpy as np
    from numba import njit

    from ablate.ops.numba_math import exp, softplus_array

    dtype = np.dtype(dtype_name).type
    lo = -120.0 if dtype is np.float32 else -760.0
    x = np.concatenate([np.linspace(lo, 40, 200001), np.linspace(-25, 25, 100001),
                        -np.logspace(-30, 3, 1000), np.logspace(-30, 3, 1000)]).astype(dtype)
    every = 23  # the mpmath reference's stride (a prime: it samples every region of x)
    above = x > 20
    got = softplus_array(x, False)
    assert _exact_ulps(got, x, "softplus", dtype, every).max() <= 2.0
    assert np.array_equal(got[above], x[above])
    torch_sp = F.softplus(torch.from_numpy(x)).numpy()
    assert _ulps(got, torch_sp.astype(np.longdouble), dtype).max() <= 3.0
    assert _exact_ulps(softplus_array(x, True), x, "sigmoid", dtype, every).max() <= 3.0
    special = softplus_array(np.array([np.nan, -np.inf, np.inf, 0.0, -0.0, 20.0], dtype), False)
    assert np.isnan(special[0]) and special[1:3].tolist() == [0.0, np.inf]
    assert special[3] == special[4] == dtype(np.log(2.0)) and special[5] > 20 or dtype is np.float32

    @njit
    def exp_array(v):
        out = np.empty_like(v)
        for i in range(v.shape[0]):
            out[i] = exp(v[i])
        return out
    hi = 88.0 if dtype is np.float32 else 709.0
    xe = np.linspace(lo, hi, 200001).astype(dtype)
    assert _exact_ulps(exp_array(xe), xe, "exp", dtype, every).max() <= 2.0


def test_the_mpmath_reference_sees_a_4_ulp_error_and_agrees_with_long_double():
    """The float64 reference of platforms whose long double is float64 (mpmath) tells a correct
    softplus (numpy's, about 1 ulp) from one 4 ulps off, and, where long double is wider (CI's x86-64),
    measures what it measures."""
    import numpy as np

    x = np.linspace(-30, 20, 2001)  # (above 20 the reference is x itself, torch's threshold)
    good = np.log1p(np.exp(x))
    bad = good + 4 * np.spacing(np.abs(good))
    for kind, want in (("softplus", good), ("exp", np.exp(x))):
        off = want + 4 * np.spacing(np.abs(want))
        assert _exact_ulps(want, x, kind, np.float64, 1, mp=True).max() <= 1.5  # numpy: within ~1 ulp
        assert _exact_ulps(off, x, kind, np.float64, 1, mp=True).min() >= 2.5
    if np.finfo(np.longdouble).eps < np.finfo(np.float64).eps:
        for got in (good, bad):
            assert np.allclose(_exact_ulps(got, x, "softplus", np.float64, 1, mp=True),
                               _exact_ulps(got, x, "softplus", np.float64, 1).astype(float), atol=0.01)


@needs_numba
def test_numba_threads_follow_torch_and_give_the_same_bits(monkeypatch):
    """torch.set_num_threads(1) keeps the kernel on the calling thread (a 1-core job uses one
    core); tasks never share an accumulator, so 1 and 2 threads give identical bits."""
    from ablate.ops import scan_numba

    args = make_inputs(b=5, d=32, L=9, n=4, b_layout="bgnl", groups=4)
    pool = scan_numba._executor
    used = []
    monkeypatch.setattr(scan_numba, "_executor", lambda: used.append(1) or pool())
    res = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        res.append(outputs_and_grads(selective_scan_numba, args, d_block=16))
        assert bool(used) == (threads > 1)
    for k in res[0]:
        assert torch.equal(res[0][k], res[1][k]), k


@needs_numba
def test_numba_saves_only_chunk_boundaries():
    """Forward saves the inputs plus one state per chunk of K steps: never a [b, d, L, n] history;
    without grad it saves nothing."""
    b, d, L, n, K = 2, 8, 64, 16, 8
    args = make_inputs(b=b, d=d, L=L, n=n, with_h0=False)
    y = selective_scan_numba(**args, delta_softplus=True, chunk_len=K)
    node = y.grad_fn
    while type(node).__name__ != "_NumbaScanFnBackward":
        node = node.next_functions[0][0]
    saved = sum(t.numel() for t in node.saved_tensors if t is not None)
    inputs = 3 * b * d * L + 2 * b * n * L + 2 * d * n + d  # u, dt, z, B, C, A (and A log2 e), D
    assert saved <= inputs + (L // K) * b * d * n < b * d * L * n
    with torch.no_grad():
        y0 = selective_scan_numba(**args, delta_softplus=True, chunk_len=K)
    torch.testing.assert_close(y0, y.detach(), **TOL)


@needs_numba
def test_dispatch_picks_numba_when_available(monkeypatch):
    args = make_inputs(L=4)
    calls = []
    orig = scan_module.selective_scan_numba
    monkeypatch.setitem(scan_module.IMPLS, "numba", orig)
    monkeypatch.setattr(scan_module, "selective_scan_numba", lambda *a, **k: calls.append(1) or orig(*a, **k))
    selective_scan(**args)
    assert calls == [1]  # the default on CPU with input-dependent B and C
    selective_scan(**dict(args, B=torch.randn(4, 16, dtype=F64)))
    assert calls == [1]  # time-invariant B: the torch path
    with default_impl("torch"):
        selective_scan(**args)
    assert calls == [1]
    monkeypatch.setitem(scan_module._numba_state, "ok", False)  # as without numba
    torch.testing.assert_close(selective_scan(**args), selective_scan_fast(**args), **TOL)
    assert calls == [1]
    with pytest.raises(ValueError, match="impl must be one of"):
        with default_impl("cuda-please"):
            pass


def test_without_numba_the_torch_path_runs(monkeypatch):
    """As on an install without numba: the import fails, dispatch falls back, 'numba' says why."""
    import sys

    import ablate.ops

    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    monkeypatch.delitem(sys.modules, "ablate.ops.scan_numba", raising=False)
    monkeypatch.delattr(ablate.ops, "scan_numba", raising=False)
    monkeypatch.setattr(scan_module, "_numba_state", {})
    args = make_inputs(L=4)
    assert not numba_available()
    torch.testing.assert_close(selective_scan(**args), selective_scan_fast(**args), **TOL)
    with pytest.raises(ImportError):
        selective_scan(**args, impl="numba")


@needs_numba
@pytest.mark.parametrize("masked", [False, True])
def test_mamba_block_same_on_numba_and_torch_paths(masked):
    """The block's own call pattern (time-major views, mask handling, hooks) on both paths."""
    m = _mamba()
    x = torch.randn(3, 9, 16, dtype=F64, requires_grad=True)
    mask = torch.rand(3, 9, generator=_gen(4)) > 0.3 if masked else None
    hooks = dict(B_add=torch.randn(3, m.d_state, dtype=F64), A_log_add=torch.randn(3, m.d_inner, dtype=F64),
                 D_add=torch.randn(3, m.d_inner, dtype=F64))
    res = []
    for impl in ("torch", "numba"):
        with default_impl(impl):
            y = m(x, mask, **hooks)
        params = [x, *m.parameters()]
        res.append([y, *torch.autograd.grad(y.square().sum(), params)])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, **TOL)


# ---------------------------------------------------------------------------------- bench helpers

def test_bench_rows_and_the_mambapy_row_computes_the_same_scan():
    """Not a benchmark: the bench's API at toy size, and its mambapy row must time the same
    function as ours (else the ratio is meaningless)."""
    from ablate.bench import ops as bench

    rows = bench.bench_ops(lengths=(8,), batch=2, d_inner=8, n=2, repeats=2, cases=("plain", "batch_A"))
    impls = {r["impl"] for r in rows}
    assert {"ref", "torch", "attention"} <= impls
    assert {(r["case"], r["impl"]) for r in rows if r["impl"] in ("ref", "torch")} == {
        ("plain", "ref"), ("plain", "torch"), ("batch_A", "torch")}  # variants: fast paths only
    for r in rows:
        assert r["L"] == 8 and r["fwd_bwd_s"] > 0 and r["threads"] == 1
        assert (r["time_vs_plain"] is not None) == (r["case"] == "batch_A")
        assert (r["speedup_vs_ref"] is not None) == (r["case"] == "plain" and r["impl"] != "ref")
    assert "| ref | plain | 8 |" in bench.format_rows(rows)
    if "mambapy" in impls:
        args = bench.scan_inputs("plain", 2, 8, 2, 8, dtype=torch.float32)
        ours = bench._scan_call("ref", args)()
        theirs = bench._mambapy_call(args)().transpose(1, 2)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_the_floor_kernels_compute_the_scan_step_they_stand_for():
    """The floor row times the scan's arithmetic: one forward step of the floor tile is the
    recurrence h = exp(dt A) h + du B, y = C . h (float32), and the bench prints the row with
    every plain row's time over it."""
    pytest.importorskip("numba")
    import numpy as np

    from ablate.bench import floor
    from ablate.bench import ops as bench

    t = floor.tile(4)
    h, a, dt, du, y, b, c = (t[0].copy(), t[6], t[7], t[8], t[10], t[13], t[14])
    want_h = np.exp2(dt[None] * a) * h + du[None] * b[:, None]
    want_y = (c[:, None] * want_h).sum(0)
    floor.floor_fwd(1, t[0], a, dt, du, y, b, c)
    np.testing.assert_allclose(t[0], want_h, rtol=1e-6)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    assert np.isfinite(floor.run(3, floor.tile(16)))
    rows = bench.bench_ops(lengths=(8,), batch=2, d_inner=8, n=2, repeats=1, cases=("plain",), impls=["numba"],
                           attention=False)
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"numba", "floor"} and by["numba"]["time_vs_floor"] > 0
    assert "/ floor" in bench.format_rows(rows)


def _has_clear_refs() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM:" in Path("/proc/self/status").read_text()
    except OSError:
        return False


def test_peak_memory_sees_a_torch_allocation():
    """Where the platform has the RSS high-water mark (Linux, CI) the meter sees a 64 MiB
    allocation; where it has not, it says None rather than a number."""
    from ablate.bench.ops import peak_memory

    with peak_memory() as m:
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        del x
    if not _has_clear_refs():
        assert not os.environ.get("CI"), "CI runs on Linux, which has /proc/self/clear_refs"
        assert m["mb"] is None
        return
    assert m["mb"] is not None
    assert 60 <= m["mb"] < 200


def test_peak_memory_is_none_where_the_platform_cannot_say(monkeypatch):
    """No /proc/self/clear_refs (macOS, some containers): no figure at all, not a made-up one."""
    import builtins

    from ablate import utils

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/self/"):
            raise FileNotFoundError(path)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(utils, "open", no_proc, raising=False)
    with utils.peak_memory() as m:
        x = torch.ones(2**20)
        del x
    assert m == {"mb": None}


# ---------------------------------------------------------------------------------- causal conv

@pytest.mark.parametrize("L", [1, 3, 10])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("bias,activation", [(True, "silu"), (False, None)])
@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("impl", ["fast", "numba"])
def test_causal_conv_paths_match_ref(L, k, bias, activation, time_major, impl):
    """Outputs and the gradients of x, weight and bias, float64, every CPU path."""
    if impl == "numba":
        pytest.importorskip("numba")
    g = _gen(L * 10 + k)
    x = torch.randn(L, 3, 5, generator=g, dtype=F64).permute(1, 2, 0) if time_major else \
        torch.randn(3, 5, L, generator=g, dtype=F64)
    x.requires_grad_()
    w = torch.randn(5, k, generator=g, dtype=F64, requires_grad=True)
    bb = torch.randn(5, generator=g, dtype=F64, requires_grad=True) if bias else None
    inputs = [x, w] + ([bb] if bias else [])
    res = []
    for fn in (causal_conv1d_ref, lambda *a: causal_conv1d(*a, impl=impl)):
        y = fn(x, w, bb, activation)
        gy = torch.randn(y.shape, generator=_gen(9), dtype=F64)
        res.append([y, *torch.autograd.grad((y * gy).sum(), inputs)])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, **TOL)


def test_causal_conv_numba_splits_samples_over_threads():
    """Two threads: each adds its samples' weight and bias gradients into its own partial sums."""
    pytest.importorskip("numba")
    g = _gen(7)
    x = torch.randn(40, 5, 6, generator=g, dtype=F64).permute(1, 2, 0).requires_grad_()
    w = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    bb = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = []
        for impl in ("ref", "numba"):
            y = causal_conv1d(x, w, bb, "silu", impl=impl)
            res.append([y, *torch.autograd.grad(y.square().sum(), [x, w, bb])])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, **TOL)


def test_causal_conv_reference_is_conv1d_and_causal():
    g = _gen(3)
    x = torch.randn(2, 4, 12, generator=g, dtype=F64)
    w = torch.randn(4, 4, generator=g, dtype=F64)
    expect = F.conv1d(x, w.unsqueeze(1), None, padding=3, groups=4)[..., :12]  # mamba-ssm's own formulation
    torch.testing.assert_close(causal_conv1d_ref(x, w), expect, **TOL)
    y = causal_conv1d(x, w, activation="silu")
    for t in range(12):
        x2 = x.clone()
        x2[..., t] += torch.randn(2, 4, generator=g, dtype=F64)
        y2 = causal_conv1d(x2, w, activation="silu")
        assert torch.equal(y2[..., :t], y[..., :t])
        assert not torch.equal(y2[..., t], y[..., t])


# ---------------------------------------------------------------------------------- Mamba block

def _mamba(seed=0, **kw):
    torch.manual_seed(seed)
    return Mamba(d_model=16, d_state=4, **kw).double()


def test_mamba_init_matches_spec():
    torch.manual_seed(0)
    m = Mamba(d_model=32, d_state=16, expand=2, dt_min=0.001, dt_max=0.1)
    E, N, R = 64, 16, 2  # R = ceil(32 / 16)
    assert m.in_proj.weight.shape == (2 * E, 32) and m.in_proj.bias is None
    assert m.conv1d.weight.shape == (E, 1, 4) and m.conv1d.bias.shape == (E,)
    assert m.x_proj.weight.shape == (R + 2 * N, E) and m.x_proj.bias is None
    assert m.dt_proj.weight.shape == (E, R) and m.out_proj.weight.shape == (32, E)
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, N + 1.0)).repeat(E, 1))
    assert torch.equal(m.D, torch.ones(E))
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert dt.max() / dt.min() > 10  # log-uniform spread, not a constant
    assert m.dt_proj.weight.abs().max() <= R ** -0.5 + 1e-7
    assert m.A_log._no_weight_decay and m.D._no_weight_decay


def test_mamba_is_causal():
    m = _mamba()
    x = torch.randn(2, 10, 16, dtype=F64)
    y = m(x)
    for t in range(9):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(2, 9 - t, 16, dtype=F64)
        y2 = m(x2)
        torch.testing.assert_close(y2[:, :t + 1], y[:, :t + 1], atol=1e-12, rtol=0)
        assert (y2[:, t + 1:] - y[:, t + 1:]).abs().max() > 1e-6


HOOKS = {
    "B_add": lambda b, E, N, L: torch.randn(b, N, dtype=F64),
    "C_add": lambda b, E, N, L: torch.randn(b, N, L, dtype=F64),
    "A_log_add": lambda b, E, N, L: torch.randn(b, E, dtype=F64),
    "D_add": lambda b, E, N, L: torch.randn(b, E, dtype=F64),
    "initial_state": lambda b, E, N, L: torch.randn(b, E, N, dtype=F64),
    "x_add": lambda b, E, N, L: torch.randn(b, L, E, dtype=F64),
    "z_add": lambda b, E, N, L: torch.randn(b, L, E, dtype=F64),
}


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_mamba_hooks_identity_at_zero_and_effective(hook):
    m = _mamba()
    x = torch.randn(3, 6, 16, dtype=F64)
    value = HOOKS[hook](3, m.d_inner, m.d_state, 6)
    y = m(x)
    torch.testing.assert_close(m(x, **{hook: torch.zeros_like(value)}), y, atol=1e-14, rtol=0)
    y_hook = m(x, **{hook: value})
    per_sample = (y_hook - y).abs().amax(dim=(1, 2))
    assert (per_sample > 1e-6).all(), per_sample
    value.requires_grad_()
    m(x, **{hook: value}).square().sum().backward()
    assert value.grad is not None and value.grad.abs().sum() > 0


def test_mamba_per_sample_hooks_equal_per_sample_parameters():
    """A_log_add / D_add for sample i equal running sample i with A_log / D shifted."""
    m = _mamba()
    x = torch.randn(2, 5, 16, dtype=F64)
    a = torch.randn(2, m.d_inner, m.d_state, dtype=F64) * 0.3
    dd = torch.randn(2, m.d_inner, dtype=F64)
    y = m(x, A_log_add=a, D_add=dd)
    for i in range(2):
        m2 = _mamba()
        with torch.no_grad():
            m2.A_log += a[i]
            m2.D += dd[i]
        torch.testing.assert_close(y[i:i + 1], m2(x[i:i + 1]), atol=1e-12, rtol=1e-12)


def test_mamba_branch_hooks_equal_shifted_in_proj_and_respect_mask():
    """x_add / z_add are exactly additions to in_proj's two halves: adding in_proj(dx) through
    the hooks equals running on x + dx. Inert positions stay inert with hooks filling them."""
    m = _mamba()
    x, dx = torch.randn(2, 6, 16, dtype=F64), torch.randn(2, 6, 16, dtype=F64)
    xa, za = F.linear(dx, m.in_proj.weight).split(m.d_inner, dim=-1)
    y = m(x, x_add=xa, z_add=za)
    torch.testing.assert_close(y, m(x + dx), atol=1e-12, rtol=0)
    # only x or only z: each one alone changes the output
    assert (m(x, x_add=xa) - m(x)).abs().max() > 1e-6 and (m(x, z_add=za) - m(x)).abs().max() > 1e-6
    with pytest.raises(ValueError, match="x_add must be"):
        m(x, x_add=xa[:, :5])
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False  # leading pads: must be exactly absent even with x_add filling them
    ym = m(x, mask, x_add=xa, z_add=za)
    torch.testing.assert_close(ym[0, 2:], m(x[:1, 2:], x_add=xa[:1, 2:], z_add=za[:1, 2:])[0],
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(ym[1], y[1], atol=1e-12, rtol=0)


def test_mamba_mask_inert_positions():
    """Masked positions: their values never matter, and a run of them at the start of the
    sequence is exactly the same as not having them."""
    m = _mamba()
    x = torch.randn(2, 7, 16, dtype=F64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 2] = mask[1, 5] = False
    y = m(x, mask)
    x2 = x.clone()
    x2[0, 2] = 1e3
    x2[1, 5] = -7.0
    y2 = m(x2, mask)
    torch.testing.assert_close(y2[mask], y[mask], atol=1e-12, rtol=0)
    # leading pads == absent
    pads = torch.randn(2, 3, 16, dtype=F64) * 100
    lead = torch.cat([pads, x], dim=1)
    lead_mask = torch.cat([torch.zeros(2, 3, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(m(lead, lead_mask)[:, 3:], m(x), atol=1e-12, rtol=0)


def test_mamba_last_state_matches_reference_scan():
    m = _mamba()
    x = torch.randn(2, 5, 16, dtype=F64)
    y, h = m(x, return_last_state=True)
    assert h.shape == (2, m.d_inner, m.d_state)
    # the block's state is the reference scan's state on the block's own intermediate tensors
    E, N, R = m.d_inner, m.d_state, m.dt_rank
    xs = F.linear(x, m.in_proj.weight[:E]).transpose(1, 2)
    xs = F.silu(causal_conv1d_ref(xs, m.conv1d.weight.squeeze(1), m.conv1d.bias))
    dt, B, C = torch.split(m.x_proj(xs.transpose(1, 2)), [R, N, N], dim=-1)
    _, h_ref = selective_scan_ref(xs, F.linear(dt, m.dt_proj.weight).transpose(1, 2), -torch.exp(m.A_log),
                                  B.transpose(1, 2), C.transpose(1, 2), m.D, delta_bias=m.dt_proj.bias,
                                  delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(h, h_ref, **TOL)


# ---------------------------------------------------------------------------------- scan orders

@pytest.mark.parametrize("order", ["forward", "bidirectional", "cross4"])
@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (4, 4)])
def test_scan_permutations_invert(order, grid):
    perms = scan_permutations(order, grid)
    L = grid[0] * grid[1]
    assert perms.shape == ({"forward": 1, "bidirectional": 2, "cross4": 4}[order], L)
    x = torch.randn(2, L, 3)
    for p in perms:
        assert torch.equal(torch.sort(p).values, torch.arange(L))
        assert torch.equal(permute(permute(x, p), inverse(p)), x)
        assert torch.equal(permute(permute(x, inverse(p)), p), x)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("shape", [(3, 7), (3, 7, 5), (2, 6, 4, 3)])
def test_permute_matches_ref_values_and_gradients(per_sample, shape):
    """The row-gather permute (custom backward: the inverse permutation) equals the gather
    reference bit for bit, its gradient and the gradient of that gradient too, for contiguous
    and strided inputs; bool masks go through it as well."""
    g = _gen(21)
    b, s = shape[:2]
    perm = torch.arange(s)
    while torch.equal(inverse(perm), perm):  # an involution would hide a backward without the inverse
        perm = (torch.stack([torch.randperm(s, generator=g) for _ in range(b)]) if per_sample
                else torch.randperm(s, generator=g))
    base = torch.randn(*shape[::-1], generator=g, dtype=F64).permute(*range(len(shape) - 1, -1, -1))
    for x in (base.contiguous().requires_grad_(), base.detach().requires_grad_()):  # the second: strided
        y, y_ref = permute(x, perm), permute_ref(x, perm)
        assert torch.equal(y, y_ref)
        w = torch.randn(y.shape, generator=g, dtype=F64)
        (gx,) = torch.autograd.grad((y * w).square().sum(), x, create_graph=True)
        (gx_ref,) = torch.autograd.grad((y_ref * w).square().sum(), x, create_graph=True)
        assert torch.equal(gx, gx_ref)
        assert torch.equal(torch.autograd.grad(gx.sum(), x)[0], torch.autograd.grad(gx_ref.sum(), x)[0])
    mask = torch.rand(b, s, generator=g) > 0.5
    assert torch.equal(permute(mask, perm), permute_ref(mask, perm))
    with torch.no_grad():
        assert torch.equal(permute(base, perm), permute_ref(base, perm))


def test_cross4_orders():
    h, w = 3, 4
    rows, cols, rrows, rcols = scan_permutations("cross4", (h, w))
    assert rows.tolist() == list(range(12))
    assert cols.tolist() == [r * w + c for c in range(w) for r in range(h)]  # column by column
    assert rrows.tolist() == rows.flip(0).tolist() and rcols.tolist() == cols.flip(0).tolist()
    assert len({tuple(p.tolist()) for p in (rows, cols, rrows, rcols)}) == 4
    with pytest.raises(ValueError, match="scan order must be one of"):
        scan_permutations("zigzag", (2, 2))


def test_per_sample_permutation_and_multidirection():
    torch.manual_seed(0)
    p = torch.stack([torch.randperm(6), torch.randperm(6)])  # [B, S]
    x = torch.randn(2, 6, 3)
    px = permute(x, p)
    for i in range(2):
        assert torch.equal(px[i], x[i, p[i]])
    assert torch.equal(permute(px, inverse(p)), x)

    class Tag(torch.nn.Module):  # position-dependent mixer: out_t = x_t * (t + 1)
        def forward(self, x, mask=None):
            return x * torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)

    md = MultiDirection(Tag, 2)
    perms = scan_permutations("bidirectional", (2, 3))
    out = md(x, perms)
    weight = torch.arange(1, 7.0) + torch.arange(6, 0, -1.0)  # raster rank + reversed rank, 1-based
    torch.testing.assert_close(out, x * weight.view(1, -1, 1))
