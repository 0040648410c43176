"""The results table in the seed notes' spirit, built on :func:`ablate.results.load`.

**Rows are configurations.** Runs are pooled only when they are seeds of one configuration (same
``config_key``, the resolved spec without the seed) and were produced by the same code
(``fingerprint``): runs of one configuration made by different code are separate rows, and the
rows whose code is not the newest of their configuration (newest = the latest finished run's)
carry ``older_code`` (a ``†`` after the Method, and a note). ``group_by`` replaces the
configuration by other keys (the variant always stays one); rows that then pool several
configurations say so, and older-code runs are still kept apart from current ones.

Columns: Method, Implemented, Trained, the metrics as mean ± the half-width of the 95% Student-t
interval with n (csv and json also carry the sample std and the interval's ends), Hyperparameters
(the spec keys whose values differ between the rows of one variant, plus the grid's overrides of
its base), Notes. Variants registered but never trained are listed as such.

Marks, for metrics with a direction (:func:`ablate.results.higher_is_better`) only: the best mean
is marked *best* (bold; ``<strong>``; ``"best": true``) only where it is significantly better than
every other row (95% Welch interval of the difference excluding 0; a row with n < 2 can be told
apart from nothing); otherwise the best and every row not significantly different from it are
marked *tied* (markdown ``_italic_``, LaTeX ``\textit``, ``<em>``, ``"tied": true``). With a
``baseline`` row, every row also gets its difference to the baseline with a 95% Welch interval
(``*`` where it excludes 0).

``build_table`` returns the numeric summary (one row per group) as a pandas frame;
:mod:`ablate.report.render` turns it into text (``render``, ``display_table``, ``write_results``).
The table is computed in plain Python (:mod:`ablate.report.summary`, what ``ablate table`` runs
without pandas); :func:`summarize_ref` is its pandas reference twin, for the tests.
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from .. import stats
from ..db import Database
from ..registry import Registry
from ..results import load
from . import naming, summary
from .naming import UNKNOWN_CODE
from .summary import CONFIG_GROUP, FINISHED, FORMATS, METRIC_COLUMNS, SCALE, SHARES, build, metric_column, table_metrics

__all__ = ["CONFIG_GROUP", "FINISHED", "FORMATS", "METRIC_COLUMNS", "SCALE", "build_table", "config_hypers",
           "config_specs", "load_runs", "metric_column", "row_members", "summarize", "summarize_ref", "build_table_ref",
           "table_metrics"]


def load_runs(db: Database, grid: Optional[str] = None, study: Optional[str] = None) -> pd.DataFrame:
    """One row per run with its final metrics (the spec left out): :func:`ablate.results.load`."""
    return load(db, grid, study, spec=False)


def _hashable(s: pd.Series) -> pd.Series:
    """Group keys: lists as their JSON text, missing values as ``-``."""
    if s.dtype == object:
        s = s.map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    return s.astype(object).where(s.notna(), "-") if s.isna().any() else s


def config_hypers(data: pd.DataFrame, specs: Optional[dict[str, dict]], overrides: bool) -> dict[str, tuple]:
    """:func:`ablate.report.naming.config_hypers` of the frame's ``variant``, ``config_key`` and
    ``hyper`` columns: ``{config_key: (Hyperparameters text, sort key)}``."""
    return naming.config_hypers(data["variant"].tolist(), data["config_key"].tolist(), data["hyper"].tolist(),
                                 specs, overrides)


def config_specs(db: Database, runs: pd.DataFrame) -> dict[str, dict]:
    """:func:`ablate.report.summary.config_specs` of :func:`ablate.results.load`'s frame:
    ``{config_key: flat spec}``, one run's spec per configuration of the variants with several."""
    from ..db.read import reading

    with reading(db) as r:
        return summary.config_specs(r, _columns(runs[["variant", "config_key", "run_id"]]))


def _code_identity(data: pd.DataFrame) -> tuple[pd.Series, np.ndarray]:
    """Add ``_fp`` (the run's fingerprint, ``-`` where unknown), ``_newest`` (its configuration's
    newest code: that of the latest finished run), ``_stale`` and ``_code`` (the code version
    whose row the run joins: its own when finished; unfinished runs have no numbers and join
    their configuration's current-code row) to ``data`` in place. Returns ``(newest per
    config_key, finished mask)``."""
    data["_fp"] = data["fingerprint"].astype(object).where(data["fingerprint"].notna(), UNKNOWN_CODE)
    finished = data["status"].isin(FINISHED).to_numpy()
    fin = data[finished]
    if len(fin):
        when = pd.to_datetime(fin["finished_at"], errors="coerce")
        newest = fin.assign(_when=when).sort_values(["_when", "run_id"], na_position="first", kind="stable") \
            .groupby("config_key", sort=False)["_fp"].last()
    else:
        newest = pd.Series(dtype=object)
    data["_newest"] = data["config_key"].map(newest)
    has_newest = data["_newest"].notna().to_numpy()
    data["_stale"] = finished & has_newest & (data["_fp"] != data["_newest"]).to_numpy()
    data["_code"] = data["_fp"].where(finished, data["_newest"].where(has_newest, UNKNOWN_CODE))
    return newest, finished


def _distinct_ints(data: pd.DataFrame, keys: list[str], column: str) -> dict[tuple, list[int]]:
    """``{row key tuple: sorted distinct ints of column}`` over the rows where ``column`` is set
    (a row key without any is absent): one pass, not a Python function per group."""
    values = data[column].to_numpy(float)
    have = ~np.isnan(values)
    out: dict[tuple, set] = {}
    if have.any():
        for key, v in zip(data.loc[have, keys].itertuples(index=False, name=None), values[have]):
            out.setdefault(key, set()).add(int(v))
    return {key: sorted(seen) for key, seen in out.items()}


def row_members(runs: pd.DataFrame, table: pd.DataFrame) -> list[list[int]]:
    """The run ids behind each row of a configuration table (:func:`summarize` without
    ``group_by``, on the same ``runs``): a run belongs to the row of its variant, configuration
    and code version, exactly as :func:`summarize` pooled it (unfinished runs with their
    configuration's current-code row). Rows of variants that never ran get ``[]``. Raises
    ValueError for a table of pooled rows (``group_by``), whose rows are not configurations."""
    if list(table.attrs.get("group_by", CONFIG_GROUP)) != list(CONFIG_GROUP):
        raise ValueError("row_members: the table pools configurations (group_by); rows are not configurations")
    out: list[list[int]] = [[] for _ in range(len(table))]
    if not len(runs):
        return out
    data = runs[["run_id", "variant", "config_key", "fingerprint", "status", "finished_at"]].copy()
    _code_identity(data)
    bare = table.copy(deep=False)
    bare.attrs = {}  # (pandas deep-copies attrs, the marks of every row, on each column access)
    cols = [bare[c].tolist() for c in ("Method", "config_key", "fingerprint")]
    where = {(m, ck, fp if isinstance(fp, str) else UNKNOWN_CODE): i for i, (m, ck, fp) in
             enumerate(zip(*cols)) if isinstance(ck, str)}
    for rid, key in zip(data["run_id"], zip(data["variant"], data["config_key"], data["_code"])):
        i = where.get(key)
        if i is not None:
            out[i].append(int(rid))
    return out


def summarize(runs: pd.DataFrame, descriptions: dict[str, str], metrics: Optional[Sequence[str]] = None,
              group_by: Optional[Sequence[str]] = None, sort: Optional[str] = None,
              all_variants: bool = True, specs: Optional[dict[str, dict]] = None, overrides: bool = False,
              baseline: Optional[str] = None) -> pd.DataFrame:
    """The numeric table from :func:`ablate.results.load`'s frame.

    Without ``group_by`` one row per configuration and code version (``config_key`` and
    ``fingerprint``); with it, one row per ``group_by`` key (the variant always is one), which
    may pool configurations (said in Hyperparameters), never older code with current code.
    Runs that are not finished (``done``; ``superseded`` ones count too when ``runs`` holds them)
    join their configuration's current-code row.

    Columns: ``Method, Implemented, Trained``, the ``group_by`` keys other than variant and
    hyper, ``n`` (finished runs), per metric ``<m>`` (mean over finished runs), ``<m>_std``
    (ddof=1; NaN for one run), ``<m>_n``, ``<m>_ci95_low`` and ``<m>_ci95_high`` (95% t-interval;
    NaN for n < 2), with ``baseline`` also ``<m>_diff``, ``<m>_diff_ci95_low``,
    ``<m>_diff_ci95_high`` (95% Welch) and ``<m>_significant``; then ``Hyperparameters, Notes,
    config_key`` (None where a row pools several), ``fingerprint`` (None: unknown or several)
    and ``older_code``. ``attrs``: ``metrics``, ``group_by`` (resolved keys), ``best`` and
    ``tied`` ({metric: [row positions]}), ``baseline`` (None or {label, row, config_key}).

    ``descriptions`` ({name: description} of the registered variants, in order) gives
    Implemented, Notes and the row order (variants with runs first); with ``all_variants``
    registered variants without runs get a "No" row at the end. ``specs`` ({config_key: flat
    spec}) names what differs between a variant's configurations; ``overrides`` adds the
    ``hyper`` column's text (a grid's or study's overrides of its base). ``sort``: a metric (best
    first), or a column/group key (ascending); a leading ``-`` reverses it. ``baseline``: a
    variant with one configuration here, or a configuration key (a prefix is enough).
    """
    return summary.summarize(_columns(runs), descriptions, metrics, group_by, sort, all_variants, specs, overrides,
                             baseline).frame()


def _columns(frame: pd.DataFrame) -> dict[str, list]:
    """A frame's columns as lists of Python values (NaT and NaN as the absent values they are)."""
    return {c: frame[c].tolist() for c in frame.columns}


def summarize_ref(runs: pd.DataFrame, descriptions: dict[str, str], metrics: Optional[Sequence[str]] = None,
                  group_by: Optional[Sequence[str]] = None, sort: Optional[str] = None,
                  all_variants: bool = True, specs: Optional[dict[str, dict]] = None, overrides: bool = False,
                  baseline: Optional[str] = None) -> pd.DataFrame:
    """:func:`summarize` with pandas, its reference twin (grouped aggregation, frame
    operations): the tests hold the plain-Python table equal to it."""
    pooled_mode = bool(group_by)
    keys, row_keys = summary.row_keys_of(list(runs.columns), group_by)
    if metrics is None:
        metrics = [m for m, *_ in METRIC_COLUMNS if m in runs.columns and runs[m].notna().any()]
    else:
        missing = [m for m in metrics if m not in runs.columns]
        if missing and len(runs):
            raise summary.no_metric(missing[0], sorted(c for c in runs.columns
                                                        if c not in keys and runs[c].dtype.kind == "f"))
        metrics = list(metrics)
    cols = list(dict.fromkeys(keys + ["config_key", "fingerprint", "status", "error", "hyper", "finished_at",
                                      "run_id"]))
    data = runs[cols].copy()
    for m in metrics:
        data[m] = runs[m].astype(float) if m in runs.columns else math.nan
    for m in (*SCALE, *SHARES):  # how many processes trained a run, on how big a batch; CPU shares
        data[f"_{m}"] = runs[m].astype(float) if m in runs.columns else math.nan
    for k in keys:
        if k != "fingerprint":
            data[k] = _hashable(data[k])

    newest, finished = _code_identity(data)
    if "fingerprint" in keys:  # (group_by names it)
        data["fingerprint"] = data["_code"]

    groups = data.groupby(row_keys, sort=False)
    counts = groups["status"].value_counts().unstack(fill_value=0) if len(data) else pd.DataFrame()
    n_configs = groups["config_key"].nunique() if len(data) else pd.Series(dtype=int)
    first_config = groups["config_key"].first() if len(data) else pd.Series(dtype=object)
    fin = data[finished]
    code_sets: dict[tuple, list] = {}  # the fingerprints of each row's finished runs
    for t in fin[row_keys + ["_fp"]].drop_duplicates().itertuples(index=False, name=None):
        code_sets.setdefault(t[:-1], []).append(t[-1])
    stats_ = fin.groupby(row_keys, sort=False)[metrics].agg(["mean", "std", "count"]) if metrics and len(fin) \
        else pd.DataFrame()
    errors = data[data["status"] == "failed"].groupby(row_keys, sort=False)["error"].first() if len(data) \
        else pd.Series(dtype=object)
    hypers = {} if pooled_mode else config_hypers(data, specs, overrides)
    scale = {m: _distinct_ints(fin, row_keys, f"_{m}") for m in SCALE}
    lowest = {m: fin.groupby(row_keys, sort=False)[f"_{m}"].min().to_dict() if len(fin) else {} for m in SHARES}
    # configurations with more than one code version here (their current row says which is which)
    versions = fin.groupby("config_key")["_fp"].nunique() if len(fin) else pd.Series(dtype=int)

    newest_of, versions_of = newest.to_dict(), {c: int(v) for c, v in versions.to_dict().items()}
    index = list(counts.index)
    seen = {i[0] for i in index}
    never = [name for name in descriptions if name not in seen] if all_variants else []
    # variants with runs first (registry order, then unregistered ones by name), never-run ones last
    index.sort(key=summary.placer(pooled_mode, hypers, newest_of, descriptions))
    mi = pd.MultiIndex.from_tuples(index, names=row_keys) if index else None
    n = len(index)

    def per_group(series: pd.Series, fill: Any) -> np.ndarray:
        if mi is None or not len(series):
            return np.full(n, fill, dtype=object)
        return series.reindex(mi).to_numpy()

    status = counts.reindex(mi, fill_value=0) if mi is not None else pd.DataFrame()
    status_rows = status.to_dict("records") if mi is not None else []
    first_error = per_group(errors, None)
    configs_n = per_group(n_configs, 0)
    config_first = per_group(first_config, None)
    figures = {}
    for m in metrics:
        for agg in ("mean", "std", "count"):
            figures[m, agg] = stats_[(m, agg)].reindex(mi).to_numpy(dtype=float) if len(stats_) and mi is not None \
                else np.full(n, math.nan)

    extra = [k for k in keys if k not in ("variant", "hyper", "config_key", "fingerprint")]
    rows = []
    for i, idx in enumerate(index):
        counts_i = {st: int(c) for st, c in status_rows[i].items()}
        fin_i = counts_i.get("done", 0) + counts_i.get("superseded", 0)
        numbers: dict[str, Any] = {}
        for m in metrics:
            count = figures[m, "count"][i]
            numbers[m] = float(figures[m, "mean"][i]) if fin_i else math.nan
            numbers[f"{m}_std"] = float(figures[m, "std"][i]) if fin_i else math.nan
            numbers[f"{m}_n"] = 0 if not fin_i or count != count else int(count)
        n_cfg = int(configs_n[i] or 0)
        ck = config_first[i] if n_cfg == 1 else None
        rows.append(summary.describe(idx, row_keys, keys, extra, counts_i, n_cfg, ck, sorted(code_sets.get(idx, ())),
                                     {m: scale[m].get(idx, []) for m in SCALE}, first_error[i], numbers, hypers,
                                     newest_of, versions_of, descriptions,
                                     {m: float(lowest[m].get(idx, math.nan)) for m in SHARES}))
    rows += [summary.never_row(name, extra, metrics, descriptions) for name in never]
    columns = summary.table_columns(extra, metrics, baseline)
    table = pd.DataFrame(rows, columns=[c for c in columns if not c.endswith(("_ci95_low", "_ci95_high",
                                                                               "_significant", "_diff"))])
    for m in metrics:
        h = stats.t_halfwidth(table[f"{m}_std"].to_numpy(float), table[f"{m}_n"].to_numpy(float))
        table[f"{m}_ci95_low"] = table[m].to_numpy(float) - h
        table[f"{m}_ci95_high"] = table[m].to_numpy(float) + h
    if sort:
        table = _sorted(table, sort, metrics, extra)
    base = None
    if baseline is not None:
        base = summary.pick_baseline(table, baseline)
        for m in metrics:
            _diff_columns(table, m, base["row"])
    table = table[columns]
    best, tied = _marks(table, metrics)
    table.attrs.update(metrics=list(metrics), group_by=keys, best=best, tied=tied, baseline=base)
    return table


def _sorted(table: pd.DataFrame, sort: str, metrics: Sequence[str], extra: Sequence[str]) -> pd.DataFrame:
    key, ascending = summary.sort_order(sort, metrics, extra)
    return table.sort_values(key, ascending=ascending, kind="stable", na_position="last").reset_index(drop=True)


def _diff_columns(table: pd.DataFrame, m: str, row: int) -> None:
    """``<m>_diff`` (row minus baseline), its 95% Welch interval and ``<m>_significant``."""
    mean, std, n = (table[c].to_numpy(float) for c in (m, f"{m}_std", f"{m}_n"))
    diff, low, high, _ = stats.welch_interval(mean, std, n, mean[row], std[row], n[row])
    low, high = low.copy(), high.copy()
    low[row] = high[row] = math.nan  # the baseline against itself: no interval, no claim
    table[f"{m}_diff"] = diff
    table[f"{m}_diff_ci95_low"] = low
    table[f"{m}_diff_ci95_high"] = high
    table[f"{m}_significant"] = stats.significant(low, high)


def _marks(table: pd.DataFrame, metrics: Sequence[str]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """:func:`ablate.report.summary._marks` on numpy arrays: ``(best, tied)``."""
    best, tied = {}, {}
    for m in metrics:
        hib = metric_column(m)[1]
        mean, std, n = (table[c].to_numpy(float) for c in (m, f"{m}_std", f"{m}_n"))
        valid = (n >= 1) & ~np.isnan(mean)
        if hib is None or valid.sum() < 2 or np.nanmin(mean[valid]) == np.nanmax(mean[valid]):
            continue  # one value, or all equal: nothing stands out
        scores = np.where(valid, mean if hib else -mean, -np.inf)
        b = int(np.argmax(scores))
        diff, low, high, _ = stats.welch_interval(mean[b], std[b], n[b], mean, std, n)
        better = (low > 0) if hib else (high < 0)  # the best is significantly better than this row
        others = valid & (np.arange(len(mean)) != b)
        if n[b] >= 2 and bool(better[others].all()):
            best[m] = [b]
        else:
            tied[m] = [b] + [int(j) for j in np.flatnonzero(others & ~better)]
    return best, tied


def build_table(db: Database, grid: Optional[str] = None, registry: Optional[Registry] = None,
                study: Optional[str] = None, metrics: Optional[Sequence[str]] = None,
                group_by: Optional[Sequence[str]] = None, sort: Optional[str] = None,
                baseline: Optional[str] = None, include_superseded: bool = False,
                runs: Optional[pd.DataFrame] = None, specs: Optional[dict[str, dict]] = None) -> pd.DataFrame:
    """The numeric results table of ``db`` (``grid``/``study`` runs only when given); see
    :func:`summarize`. ``runs``: :func:`ablate.results.load`'s frame (``spec=False``) of the same
    selection, when the caller has it (not reloaded unless a group key needs the spec);
    ``specs``: ``{config_key: flat spec}`` covering at least the first run's spec of each
    configuration of the variants with several, likewise. Superseded runs (old results of a cell
    retrained with newer code) are left out unless ``include_superseded``. The spec is loaded for
    every run only when a group key needs it; otherwise only one spec per configuration of the
    variants that have several (to name what differs). The registered variants that never ran get
    their "No" rows in the whole-database table only: a grid's or a study's table lists what that
    grid or study ran."""
    from ..db.read import reading

    with reading(db) as r:
        return build(r, grid, registry, study, metrics, group_by, sort, baseline, include_superseded,
                     runs=None if runs is None else _columns(runs), specs=specs).frame()


def build_table_ref(db: Database, grid: Optional[str] = None, registry: Optional[Registry] = None,
                    study: Optional[str] = None, metrics: Optional[Sequence[str]] = None,
                    group_by: Optional[Sequence[str]] = None, sort: Optional[str] = None,
                    baseline: Optional[str] = None, include_superseded: bool = False) -> pd.DataFrame:
    """:func:`build_table` through :func:`ablate.results.load`'s frame and :func:`summarize_ref`:
    the reference twin of the table, for the tests."""
    from ..db.read import reading
    from .catalog import catalog

    need_spec = any(k not in summary.SPEC_FREE for k in (group_by or ()))
    runs = load(db, grid, study, spec=need_spec, metrics=None if group_by else table_metrics(metrics))
    if metrics is not None and not set(metrics) <= set(runs.columns):
        runs = load(db, grid, study, spec=need_spec)
    if not include_superseded and len(runs):
        runs = runs[runs["status"] != "superseded"].reset_index(drop=True)
    specs = None if group_by or not len(runs) else config_specs(db, runs)
    names = catalog(registry, tuple(runs["variant"].unique()))
    table = summarize_ref(runs, names, metrics, group_by, sort, all_variants=grid is None and study is None,
                          specs=specs, overrides=grid is not None or study is not None, baseline=baseline)
    if not group_by and len(runs):
        with reading(db) as r:
            summary.add_paradigm(table, summary.config_paradigms(r, grid, study))
    return table
