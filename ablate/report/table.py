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

``build_table`` returns the numeric summary (one row per group); :mod:`ablate.report.render`
turns it into text (``render``, ``display_table``, ``write_results``).
"""
from __future__ import annotations

import itertools
import json
import math
import operator
import re
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from .. import stats
from ..db import Database
from ..registry import Registry
from ..results import higher_is_better, load, run_specs
from .catalog import catalog

# (metric, column title, higher is better (None: no direction), format); the default columns
METRIC_COLUMNS: list[tuple[str, str, Optional[bool], str]] = [
    ("fid_domain", "FID (domain) ↓", False, "{:.1f}"),
    ("kid_domain", "KID (domain) ↓", False, "{:.4f}"),
    ("precision_domain", "Precision (domain) ↑", True, "{:.3f}"),
    ("recall_domain", "Recall (domain) ↑", True, "{:.3f}"),
    ("fid", "FID ↓", False, "{:.1f}"),
    ("align_acc", "Align acc ↑", True, "{:.3f}"),
    ("align_acc_heldout", "Align acc held-out ↑", True, "{:.3f}"),
    ("clip_score", "CLIP score ↑", True, "{:.3f}"),
    ("clip_domain", "CLIP (domain) ↑", True, "{:.1f}"),
    ("blank_rate", "Blank ↓", False, "{:.3f}"),
    ("fragment_rate", "Fragments ↓", False, "{:.3f}"),
    ("train_tokens_per_s", "Train tok/s ↑", True, "{:.0f}"),
    ("sample_images_per_s", "Sample img/s ↑", True, "{:.1f}"),
    ("peak_mem_mb", "Peak MiB ↓", False, "{:.0f}"),
    ("params", "Params", None, "{:,.0f}"),
]
FORMATS = ("markdown", "csv", "latex", "html", "json")
# recorded by runs that trained on several processes or accumulated micro-batches: shown with
# the Hyperparameters (a run's key does not hold the launcher, so the table says it)
SCALE = {"world_size": "ranks", "global_batch": "global batch"}
# the row keys without --group-by: one configuration, one code version
CONFIG_GROUP = ("variant", "config_key", "fingerprint")
FINISHED = ("done", "superseded")  # statuses whose metrics count (superseded: only when asked for)
_KNOWN = {m: (title, hib, fmt) for m, title, hib, fmt in METRIC_COLUMNS}
_UNKNOWN_CODE = "-"  # the fingerprint of runs recorded before fingerprints existed


def metric_column(metric: str) -> tuple[str, Optional[bool], str]:
    """(title, higher is better, format) of ``metric``: the defaults' own, else its name with
    the arrow of :func:`higher_is_better` and 4 significant digits."""
    if metric in _KNOWN:
        return _KNOWN[metric]
    hib = higher_is_better(metric)
    return metric + {True: " ↑", False: " ↓", None: ""}[hib], hib, "{:.4g}"


def table_metrics(metrics: Optional[Sequence[str]] = None) -> list[str]:
    """The final metrics a table of ``metrics`` (None: the default columns, those present) can
    show, and the launcher's scale its Hyperparameters name: what :func:`build_table` loads."""
    return [*(metrics if metrics is not None else [m for m, *_ in METRIC_COLUMNS]), *SCALE]


def load_runs(db: Database, grid: Optional[str] = None, study: Optional[str] = None) -> pd.DataFrame:
    """One row per run with its final metrics (the spec left out): :func:`ablate.results.load`."""
    return load(db, grid, study, spec=False)


def _resolve(runs: pd.DataFrame, key: str, what: str) -> str:
    """A column of ``runs`` named by ``key``: itself, ``variant`` for method/model.variant,
    ``config_key`` for config, or the one spec column ending with ``.key`` (``scan`` ->
    ``model.params.scan``)."""
    if key in ("variant", "method", "Method", "model.variant"):
        return "variant"
    if key == "config":
        return "config_key"
    if key in runs.columns:
        return key
    ends = [c for c in runs.columns if c.endswith("." + key)]
    if len(ends) == 1:
        return ends[0]
    spec_cols = sorted(c for c in runs.columns if "." in c)
    hint = f"several match: {', '.join(ends)}" if ends else \
        ("accepted: variant, config, fingerprint, hyper, seed or a spec key such as "
         f"{', '.join(spec_cols[:4]) or 'model.width'}")
    raise ValueError(f"{what}: unknown key {key!r} ({hint})")


def _hashable(s: pd.Series) -> pd.Series:
    """Group keys: lists as their JSON text, missing values as ``-``."""
    if s.dtype == object:
        s = s.map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    return s.astype(object).where(s.notna(), "-") if s.isna().any() else s


def _sort_value(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _text(v: Any) -> str:
    """A spec value as the Hyperparameters column writes it (as the grid's overrides are)."""
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


_UNSET = object()  # a spec key some configurations lack (written by an older schema)
_ITEM = re.compile(r", (?=[A-Za-z_][\w.-]*=)")  # splits "a.b=1, c=[1, 2]" between items only


def config_hypers(data: pd.DataFrame, specs: Optional[dict[str, dict]], overrides: bool) -> dict[str, tuple]:
    """``{config_key: (Hyperparameters text, sort key)}``: per variant, the spec keys whose values
    differ between its configurations here (from ``specs``, ``{config_key: flat spec}``), plus
    with ``overrides`` the grid's overrides of its base (the ``hyper`` column); "base" when
    nothing is left. A configuration without a spec falls back to its ``hyper`` text. Texts that
    would still coincide within a variant get the configuration key appended."""
    specs = specs or {}
    firsts = data.drop_duplicates("config_key")[["variant", "config_key", "hyper"]]
    out: dict[str, tuple] = {}
    for variant, part in firsts.groupby("variant", sort=False):
        cks, hypers = list(part["config_key"]), list(part["hyper"])
        differ: list[str] = []
        if len(cks) > 1 and all(c in specs for c in cks):
            names = sorted(set().union(*(specs[c] for c in cks)))
            ref, rest = specs[cks[0]], [specs[c] for c in cks[1:]]
            differ = [k for k in names if any(map(operator.ne, [sp.get(k, _UNSET) for sp in rest],
                                                  itertools.repeat(ref.get(k, _UNSET))))]
        texts = {}
        for ck, hyper in zip(cks, hypers):
            items: dict[str, str] = {}
            if overrides or (len(cks) > 1 and ck not in specs):
                items = dict(x.split("=", 1) for x in _ITEM.split(hyper) if "=" in x) if hyper else {}
            spec = specs.get(ck, {})
            for k in differ:
                items.setdefault(k, _text(spec[k]) if k in spec else "(unset)")
            text = ", ".join(f"{k}={v}" for k, v in sorted(items.items())) or "base"
            texts[ck] = (text, tuple(_sort_value(spec.get(k)) for k in differ))
        seen: dict[str, int] = {}
        for text, _ in texts.values():
            seen[text] = seen.get(text, 0) + 1
        for ck, (text, order) in texts.items():
            out[ck] = (text + (f" [config {ck[:8]}]" if seen[text] > 1 else ""), order + (text,))
    return out


def _code_identity(data: pd.DataFrame) -> tuple[pd.Series, np.ndarray]:
    """Add ``_fp`` (the run's fingerprint, ``-`` where unknown), ``_newest`` (its configuration's
    newest code: that of the latest finished run), ``_stale`` and ``_code`` (the code version
    whose row the run joins: its own when finished; unfinished runs have no numbers and join
    their configuration's current-code row) to ``data`` in place. Returns ``(newest per
    config_key, finished mask)``."""
    data["_fp"] = data["fingerprint"].astype(object).where(data["fingerprint"].notna(), _UNKNOWN_CODE)
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
    data["_code"] = data["_fp"].where(finished, data["_newest"].where(has_newest, _UNKNOWN_CODE))
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
    where = {(m, ck, fp if isinstance(fp, str) else _UNKNOWN_CODE): i for i, (m, ck, fp) in
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
    pooled_mode = bool(group_by)
    if pooled_mode:
        keys = ["variant"] + [_resolve(runs, k, "--group-by") for k in group_by]
        keys = list(dict.fromkeys(keys))
        row_keys = keys + ["_stale"]
    else:
        keys = list(CONFIG_GROUP)
        row_keys = ["variant", "config_key", "_code"]
    if metrics is None:
        metrics = [m for m, *_ in METRIC_COLUMNS if m in runs.columns and runs[m].notna().any()]
    else:
        missing = [m for m in metrics if m not in runs.columns]
        if missing and len(runs):
            have = sorted(c for c in runs.columns if c not in keys and runs[c].dtype.kind == "f")
            raise ValueError(f"--metrics: no final metric {missing[0]!r} in these runs "
                             f"(present: {', '.join(have) or 'none'})")
        metrics = list(metrics)
    cols = list(dict.fromkeys(keys + ["config_key", "fingerprint", "status", "error", "hyper", "finished_at",
                                      "run_id"]))
    data = runs[cols].copy()
    for m in metrics:
        data[m] = runs[m].astype(float) if m in runs.columns else math.nan
    for m in SCALE:  # how many processes trained a run, and on how big a batch (launcher, not key)
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
    # configurations with more than one code version here (their current row says which is which)
    versions = fin.groupby("config_key")["_fp"].nunique() if len(fin) else pd.Series(dtype=int)

    newest_of, versions_of = newest.to_dict(), versions.to_dict()
    index = list(counts.index)
    seen = {i[0] for i in index}
    never = [name for name in descriptions if name not in seen] if all_variants else []
    order = {name: i for i, name in enumerate(descriptions)}

    def place(t: tuple) -> tuple:
        if pooled_mode:
            rest = [_sort_value(v) for v in t[1:-1]]
        else:
            rest = [hypers.get(t[1], ((), ("",)))[1]]
        older = bool(t[-1]) if pooled_mode else t[-1] != newest_of.get(t[1], t[-1])
        return (order.get(t[0], len(order)), t[0], rest, older, t[-1])  # current code first

    # variants with runs first (registry order, then unregistered ones by name), never-run ones last
    index.sort(key=place)
    mi = pd.MultiIndex.from_tuples(index, names=row_keys) if index else None
    n = len(index)

    def per_group(series: pd.Series, fill: Any) -> np.ndarray:
        if mi is None or not len(series):
            return np.full(n, fill, dtype=object)
        return series.reindex(mi).to_numpy()

    status = counts.reindex(mi, fill_value=0) if mi is not None else pd.DataFrame()
    n_done = status["done"].to_numpy() if "done" in status else np.zeros(n, int)
    n_super = status["superseded"].to_numpy() if "superseded" in status else np.zeros(n, int)
    n_failed = status["failed"].to_numpy() if "failed" in status else np.zeros(n, int)
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
        variant = idx[0]
        values = dict(zip(row_keys, idx))
        done_i, super_i, failed_i = int(n_done[i]), int(n_super[i]), int(n_failed[i])
        fin_i = done_i + super_i
        if fin_i:
            trained = f"Yes ({fin_i}{f', {super_i} superseded' if super_i else ''})"
        elif failed_i:
            trained = f"Failed ({failed_i})"
        elif any(status_rows[i].values()):
            trained = "No (" + ", ".join(f"{c} {st}" for st, c in status_rows[i].items() if c) + ")"
        else:
            trained = "No"
        row: dict[str, Any] = {"Method": variant, "Implemented": "Yes" if variant in descriptions else "No",
                               "Trained": trained}
        for k in extra:
            row[k] = values[k]
        row["n"] = fin_i
        for m in metrics:
            count = figures[m, "count"][i]
            row[m] = float(figures[m, "mean"][i]) if fin_i else math.nan
            row[f"{m}_std"] = float(figures[m, "std"][i]) if fin_i else math.nan
            row[f"{m}_n"] = 0 if not fin_i or count != count else int(count)
        n_cfg = int(configs_n[i] or 0)
        ck = config_first[i] if n_cfg == 1 else None
        fps = sorted(code_sets.get(idx, ()))
        stale = bool(values["_stale"]) if pooled_mode else (
            ck is not None and values["_code"] != newest_of.get(ck, values["_code"]))
        if pooled_mode:
            parts = [values[k] if k == "hyper" else f"{k}={values[k]}" for k in keys[1:]]
            hyper = ", ".join(x for x in parts if x not in ("", "-")) or "base"
            if n_cfg > 1:
                hyper += f" (pooled over {n_cfg} configs)"
        else:
            hyper = hypers.get(ck, ("base",))[0]
        for m, label in SCALE.items():
            seen_m = scale[m].get(idx, [])
            if seen_m and seen_m != [1]:
                hyper += f", {label}={'|'.join(map(str, seen_m))}"
        row["Hyperparameters"] = hyper
        notes = [descriptions.get(variant, "variant no longer registered")]
        if stale:
            notes.append(f"older code ({_code_names(fps)})")
        elif ck is not None and len(fps) == 1 and int(versions_of.get(ck, 1)) > 1:
            notes.append(f"newest code ({_code_names(fps)})")
        if fin_i == 1:
            notes.append("n=1: no interval")
        if failed_i and isinstance(first_error[i], str):
            notes.append(f"failed: {first_error[i]}")
        row["Notes"] = " — ".join(notes)
        row["config_key"] = ck
        row["fingerprint"] = None if len(fps) != 1 or fps[0] == _UNKNOWN_CODE else fps[0]
        row["older_code"] = stale
        rows.append(row)
    for name in never:
        row = {"Method": name, "Implemented": "Yes", "Trained": "No", **{k: "-" for k in extra}, "n": 0}
        for m in metrics:
            row.update({m: math.nan, f"{m}_std": math.nan, f"{m}_n": 0})
        row.update(Hyperparameters="-", Notes=descriptions[name], config_key=None, fingerprint=None,
                   older_code=False)
        rows.append(row)

    per_metric = ["", "_std", "_n", "_ci95_low", "_ci95_high"]
    if baseline is not None:
        per_metric += ["_diff", "_diff_ci95_low", "_diff_ci95_high", "_significant"]
    columns = ["Method", "Implemented", "Trained", *extra, "n",
               *[m + suffix for m in metrics for suffix in per_metric],
               "Hyperparameters", "Notes",
               *[c for c in ("config_key", "fingerprint") if c not in extra], "older_code"]
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
        base = _baseline(table, baseline)
        for m in metrics:
            _diff_columns(table, m, base["row"])
    table = table[columns]
    best, tied = _marks(table, metrics)
    table.attrs.update(metrics=list(metrics), group_by=keys, best=best, tied=tied, baseline=base)
    return table


def _code_names(fps: Sequence[str]) -> str:
    """``fingerprint abcd1234`` (the first 8 digits), several comma-separated; runs without a
    fingerprint as ``unknown code: no fingerprint``."""
    named = [f[:8] for f in fps if f != _UNKNOWN_CODE]
    parts = [("fingerprints " if len(named) > 1 else "fingerprint ") + ", ".join(named)] if named else []
    if _UNKNOWN_CODE in fps:
        parts.append("unknown code: no fingerprint")
    return "; ".join(parts) or "unknown code"


def _sorted(table: pd.DataFrame, sort: str, metrics: Sequence[str], extra: Sequence[str]) -> pd.DataFrame:
    reverse, key = sort.startswith("-"), sort.lstrip("-")
    if key in metrics:
        hib = metric_column(key)[1]
        ascending = not hib if hib is not None else False
    else:
        candidates = {"Method": "Method", "variant": "Method", "Trained": "Trained", "n": "n",
                      "Hyperparameters": "Hyperparameters", **{k: k for k in extra}}
        ends = [k for k in extra if k.endswith("." + key)]
        key = candidates.get(key) or (ends[0] if len(ends) == 1 else None)
        if key is None:
            raise ValueError(f"--sort: unknown key {sort!r} (accepted: a metric column "
                             f"({', '.join(metrics) or 'none'}), Method, Trained, n, Hyperparameters"
                             f"{', ' + ', '.join(extra) if extra else ''}; prefix - to reverse)")
        ascending = True
    if reverse:
        ascending = not ascending
    return table.sort_values(key, ascending=ascending, kind="stable", na_position="last").reset_index(drop=True)


def _baseline(table: pd.DataFrame, which: str) -> dict[str, Any]:
    """The row ``which`` names: a variant with one configuration (and current code) in the
    table, or a configuration key or prefix of one; a one-line ValueError otherwise."""
    # rows of runs (a row pooling several configurations has no config_key), not never-run variants
    ran = (table["config_key"].notna() | (table["Trained"] != "No")).to_numpy()
    current = ran & ~table["older_code"].to_numpy(bool)

    def listing(pos: Sequence[int]) -> str:
        return "; ".join(f"{table['config_key'].iat[i] or '(pooled)'} ({table['Hyperparameters'].iat[i]})"
                         for i in pos)

    by_variant = [i for i in np.flatnonzero(current) if table["Method"].iat[i] == which]
    if not by_variant:
        by_variant = [i for i in np.flatnonzero(ran & (table["Method"] == which).to_numpy())]
    if by_variant:
        if len(by_variant) > 1:
            raise ValueError(f"--baseline: variant {which!r} has {len(by_variant)} configurations in this table: "
                             f"{listing(by_variant)}; name one by its config key (a prefix is enough)")
        row = int(by_variant[0])
        return dict(label=which, row=row, config_key=table["config_key"].iat[row])
    keys = table["config_key"].astype(str)
    match = [i for i in np.flatnonzero(current) if table["config_key"].iat[i] and keys.iat[i].startswith(which)]
    if len(match) == 1:
        row = int(match[0])
        return dict(label=f"{table['Method'].iat[row]} [{which}]", row=row, config_key=table["config_key"].iat[row])
    if match:
        raise ValueError(f"--baseline: config key prefix {which!r} matches {len(match)} rows: {listing(match)}; "
                         "give more of the key")
    variants = ", ".join(dict.fromkeys(table["Method"][ran])) or "none"
    raise ValueError(f"--baseline: no variant or config key {which!r} in this table (variants: {variants})")


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
    """``(best, tied)``, each {metric: row positions}, for metrics with a direction and at least
    two different means. ``best``: the best mean, where it is significantly better (95% Welch)
    than every other row with a value (so never with n < 2 on either side). ``tied`` otherwise:
    the best and every row whose difference from it is not significant."""
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


def config_specs(db: Database, runs: pd.DataFrame) -> dict[str, dict]:
    """``{config_key: flat spec}`` (:func:`ablate.results.run_specs`) for :func:`config_hypers`:
    one run's spec per configuration, of the variants with several configurations in ``runs``
    only (the others need no name for what differs)."""
    several = runs.groupby("variant")["config_key"].transform("nunique") > 1
    first = runs[several].groupby("config_key")["run_id"].min()
    by_run = run_specs(db, first.tolist()) if len(first) else {}
    return {ck: by_run[rid] for ck, rid in first.items() if rid in by_run}


def build_table(db: Database, grid: Optional[str] = None, registry: Optional[Registry] = None,
                study: Optional[str] = None, metrics: Optional[Sequence[str]] = None,
                group_by: Optional[Sequence[str]] = None, sort: Optional[str] = None,
                baseline: Optional[str] = None, include_superseded: bool = False,
                runs: Optional[pd.DataFrame] = None, specs: Optional[dict[str, dict]] = None) -> pd.DataFrame:
    """The numeric results table of ``db`` (``grid``/``study`` runs only when given); see
    :func:`summarize`. ``runs``: :func:`ablate.results.load`'s frame (``spec=False``) of the same
    selection, when the caller has it (not reloaded unless a group key needs the spec);
    ``specs``: ``{config_key: flat spec}`` covering at least :func:`config_specs`'s, likewise. Superseded runs (old results of a cell retrained with newer code) are
    left out unless ``include_superseded``. The spec is loaded for every run only when a group
    key needs it; otherwise only one spec per configuration of the variants that have several
    (to name what differs). The registered variants that never ran get their "No" rows in the
    whole-database table only: a grid's or a study's table lists what that grid or study ran."""
    need_spec = any(k not in ("variant", "method", "Method", "model.variant", "hyper", "seed", "config",
                              "config_key", "fingerprint") for k in (group_by or ()))
    if runs is None or need_spec:
        # the metrics the table can show, not all (a run may record many more); a --metrics name
        # missing from them loads all, for the error's list of what is present
        runs = load(db, grid, study, spec=need_spec, metrics=None if group_by else table_metrics(metrics))
        if metrics is not None and not set(metrics) <= set(runs.columns):
            runs = load(db, grid, study, spec=need_spec)
    if not include_superseded and len(runs):
        runs = runs[runs["status"] != "superseded"].reset_index(drop=True)
    if group_by or not len(runs):
        specs = None
    elif specs is None:
        specs = config_specs(db, runs)
    names = catalog(registry, tuple(runs["variant"].unique()))
    table = summarize(runs, names, metrics, group_by, sort, all_variants=grid is None and study is None,
                      specs=specs, overrides=grid is not None or study is not None, baseline=baseline)
    if not group_by and len(runs):
        add_paradigm(table, config_paradigms(db, grid, study))
    return table


def config_paradigms(db: Database, grid: Optional[str], study: Optional[str]) -> dict[str, str]:
    """``{config_key: model.paradigm}`` of the selection's runs, in one query (the spec's JSON
    path; ``masked`` where a spec predates the field). A configuration key fixes the spec but
    the seed, so one run's spec per configuration says it (10x fewer specs read than runs)."""
    from ..db.read import reading
    from ..results import run_ids_sql

    ids, params = run_ids_sql(grid, study)
    first = "SELECT min(id) FROM runs WHERE config_key IS NOT NULL" + (f" AND id IN ({ids})" if ids else "") + \
        " GROUP BY config_key"
    with reading(db) as r:
        if r.dialect == "sqlite":
            path = "json_extract(spec, '$.\"model\".\"paradigm\"')"
        elif r.dialect == "postgresql":
            path = "spec #>> '{model,paradigm}'"
        else:
            path = None
        rows = r.rows(f"SELECT config_key, {path or 'spec'} FROM runs WHERE id IN ({first})", **params)
    if path is None:  # other databases: the spec's JSON read here
        rows = [(ck, (json.loads(s) if isinstance(s, str) else s).get("model", {}).get("paradigm")) for ck, s in rows]
    return {ck: p or "masked" for ck, p in rows if ck is not None}


def add_paradigm(table: pd.DataFrame, paradigms: dict[str, str]) -> None:
    """A Paradigm column after Method, in place, where the rows do not all generate one way
    (masked only: no column, the tables of before)."""
    col = [paradigms.get(ck, "masked") if isinstance(ck, str) else "-" for ck in table["config_key"]]
    if any(p not in ("masked", "-") for p in col):
        table.insert(1, "Paradigm", col)
