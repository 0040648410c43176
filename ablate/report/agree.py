"""Does one metric rank a grid's configurations like another? ``ablate agree GRID A B``.

This is how a user learns what a metric without ground truth means: on data where a trusted
metric exists (``align_acc`` on shapes), a new one (``clip_domain``) should order the same
configurations the same way before it is trusted where it stands alone. One row per
configuration (variant, config key, code fingerprint: never pooled across code versions), its
seeds averaged; the per-run agreement is shown too.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from ..results import higher_is_better, load
from ..stats import rank_agreement
from .table import CONFIG_GROUP


def agreement(db: Any, grid: str, a: str, b: str, resamples: int = 10000) -> dict[str, Any]:
    """``{"configs": rank_agreement over configuration means, "runs": over single runs,
    "table": per-configuration frame (variant, n, a, b)}`` of the grid's finished runs that
    have both metrics. Metrics where lower is better are negated first, so a positive rho
    always means "ranks the same way". Raises ValueError naming what is missing."""
    runs = load(db, grid, spec=False)
    runs = runs[runs["status"] == "done"]
    for m in (a, b):
        if m not in runs.columns:
            raise ValueError(f"no finished run of grid {grid!r} has metric {m!r}")
    runs = runs.dropna(subset=[a, b])
    dup = runs.groupby(["variant", "config_key"])["fingerprint"].nunique()
    if (dup > 1).any():
        raise ValueError(f"grid {grid!r}: configuration(s) {', '.join(map(str, dup[dup > 1].index.get_level_values(0)))} "
                         "have finished runs from several code versions; `ablate run --rerun-stale` first")
    table = (runs.groupby(list(CONFIG_GROUP), dropna=False)
             .agg(n=(a, "size"), **{a: (a, "mean"), b: (b, "mean")}).reset_index())
    if len(table) < 3:
        raise ValueError(f"grid {grid!r}: {len(table)} configuration(s) with both {a} and {b}; a ranking needs >= 3")
    sign = {m: (-1.0 if higher_is_better(m) is False else 1.0) for m in (a, b)}
    out = {"configs": rank_agreement(sign[a] * table[a].to_numpy(), sign[b] * table[b].to_numpy(),
                                     resamples=resamples),
           "table": table.sort_values(b, ascending=sign[b] < 0).reset_index(drop=True)}
    out["runs"] = rank_agreement(sign[a] * runs[a].to_numpy(), sign[b] * runs[b].to_numpy(), resamples=resamples)
    return out


def format_agreement(res: dict[str, Any], grid: str, a: str, b: str) -> str:
    """The result as a short markdown block: the per-configuration table, then the two rhos."""
    t: pd.DataFrame = res["table"]
    lines = [f"| variant | seeds | {a} | {b} |", "|---|---|---|---|"]
    lines += [f"| {r.variant} | {r.n} | {getattr(r, a):.4g} | {getattr(r, b):.4g} |"
              for r in t.itertuples(index=False)]

    def say(r: dict[str, float], what: str) -> str:
        return (f"{what}: Spearman rho {r['rho']:.3f}, 95% bootstrap interval [{r['low']:.3f}, {r['high']:.3f}], "
                f"one-sided permutation p {r['p']:.4f} (n = {int(r['n'])})")

    lines += ["", f"{a} vs {b} on grid {grid}:", say(res["configs"], "over configurations (seed means)"),
              say(res["runs"], "over single runs")]
    return "\n".join(lines) + "\n"
