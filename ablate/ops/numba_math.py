"""Scalar math for the numba kernels: vectorisable ``exp2``, ``exp``, ``softplus`` (and its
derivative), a vectorising ``dot`` and dtype-preserving constants.

numba has no vectorised ``math.exp`` or ``math.log1p`` without Intel's SVML (not installed by
the numba wheels): a scalar libm call per element would cost 10x the rest of a selective-scan
step. They are written out instead (range reduction, polynomial, exponent bit arithmetic, selects
rather than branches) so that LLVM vectorises them with the loop around it. Importing this module
imports numba.

numba's on-disk cache of a kernel does not notice a change here: after editing this module,
touch (or clear the ``__pycache__`` of) the modules whose kernels call it.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import literal_unroll, njit, types
from numba.extending import intrinsic, overload


def _bitcast(src, dst):
    """An intrinsic reinterpreting the bits of a ``src`` scalar as a ``dst`` scalar."""
    llvm = {types.float32: ir.FloatType(), types.float64: ir.DoubleType(),
            types.int32: ir.IntType(32), types.int64: ir.IntType(64)}

    @intrinsic
    def cast(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm[dst])
        return dst(src), codegen
    return cast


_f32_bits, _bits_f32 = _bitcast(types.float32, types.int32), _bitcast(types.int32, types.float32)
_f64_bits, _bits_f64 = _bitcast(types.float64, types.int64), _bitcast(types.int64, types.float64)


def _ln2_split(ftype, mantissa: int) -> tuple[float, float]:
    """ln 2 as ``hi + lo``: ``hi`` with its low bits zero (k * hi is exact for the |k| of any
    finite exp), ``lo`` the rest of ln 2 to well beyond the float's precision (from decimal)."""
    import decimal
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        ln2 = decimal.Decimal(2).ln()
        bits = mantissa + 1 - 12  # 12 free bits: |k| <= 1100 < 2^11
        hi = float(int(ln2 * 2 ** bits)) / 2 ** bits  # truncated: exact in ftype
        return ftype(hi), ftype(float(ln2 - decimal.Decimal(hi)))


def _exp_impl(ftype, itype, mantissa: int, bias: int, lo: float, hi: float, degree: int, natural: bool):
    """``2 ** x`` (``natural`` False) or ``e ** x`` (True): k = round(x) (of x log2 e for e^x) by
    the magic-number trick (adding 1.5 * 2^mantissa leaves k in the low bits of the sum, so the
    exponent needs no float-to-int conversion); the remainder r in [-ln2/2, ln2/2], for 2^x
    r = (x - k) ln 2 (x - k is exact), for e^x r = x - k ln 2 with ln 2 in two parts (Cody and
    Waite: k * hi is exact, so r is accurate even where |x| is large); e^r by its Taylor series;
    2^k as two factors 2^(k//2) and 2^(k - k//2) so that results down to the smallest subnormal
    are right. Bit casts are always defined, so NaN stays NaN without a clamp; out-of-range x is
    settled by the two selects (``lo``/``hi`` in units of log2 of the result)."""
    magic = ftype(1.5 * 2.0 ** mantissa)
    magic_bits = itype(np.array(magic).view(np.dtype(f"i{np.dtype(ftype).itemsize}")))
    ln2, log2e = ftype(np.log(2.0)), ftype(1.4426950408889634)
    ln2_hi, ln2_lo = _ln2_split(ftype, mantissa)
    scale = np.log(2.0) if natural else 1.0
    flo, fhi = ftype(lo * scale), ftype(hi * scale)
    zero, inf = ftype(0.0), ftype(np.inf)
    ibias, shift, one = itype(bias), itype(mantissa), itype(1)
    coef = tuple(ftype(1.0 / np.prod(np.arange(1, i + 1, dtype=np.float64))) for i in range(degree + 1))
    to_bits, from_bits = (_f32_bits, _bits_f32) if ftype is np.float32 else (_f64_bits, _bits_f64)

    def impl(x):
        if natural:
            t = x * log2e + magic
            kf = t - magic
            r = (x - kf * ln2_hi) - kf * ln2_lo
        else:
            t = x + magic
            r = (x - (t - magic)) * ln2
        p = coef[degree]
        for c in literal_unroll(coef[-2::-1]):
            p = c + r * p
        k = to_bits(t) - magic_bits
        k1 = k >> one
        s = p * from_bits((k1 + ibias) << shift) * from_bits((k - k1 + ibias) << shift)
        s = zero if x < flo else s
        return inf if x >= fhi else s
    return impl


_F32 = (np.float32, np.int32, 23, 127, -150.0, 128.0, 7)
_F64 = (np.float64, np.int64, 52, 1023, -1075.0, 1024.0, 13)
_EXP2 = {types.float32: _exp_impl(*_F32, natural=False), types.float64: _exp_impl(*_F64, natural=False)}
_EXP = {types.float32: _exp_impl(*_F32, natural=True), types.float64: _exp_impl(*_F64, natural=True)}


def exp2(x):
    """``2 ** x`` for a float32 or float64 scalar inside numba code (vectorisable); relative
    error at most 1 machine epsilon measured (2 asserted by the tests), 0 below the smallest
    subnormal, inf above the largest float, NaN for NaN."""
    raise NotImplementedError("exp2 is only callable from numba-compiled code")


@overload(exp2)
def _exp2_ol(x):
    return _EXP2.get(x)


def exp(x):
    """``e ** x`` as :func:`exp2` does ``2 ** x`` (same polynomial and limits), with the argument
    reduced in extended precision: exp2(x log2 e) would carry the rounding of x log2 e, an error
    of |x| / 2 ulp, into the result."""
    raise NotImplementedError("exp is only callable from numba-compiled code")


@overload(exp)
def _exp_ol(x):
    return _EXP.get(x)


def _log1p_unit_impl(ftype, terms: int):
    """``log(1 + t)`` for t in [0, 1] (what softplus needs, t = e^-|x|): t >= 1/2 is written
    1 + t = 2 (1 + f) with f = (t - 1) / 2 in [-1/4, 0] (exact), else f = t in [0, 1/2); then
    log(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)), s = f / (2 + f), R the series of 2 atanh(s) - 2s
    (the rounding of s only reaches the small term, so the result is within about 1 ulp), plus
    k ln 2 in two parts (k = 1 in the first case)."""
    half, one, two = ftype(0.5), ftype(1.0), ftype(2.0)
    ln2_hi, ln2_lo = _ln2_split(ftype, {np.float32: 23, np.float64: 52}[ftype])
    coef = tuple(ftype(2.0 / (2 * i + 1)) for i in range(1, terms + 1))  # R(w) = w (c1 + w (c2 ...

    def impl(t):
        big = t >= half
        f = (t - one) * half if big else t
        k = one if big else ftype(0.0)
        s = f / (two + f)
        w = s * s
        r = coef[terms - 1]
        for c in literal_unroll(coef[-2::-1]):
            r = c + w * r
        r = r * w
        hf = half * f * f
        return k * ln2_hi - ((hf - (s * (hf + r) + k * ln2_lo)) - f)
    return impl


_LOG1P_UNIT = {types.float32: _log1p_unit_impl(np.float32, 5), types.float64: _log1p_unit_impl(np.float64, 11)}
SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus's default (beta = 1)


def _log1p_unit(t):
    raise NotImplementedError("_log1p_unit is only callable from numba-compiled code")


@overload(_log1p_unit)
def _log1p_unit_ol(t):
    return _LOG1P_UNIT.get(t)


# The compositions below call the other functions through their overloads, never through
# njit dispatchers: a dispatcher call is compiled apart and linked after optimisation, so LLVM
# could neither inline it nor vectorise the loop around it (measured 9x slower).


def _softplus_impl(ftype):
    """``log(1 + e^x) = max(x, 0) + log1p(e^-|x|)`` (no overflow, no cancellation), and x itself
    above torch's threshold 20 (``F.softplus``'s default: there they differ by < e^-20 x)."""
    zero, threshold = ftype(0.0), ftype(SOFTPLUS_THRESHOLD)

    def impl(x):
        y = _log1p_unit(exp(-abs(x)))
        y = x + y if x > zero else y
        return x if x > threshold else y
    return impl


def _softplus_grad_impl(ftype):
    """``d softplus / dx = sigmoid(x) = 1 / (1 + e^-x)``, and 1 above the threshold (as torch's
    softplus backward); e^-|x| keeps the quotient finite at both ends."""
    zero, one, threshold = ftype(0.0), ftype(1.0), ftype(SOFTPLUS_THRESHOLD)

    def impl(x):
        e = exp(-abs(x))
        g = (one if x > zero else e) / (one + e)
        return one if x > threshold else g
    return impl


def softplus(x):
    """``log(1 + e^x)`` for a float32 or float64 scalar inside numba code (vectorisable), with
    torch's threshold (x above 20 gives x); error at most 2 ulp against log1p(exp(x)) measured
    in both precisions (asserted by the tests), 0 below the smallest subnormal result."""
    raise NotImplementedError("softplus is only callable from numba-compiled code")


def softplus_grad(x):
    """The derivative of :func:`softplus`: sigmoid(x), 1 above the threshold (numba code only)."""
    raise NotImplementedError("softplus_grad is only callable from numba-compiled code")


_SOFTPLUS = {t: _softplus_impl(f) for t, f in ((types.float32, np.float32), (types.float64, np.float64))}
_SOFTPLUS_GRAD = {t: _softplus_grad_impl(f) for t, f in ((types.float32, np.float32), (types.float64, np.float64))}


@overload(softplus)
def _softplus_ol(x):
    return _SOFTPLUS.get(x)


@overload(softplus_grad)
def _softplus_grad_ol(x):
    return _SOFTPLUS_GRAD.get(x)


def const(like, v):
    """``v`` as a scalar of ``like``'s dtype inside numba code (Python literals are float64,
    and float32 * float64 would silently promote a float32 kernel)."""
    raise NotImplementedError("const is only callable from numba-compiled code")


@overload(const)
def _const_ol(like, v):
    dt = like.dtype if isinstance(like, types.Array) else like
    if dt == types.float32:
        return lambda like, v: np.float32(v)
    return lambda like, v: np.float64(v)


@njit(fastmath={"reassoc", "contract"}, cache=True)
def dot(a, b, n):
    """``sum_j a[j] * b[j]`` over j < n, reassociated so that it vectorises (the kernels' dot
    products; a sequential sum is a chain of dependent adds and runs latency-bound)."""
    s = const(a, 0.0)
    for j in range(n):
        s += a[j] * b[j]
    return s


@njit(cache=True)
def exp2_array(x):
    """Elementwise :func:`exp2` of a 1-D array (for tests of the polynomial)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = exp2(x[i])
    return out


@njit(cache=True)
def softplus_array(x, grad):
    """Elementwise :func:`softplus` (``grad``: :func:`softplus_grad`) of a 1-D array (for tests)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = softplus_grad(x[i]) if grad else softplus(x[i])
    return out
