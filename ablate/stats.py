"""Small-sample statistics for the results table: Student-t intervals of a mean and Welch's
interval of a difference of two means, at 95% by default.

Every function takes scalars or numpy arrays (broadcast together) of summary figures: mean,
sample std (ddof=1) and n, as the table holds them. Where an interval cannot be computed
(n < 2 on either side) it is NaN, and a NaN interval is never significant: one run proves nothing.

The t quantile is ``scipy.special.stdtrit``, the function ``scipy.stats.t.ppf`` itself calls;
importing it costs a fraction of ``scipy.stats`` (``ablate table`` is timed by ``ablate bench table``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["rank_agreement", "significant", "t_halfwidth", "t_quantile", "welch_interval"]


def t_quantile(p: Any, df: Any) -> np.ndarray:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (NaN where df <= 0 or NaN)."""
    from scipy.special import stdtrit

    df = np.asarray(df, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.where(df > 0, stdtrit(np.where(df > 0, df, 1.0), p), np.nan)


def t_halfwidth(std: Any, n: Any, level: float = 0.95) -> np.ndarray:
    """Half-width of the ``level`` Student-t interval of a mean: ``t_{(1+level)/2, n-1} * std /
    sqrt(n)``; NaN where n < 2 (a single run has no interval). ``std`` is the sample std (ddof=1)."""
    std, n = np.asarray(std, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = t_quantile((1 + level) / 2, n - 1) * std / np.sqrt(n)
    return np.where(n >= 2, h, np.nan)


def welch_interval(mean1: Any, std1: Any, n1: Any, mean2: Any, std2: Any, n2: Any,
                   level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(diff, low, high, df)``: ``diff = mean1 - mean2`` and its ``level`` Welch interval, with
    the Welch-Satterthwaite degrees of freedom (what ``scipy.stats.ttest_ind(a, b,
    equal_var=False).confidence_interval()`` gives for the raw samples).

    The interval is NaN where either side has n < 2, and where both stds are 0: a few runs that
    happened to agree exactly (a metric read off a few hundred images moves in steps) show no
    spread, not no noise, so nothing can be claimed from them.
    """
    m1, s1, k1 = (np.asarray(x, dtype=float) for x in (mean1, std1, n1))
    m2, s2, k2 = (np.asarray(x, dtype=float) for x in (mean2, std2, n2))
    diff = m1 - m2
    with np.errstate(invalid="ignore", divide="ignore"):
        v1, v2 = s1 ** 2 / k1, s2 ** 2 / k2
        se = np.sqrt(v1 + v2)
        df = (v1 + v2) ** 2 / (v1 ** 2 / (k1 - 1) + v2 ** 2 / (k2 - 1))
        h = np.where(se > 0, t_quantile((1 + level) / 2, df) * se, 0.0)
    ok = (k1 >= 2) & (k2 >= 2) & np.isfinite(se) & (se > 0)
    low = np.where(ok, diff - h, np.nan)
    high = np.where(ok, diff + h, np.nan)
    return diff, low, high, np.where(ok, df, np.nan)


def significant(low: Any, high: Any) -> np.ndarray:
    """True where the interval ``[low, high]`` excludes 0 (False where it is NaN)."""
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
