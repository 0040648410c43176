"""Small-sample statistics for the results table: Student-t intervals of a mean and Welch's
interval of a difference of two means, at 95% by default.

The Student-t distribution is computed here in plain Python, so that ``ablate table`` imports
neither numpy nor scipy (``ablate bench table`` times it): the tail through the regularised
incomplete beta function (a continued fraction), the quantile by safeguarded Newton steps on the
tail. Both agree with ``scipy.special.stdtr`` / ``stdtrit`` to about 1e-14 (tests/test_stats.py).

The scalar functions (:func:`t_sf`, :func:`t_cdf`, :func:`t_ppf`, :func:`halfwidth`,
:func:`welch`) take and return floats; the array functions (:func:`t_quantile`,
:func:`t_halfwidth`, :func:`welch_interval`, :func:`significant`) take scalars or numpy arrays
(broadcast together) and apply the scalar ones elementwise, so both give the same bits. Summary
figures are mean, sample std (ddof=1) and n, as the table holds them. Where an interval cannot be
computed (n < 2 on either side) it is NaN, and a NaN interval is never significant: one run
proves nothing.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

__all__ = ["halfwidth", "rank_agreement", "significant", "t_cdf", "t_halfwidth", "t_ppf", "t_quantile", "t_sf",
           "welch", "welch_interval", "welch_side"]

_EPS = 1e-16  # the continued fraction stops when a step changes it by less
_TINY = 1e-300
_SQRT_PI = math.sqrt(math.pi)


def _log_beta_half(a: float) -> float:
    """``ln B(a, 1/2)``. Where lgamma's own values are large (a >= 30) their difference would
    lose digits, so ``ln Γ(a+1/2) - ln Γ(a)`` comes from its asymptotic series (error < 1e-18)."""
    if a < 30:
        return math.log(math.gamma(a) / math.gamma(a + 0.5) * _SQRT_PI)
    z2 = 1.0 / (a * a)
    series = (-1 / 8 + z2 * (1 / 192 + z2 * (-1 / 640 + z2 * (17 / 14336 - z2 * 31 / 18432)))) / a
    return 0.5 * math.log(math.pi / a) - series


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (modified Lentz), fast for x < (a+1)/(a+b+2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        c = 1.0 + aa / c
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        h *= d * (c if abs(c) > _TINY else _TINY)
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        c = 1.0 + aa / c
        if abs(c) < _TINY:
            c = _TINY
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        step = d * c
        h *= step
        if abs(step - 1.0) < _EPS:
            break
    return h


def _t_halves(t: float, df: float) -> tuple[float, float]:
    """``(P(T > t), P(0 < T <= t))`` for t >= 0: the one of the two that the continued fraction
    gives directly keeps its relative digits, the other is 1/2 minus it."""
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2.0)), 0.5 * math.erf(t / math.sqrt(2.0))
    if math.isinf(t):
        return 0.0, 0.5
    if t == 0.0:
        return 0.5, 0.0
    # P(T > t) = I_x(df/2, 1/2) / 2 with x = df / (df + t^2) = 1 / (1 + r), and y = 1 - x
    r = t * t / df
    x = 1.0 / (1.0 + r)
    y = r / (1.0 + r) if r < 1.0 else 1.0 / (1.0 + 1.0 / r)
    a = 0.5 * df
    log1p_r = math.log1p(r) if r < 1e300 else 2.0 * math.log(t) - math.log(df)
    # x^a y^(1/2) / B(a, 1/2) in logs (ln x = -log1p(r) keeps its digits where r is small)
    front = math.exp(-a * log1p_r + 0.5 * math.log(y) - _log_beta_half(a))
    if x < (a + 1.0) / (a + 2.5):
        tail = 0.5 * front * _beta_cf(a, 0.5, x) / a
        return tail, 0.5 - tail
    center = front * _beta_cf(0.5, a, y)  # I_y(1/2, a) / 2
    return 0.5 - center, center


def t_sf(t: float, df: float) -> float:
    """``P(T > t)`` for Student's t with ``df`` degrees of freedom (df = inf: the normal
    distribution; NaN where df <= 0 or either is NaN)."""
    t, df = float(t), float(df)
    if math.isnan(t) or math.isnan(df) or df <= 0:
        return math.nan
    if t < 0:
        return 0.5 + _t_halves(-t, df)[1]
    return _t_halves(t, df)[0]


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom (``scipy.special.stdtr``)."""
    return t_sf(-float(t), df)


def _t_pdf(t: float, df: float) -> float:
    if math.isinf(df):
        return math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    return math.exp(-0.5 * (df + 1.0) * math.log1p(t * t / df) - _log_beta_half(0.5 * df)) / math.sqrt(df)


def _normal_upper(q: float) -> float:
    """The normal upper-tail ``q`` quantile, q <= 1/2, to ~1e-7: Abramowitz & Stegun 26.2.23
    (error < 4.5e-4) and one Newton step."""
    w = math.sqrt(-2.0 * math.log(q))
    z = w - (2.515517 + w * (0.802853 + w * 0.010328)) / (1.0 + w * (1.432788 + w * (0.189269 + w * 0.001308)))
    return z + (0.5 * math.erfc(z / math.sqrt(2.0)) - q) * math.sqrt(2.0 * math.pi) * math.exp(0.5 * z * z)


def _hill(q: float, df: float) -> float:
    """Hill's approximation of the t upper-tail ``q`` quantile (Comm. ACM 13(10), 1970,
    algorithm 396, as in R's ``qt``): the start of the Halley steps in :func:`t_ppf`."""
    p2 = 2.0 * q  # the two-sided tail
    a = 1.0 / (df - 0.5)
    b = 48.0 / (a * a)
    c = ((20700.0 * a / b - 98.0) * a - 16.0) * a + 96.36
    d = ((94.5 / (b + c) - 3.0) / b + 1.0) * math.sqrt(a * math.pi / 2) * df
    y = (d * p2) ** (2.0 / df)
    if (df < 2.1 and p2 > 0.5) or y > 0.05 + a:
        x = -_normal_upper(q)
        y = x * x
        if df < 5:
            c += 0.3 * (df - 4.5) * (x + 0.6)
        c = (((0.05 * d * x - 5.0) * x - 7.0) * x - 2.0) * x + b + c
        y = (((((0.4 * y + 6.3) * y + 36.0) * y + 94.5) / c - y - 3.0) / b + 1.0) * x
        y = math.expm1(a * y * y)
    elif y > 0:
        y = ((1.0 / (((df + 6.0) / (df * y) - 0.089 * d - 0.822) * (df + 2.0) * 3.0) + 0.5 / (df + 4.0)) * y
             - 1.0) * (df + 1.0) / (df + 2.0) + 1.0 / y
    else:
        return math.inf
    return math.sqrt(df * y)


@lru_cache(maxsize=4096)
def t_ppf(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``scipy.special.stdtrit``;
    NaN where df <= 0 or either is NaN; +-inf at p = 1 and 0)."""
    p, df = float(p), float(df)
    if math.isnan(p) or math.isnan(df) or df <= 0 or not 0.0 <= p <= 1.0:
        return math.nan
    if p < 0.5:
        return -_t_upper(p, 0.5 - p, df)
    return _t_upper(1.0 - p, p - 0.5, df)  # (both exact for p in [1/2, 1])


def _t_upper(q: float, c: float, df: float) -> float:
    """The t > 0 with ``P(T > t) = q`` and ``P(0 < T <= t) = c`` (q + c = 1/2, both given exactly):
    Halley steps from Hill's start, on the tail where q is small, on the centre where q is near
    1/2 (there the tail, 1/2 minus the centre, would have lost t's digits)."""
    if q == 0.0:
        return math.inf
    if c == 0.0:
        return 0.0
    if df == 1.0:  # Cauchy
        return 1.0 / math.tan(math.pi * q) if q < 0.25 else math.tan(math.pi * c)
    by_center = q > 0.25
    if math.isinf(df):
        t = _normal_upper(q)
    elif df >= 1.0:
        t = _hill(q, df)
    else:  # the tail's power law, P(T > t) ~ df^(df/2 - 1) t^(-df) / B(df/2, 1/2)
        t = math.exp(((0.5 * df - 1.0) * math.log(df) - _log_beta_half(0.5 * df) - math.log(q)) / df)
    if not 0.0 < t < math.inf:
        t = 1.0
    lo, hi = 0.0, math.inf  # the root stays bracketed: the tail falls, the centre grows, with t
    for _ in range(100):
        tail, center = _t_halves(t, df)
        f = center - c if by_center else q - tail  # rises with t
        if f == 0.0:
            return t
        if f < 0:
            lo = t
        else:
            hi = t
        newton = f / _t_pdf(t, df)
        # Halley: f''/f' = pdf'/pdf = -t (df + 1) / (df + t^2)
        curvature = t if math.isinf(df) else t * (df + 1.0) / (df + t * t)
        step = newton / (1.0 + 0.5 * newton * curvature)
        new = t - step
        if abs(step) <= 1e-7 * new:  # a Halley step this small leaves an error ~ its cube
            return min(max(new, lo), hi)
        if not lo < new < hi:  # the step left the bracket: bisect it (or grow it while unbounded)
            new = 0.5 * (lo + hi) if hi < math.inf else 4.0 * t
        t = new
    return t


def halfwidth(std: float, n: float, level: float = 0.95) -> float:
    """Half-width of the ``level`` Student-t interval of a mean: ``t_{(1+level)/2, n-1} * std /
    sqrt(n)``; NaN where n < 2 (a single run has no interval). ``std`` is the sample std (ddof=1)."""
    if not n >= 2:
        return math.nan
    return t_ppf((1 + level) / 2, n - 1) * std / math.sqrt(n)


def _div(a: float, b: float) -> float:
    """``a / b`` as IEEE arithmetic (and numpy) has it: +-inf or NaN where b is 0."""
    if b:
        return a / b
    return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)


def welch(mean1: float, std1: float, n1: float, mean2: float, std2: float, n2: float,
          level: float = 0.95) -> tuple[float, float, float, float]:
    """``(diff, low, high, df)``: ``diff = mean1 - mean2`` and its ``level`` Welch interval, with
    the Welch-Satterthwaite degrees of freedom (what ``scipy.stats.ttest_ind(a, b,
    equal_var=False).confidence_interval()`` gives for the raw samples).

    The interval is NaN where either side has n < 2, and where both stds are 0: a few runs that
    happened to agree exactly (a metric read off a few hundred images moves in steps) show no
    spread, not no noise, so nothing can be claimed from them.
    """
    diff = mean1 - mean2
    if not (n1 >= 2 and n2 >= 2):
        return diff, math.nan, math.nan, math.nan
    v1, v2 = std1 * std1 / n1, std2 * std2 / n2
    se = math.sqrt(v1 + v2) if v1 + v2 >= 0 else math.nan
    if not (math.isfinite(se) and se > 0):
        return diff, math.nan, math.nan, math.nan
    df = _div((v1 + v2) * (v1 + v2), v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    h = t_ppf((1 + level) / 2, df) * se
    return diff, diff - h, diff + h, df


def welch_side(mean1: float, std1: float, n1: float, mean2: float, std2: float, n2: float,
               level: float = 0.95) -> int:
    """Which side of 0 the :func:`welch` interval of ``mean1 - mean2`` lies on: 1 above
    (``low > 0``), -1 below (``high < 0``), 0 where it holds 0 or there is none. The same
    verdict as :func:`welch`'s interval, mostly without its quantile: t falls as the degrees of
    freedom grow, so the quantiles at the integers around them (cached) bound it, and settle
    every difference but those within the bounds' gap of the edge."""
    diff = mean1 - mean2
    if not (n1 >= 2 and n2 >= 2):
        return 0
    v1, v2 = std1 * std1 / n1, std2 * std2 / n2
    se = math.sqrt(v1 + v2) if v1 + v2 >= 0 else math.nan
    if not (math.isfinite(se) and se > 0):
        return 0
    df = _div((v1 + v2) * (v1 + v2), v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    p = (1 + level) / 2
    if 1.0 <= df < 1e15:
        t_low, t_high = t_ppf(p, float(math.ceil(df))), t_ppf(p, float(math.floor(df)))  # t_low <= t <= t_high
        if diff - t_high * se > 0:
            return 1
        if diff + t_high * se < 0:
            return -1
        if diff - t_low * se <= 0 <= diff + t_low * se:
            return 0
    _, low, high, _ = welch(mean1, std1, n1, mean2, std2, n2, level)
    return 1 if low > 0 else -1 if high < 0 else 0


# -- the same on numpy arrays --------------------------------------------------------------------

def _elementwise(fn: Any, outputs: int, *args: Any) -> Any:
    import numpy as np

    return np.vectorize(fn, otypes=[float] * outputs)(*(np.asarray(a, dtype=float) for a in args))


def t_quantile(p: Any, df: Any) -> Any:
    """:func:`t_ppf` of arrays: the ``p`` quantile of Student's t with ``df`` degrees of freedom
    (NaN where df <= 0 or NaN)."""
    return _elementwise(t_ppf, 1, p, df)


def t_halfwidth(std: Any, n: Any, level: float = 0.95) -> Any:
    """:func:`halfwidth` of arrays: half-width of the ``level`` Student-t interval of a mean;
    NaN where n < 2."""
    return _elementwise(lambda s, k: halfwidth(s, k, level), 1, std, n)


def welch_interval(mean1: Any, std1: Any, n1: Any, mean2: Any, std2: Any, n2: Any,
                   level: float = 0.95) -> tuple[Any, Any, Any, Any]:
    """:func:`welch` of arrays: ``(diff, low, high, df)``, NaN intervals where either side has
    n < 2 or both stds are 0."""
    return _elementwise(lambda *a: welch(*a, level=level), 4, mean1, std1, n1, mean2, std2, n2)


def significant(low: Any, high: Any) -> Any:
    """True where the interval ``[low, high]`` excludes 0 (False where it is NaN)."""
    import numpy as np

    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    with np.errstate(invalid="ignore"):
        return (low > 0) | (high < 0)


def rank_agreement(a: Any, b: Any, resamples: int = 10000, level: float = 0.95,
                   seed: int = 0) -> dict[str, float]:
    """Does metric ``a`` rank configurations like metric ``b``? Spearman's rho of two equally
    long arrays of per-configuration values (n >= 3, NaN-free), with a one-sided permutation
    p-value (``p``: the share of ``resamples`` random pairings whose rho is at least the
    observed one, counted with the observed pairing) and a percentile bootstrap ``level``
    interval over configurations (``low``, ``high``). Ties get average ranks. Flip the sign of
    a metric where lower is better before comparing it with one where higher is."""
    import numpy as np
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 3 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"rank_agreement: need two finite 1-d arrays of the same length >= 3, got {a.shape} "
                         f"and {b.shape}")

    def rho(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # rows of x and y: samples
        rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
        rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (rx * ry).sum(-1) / np.sqrt((rx ** 2).sum(-1) * (ry ** 2).sum(-1))

    g = np.random.default_rng(seed)
    observed = float(rho(a, b))
    perms = np.argsort(g.random((resamples, len(a))), axis=1)
    p = (1 + np.sum(rho(np.broadcast_to(a, perms.shape), b[perms]) >= observed - 1e-12)) / (resamples + 1)
    idx = g.integers(0, len(a), (resamples, len(a)))
    boot = rho(a[idx], b[idx])
    boot = boot[np.isfinite(boot)]  # resamples that drew one configuration only have no ranking
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]) if len(boot) else (np.nan, np.nan)
    return {"rho": observed, "p": float(p), "low": float(low), "high": float(high), "n": float(len(a))}
