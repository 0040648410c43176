"""The Student-t distribution of ablate.stats (plain Python, so that `ablate table` needs no
scipy) against scipy's, and the interval functions built on it.

Tolerance: 1e-10 relative. Ours is accurate to about 1e-14 (a few ulps) up to a thousand
degrees of freedom and 1e-13 at ten thousand (its continued fraction loses about log10(df)
digits there); scipy's own quantile is off by up to 1e-15 at p = 0.975 and far more next to
p = 1/2 (4e-4 relative at df = 4, p = 0.5000001), so the quantile near 1/2 is held to its
definition instead (the CDF at it gives p back)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import scipy.special as sc
import scipy.stats as st

from ablate import stats

DFS = [*range(1, 31), 35, 49.5, 64, 100, 257, 999, 1000, 2500, 5000, 9999, 10_000,
       # Welch-Satterthwaite degrees of freedom are not integers
       1.0001, 1.37, 2.5, 3.999, 7.25, 12.631, 29.99, 30.01, 61.7, 333.3, 1234.5]
PS = [0.975, 0.025, 0.95, 0.99, 0.995, 0.999, 0.9999, 1 - 1e-8, 1e-8, 1e-12, 0.9, 0.75, 0.6, 0.25, 0.1]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a)


@pytest.mark.parametrize("df", DFS)
def test_quantile_matches_scipy(df):
    for p in PS:
        assert _rel(stats.t_ppf(p, df), sc.stdtrit(df, p)) < 1e-10, (df, p)
    assert stats.t_ppf(0.975, df) == -stats.t_ppf(1 - 0.975, df)  # symmetric, to the bit


@pytest.mark.parametrize("df", DFS)
def test_cdf_and_tail_match_scipy(df):
    for t in [0.0, 0.01, 0.3, 1.0, 1.96, 2.5, 4.0, 10.0, 100.0, 1e4, -0.5, -2.0, -30.0]:
        assert _rel(stats.t_cdf(t, df), sc.stdtr(df, t)) < 1e-10, (df, t)
        assert _rel(stats.t_sf(t, df), sc.stdtr(df, -t)) < 1e-10, (df, t)
        assert stats.t_cdf(t, df) + stats.t_sf(t, df) == pytest.approx(1.0, abs=1e-15)


def test_cdf_against_closed_forms():
    """df = 1 (Cauchy) and 2 have closed forms; next to t = 0 they are the reference (scipy's
    CDF there is 1/2 to 6e-10). Far in the tail the error grows as |ln tail| ulps (the tail is
    the exponential of a sum of logs)."""
    for t in [1e-12, 1e-9, 1e-4, 0.5, 3.0, 1e3, 1e8, 1e100]:
        assert _rel(stats.t_sf(t, 1), math.atan2(1.0, t) / math.pi) < 1e-13, t
        assert _rel(stats.t_sf(t, 2), 0.5 - t / (2 * math.sqrt(2 + t * t)) if t < 1 else
                    1 / (math.sqrt(2 + t * t) * (math.sqrt(2 + t * t) + t))) < 1e-13, t


def test_quantile_inverts_the_cdf_everywhere():
    """The quantile is what the CDF inverts to, next to p = 1/2 too (there scipy's own quantile
    is inexact, so scipy is no reference), and for random df and p."""
    g = random.Random(0)
    cases = [(df, p) for df in (1, 2, 3, 4, 7.3, 30, 1000) for p in (0.5 + 1e-7, 0.5 - 1e-7, 0.5 + 1e-12, 0.51)]
    cases += [(g.uniform(1, 200), g.random()) for _ in range(300)]
    for df, p in cases:
        t = stats.t_ppf(p, df)
        assert _rel(stats.t_cdf(t, df), p) < 1e-13, (df, p)
        if abs(p - 0.5) > 1e-3:
            assert _rel(t, sc.stdtrit(df, p)) < 1e-10, (df, p)


def test_quantile_edges():
    assert stats.t_ppf(0.5, 7) == 0.0 and stats.t_ppf(1.0, 3) == math.inf and stats.t_ppf(0.0, 3) == -math.inf
    for bad in [(0.975, 0), (0.975, -1), (0.975, math.nan), (math.nan, 3), (1.5, 3)]:
        assert math.isnan(stats.t_ppf(*bad))
    assert stats.t_ppf(0.975, math.inf) == pytest.approx(1.959963984540054, rel=1e-14)  # the normal's
    assert stats.t_ppf(0.975, 0.5) == pytest.approx(sc.stdtrit(0.5, 0.975), rel=1e-10)  # df < 1 too
    p = 1 - 1e-10  # (its tail, 1 - p, is exact)
    assert stats.t_ppf(p, 1) == pytest.approx(1 / math.tan(math.pi * (1 - p)), rel=1e-14)  # Cauchy's tail
    assert stats.t_ppf(p, 1.0000001) == pytest.approx(sc.stdtrit(1.0000001, p), rel=1e-12)  # and beside it


def test_array_functions_apply_the_scalar_ones():
    df = np.array([1.0, 2.0, 9.0, 0.0, np.nan])
    q = stats.t_quantile(0.975, df)
    assert [float(v) for v in q[:3]] == [stats.t_ppf(0.975, d) for d in df[:3]] and np.isnan(q[3:]).all()
    std, n = np.array([0.1, 2.0, 0.3, 1.0]), np.array([3, 10, 1, 0])
    h = stats.t_halfwidth(std, n)
    assert list(h[:2]) == [stats.halfwidth(s, k) for s, k in zip(std[:2], n[:2])] and np.isnan(h[2:]).all()
    assert float(h[0]) == pytest.approx(st.t.ppf(0.975, 2) * 0.1 / math.sqrt(3), rel=1e-12)


def test_welch_matches_scipy_ttest():
    g = np.random.default_rng(1)
    for _ in range(50):
        a, b = g.normal(0, g.uniform(0.1, 3), g.integers(2, 12)), g.normal(0.5, g.uniform(0.1, 3), g.integers(2, 12))
        diff, low, high, df = stats.welch(a.mean(), a.std(ddof=1), len(a), b.mean(), b.std(ddof=1), len(b))
        res = st.ttest_ind(a, b, equal_var=False)
        ci = res.confidence_interval(0.95)
        assert df == pytest.approx(res.df, rel=1e-12)
        assert low == pytest.approx(ci.low, rel=1e-10, abs=1e-12)
        assert high == pytest.approx(ci.high, rel=1e-10, abs=1e-12)


def test_welch_side_is_welch_verdict():
    """welch_side settles most differences by the quantiles at the integers around the degrees
    of freedom; its verdict is the interval's, also right at the interval's edge."""
    g = random.Random(2)
    checked = 0
    for _ in range(3000):
        n1, n2 = g.randint(1, 12), g.randint(1, 12)
        s1, s2 = g.choice([0.0, g.uniform(0.01, 2)]), g.choice([0.0, g.uniform(0.01, 2)])
        m1, m2 = g.uniform(-2, 2), g.uniform(-2, 2)
        _, low, high, df = stats.welch(m1, s1, n1, m2, s2, n2)
        if g.random() < 0.3 and not math.isnan(low):  # move mean1 to just inside or outside the edge
            h = (high - low) / 2
            m1 = m2 + h * (1 + g.choice([-1, 1]) * 10 ** -g.randint(3, 9))
            _, low, high, _ = stats.welch(m1, s1, n1, m2, s2, n2)
        want = 1 if low > 0 else -1 if high < 0 else 0
        assert stats.welch_side(m1, s1, n1, m2, s2, n2) == want, (m1, s1, n1, m2, s2, n2)
        checked += want != 0
    assert checked > 500


def test_no_interval_without_spread_or_with_one_run():
    assert all(math.isnan(v) for v in stats.welch(1.0, 0.0, 3, 0.5, 0.0, 3)[1:])
    assert all(math.isnan(v) for v in stats.welch(1.0, 0.2, 1, 0.5, 0.1, 3)[1:])
    assert stats.welch_side(1.0, 0.0, 3, 0.5, 0.0, 3) == 0 and stats.welch_side(9.0, 0.2, 1, 0.5, 0.1, 3) == 0
    assert math.isnan(stats.halfwidth(0.3, 1)) and math.isnan(stats.halfwidth(math.nan, 4))
