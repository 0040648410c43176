"""Scalar math for the numba kernels: a vectorisable ``exp2`` and dtype-preserving constants.

numba has no vectorised ``math.exp`` without Intel's SVML (not installed by the numba wheels):
a scalar libm call per element would cost 10x the rest of a selective-scan step. :func:`exp2`
is written out instead (range reduction, polynomial, exponent bit arithmetic) so that LLVM
vectorises it with the loop around it. Importing this module imports numba.
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


def _exp2_impl(ftype, itype, mantissa: int, bias: int, lo: float, hi: float, degree: int):
    """``2 ** x``: k = round(x) by the magic-number trick (adding 1.5 * 2^mantissa leaves k in
    the low bits of the sum, so the exponent needs no float-to-int conversion), f = x - k in
    [-1/2, 1/2] exactly, 2^f by its Taylor series in f ln 2, and 2^k as two factors 2^(k//2) and
    2^(k - k//2) so that results down to the smallest subnormal are right. Bit casts are always
    defined, so NaN stays NaN without a clamp; out-of-range x is settled by the two selects."""
    magic = ftype(1.5 * 2.0 ** mantissa)
    magic_bits = itype(np.array(magic).view(np.dtype(f"i{np.dtype(ftype).itemsize}")))
    ln2, flo, fhi = ftype(np.log(2.0)), ftype(lo), ftype(hi)
    zero, inf = ftype(0.0), ftype(np.inf)
    ibias, shift, one = itype(bias), itype(mantissa), itype(1)
    coef = tuple(ftype(1.0 / np.prod(np.arange(1, i + 1, dtype=np.float64))) for i in range(degree + 1))
    to_bits, from_bits = (_f32_bits, _bits_f32) if ftype is np.float32 else (_f64_bits, _bits_f64)

    def impl(x):
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


_EXP2 = {types.float32: _exp2_impl(np.float32, np.int32, 23, 127, -150.0, 128.0, 7),
         types.float64: _exp2_impl(np.float64, np.int64, 52, 1023, -1075.0, 1024.0, 13)}


def exp2(x):
    """``2 ** x`` for a float32 or float64 scalar inside numba code (vectorisable); relative
    error at most 1 machine epsilon measured (2 asserted by the tests), 0 below the smallest
    subnormal, inf above the largest float, NaN for NaN."""
    raise NotImplementedError("exp2 is only callable from numba-compiled code")


@overload(exp2)
def _exp2_ol(x):
    return _EXP2.get(x)


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
