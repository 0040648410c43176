"""The results table in the seed notes' spirit, built on :func:`ablate.results.load`.

One row per variant and hyperparameter setting (or per ``group_by`` key), the seed-style columns
Method, Implemented, Trained, the metrics as mean ± std over seeds (sample std, ddof=1) with n,
Hyperparameters (the grid's overrides of its base) and Notes; variants registered but never
trained are listed as such. The best mean of each metric column with a direction
(:func:`ablate.results.higher_is_better`) is marked when at least two rows have a value: bold in
markdown and LaTeX, ``<strong>`` in HTML, ``"best": true`` in JSON; CSV carries the numbers
(mean, std and n per metric) for machines.

``build_table`` returns the numeric summary (one row per group); ``render`` turns it into text.
"""
from __future__ import annotations

import html as htmllib
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from ..db import Database, safe_url
from ..registry import Registry
from ..utils import atomic_write_bytes
from ..results import higher_is_better, load
from .catalog import catalog

# (metric, column title, higher is better (None: no direction), format); the default columns
METRIC_COLUMNS: list[tuple[str, str, Optional[bool], str]] = [
    ("fid_domain", "FID (domain) ↓", False, "{:.1f}"),
    ("fid", "FID ↓", False, "{:.1f}"),
    ("align_acc", "Align acc ↑", True, "{:.3f}"),
    ("clip_score", "CLIP score ↑", True, "{:.3f}"),
    ("blank_rate", "Blank ↓", False, "{:.3f}"),
    ("fragment_rate", "Fragments ↓", False, "{:.3f}"),
    ("train_tokens_per_s", "Train tok/s ↑", True, "{:.0f}"),
    ("sample_images_per_s", "Sample img/s ↑", True, "{:.1f}"),
    ("peak_mem_mb", "Peak MiB ↓", False, "{:.0f}"),
    ("params", "Params", None, "{:,.0f}"),
]
FORMATS = ("markdown", "csv", "latex", "html", "json")
DEFAULT_GROUP_BY = ("variant", "hyper")
_KNOWN = {m: (title, hib, fmt) for m, title, hib, fmt in METRIC_COLUMNS}


def metric_column(metric: str) -> tuple[str, Optional[bool], str]:
    """(title, higher is better, format) of ``metric``: the defaults' own, else its name with
    the arrow of :func:`higher_is_better` and 4 significant digits."""
    if metric in _KNOWN:
        return _KNOWN[metric]
    hib = higher_is_better(metric)
    return metric + {True: " ↑", False: " ↓", None: ""}[hib], hib, "{:.4g}"


def load_runs(db: Database, grid: Optional[str] = None, study: Optional[str] = None) -> pd.DataFrame:
    """One row per run with its final metrics (the spec left out): :func:`ablate.results.load`."""
    return load(db, grid, study, spec=False)


def _resolve(runs: pd.DataFrame, key: str, what: str) -> str:
    """A column of ``runs`` named by ``key``: itself, ``variant`` for method/model.variant, or
    the one spec column ending with ``.key`` (``scan`` -> ``model.params.scan``)."""
    if key in ("variant", "method", "Method", "model.variant"):
        return "variant"
    if key in runs.columns:
        return key
    ends = [c for c in runs.columns if c.endswith("." + key)]
    if len(ends) == 1:
        return ends[0]
    spec_cols = sorted(c for c in runs.columns if "." in c)
    hint = f"several match: {', '.join(ends)}" if ends else \
        f"accepted: variant, hyper, seed or a spec key such as {', '.join(spec_cols[:4]) or 'model.width'}"
    raise ValueError(f"{what}: unknown key {key!r} ({hint})")


def _hashable(s: pd.Series) -> pd.Series:
    """Group keys: lists as their JSON text, missing values as ``-``."""
    if s.dtype == object:
        s = s.map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    return s.astype(object).where(s.notna(), "-") if s.isna().any() else s


def _sort_value(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def summarize(runs: pd.DataFrame, descriptions: dict[str, str], metrics: Optional[Sequence[str]] = None,
              group_by: Optional[Sequence[str]] = None, sort: Optional[str] = None,
              all_variants: bool = True) -> pd.DataFrame:
    """The numeric table from :func:`ablate.results.load`'s frame.

    Columns: ``Method, Implemented, Trained``, the ``group_by`` keys other than variant and
    hyper, ``n`` (finished runs), per metric ``<m>`` (mean over finished runs), ``<m>_std``
    (ddof=1; NaN for one run) and ``<m>_n``, then ``Hyperparameters, Notes``. ``attrs``:
    ``metrics`` (names, in order), ``group_by`` (resolved keys), ``best`` ({metric: [row
    positions]}). The variant is always a group key; ``descriptions`` ({name: description} of
    the registered variants, in order) gives Implemented, Notes and the row order (variants
    with runs first); with ``all_variants`` registered variants without runs get a "No" row
    at the end. ``sort``: a metric
    (best first), or a column/group key (ascending); a leading ``-`` reverses it.
    """
    keys = ["variant"] + [_resolve(runs, k, "--group-by") for k in (group_by or DEFAULT_GROUP_BY)]
    keys = list(dict.fromkeys(keys))
    if metrics is None:
        metrics = [m for m, *_ in METRIC_COLUMNS if m in runs.columns and runs[m].notna().any()]
    else:
        missing = [m for m in metrics if m not in runs.columns]
        if missing and len(runs):
            have = sorted(c for c in runs.columns if c not in keys and runs[c].dtype.kind == "f")
            raise ValueError(f"--metrics: no final metric {missing[0]!r} in these runs "
                             f"(present: {', '.join(have) or 'none'})")
        metrics = list(metrics)
    cols = list(dict.fromkeys(keys + ["status", "error", "hyper"]))
    data = runs[cols].copy()
    for m in metrics:
        data[m] = runs[m].astype(float) if m in runs.columns else math.nan
    for k in keys:
        data[k] = _hashable(data[k])

    groups = data.groupby(keys, sort=False)
    counts = groups["status"].value_counts().unstack(fill_value=0) if len(data) else pd.DataFrame()
    pooled = groups["hyper"].nunique() if len(data) else pd.Series(dtype=int)
    done = data[data["status"] == "done"]
    stats = done.groupby(keys, sort=False)[metrics].agg(["mean", "std", "count"]) if metrics and len(done) \
        else pd.DataFrame()
    errors = data[data["status"] == "failed"].groupby(keys, sort=False)["error"].first() if len(data) \
        else pd.Series(dtype=object)

    index = list(counts.index)
    if index and not isinstance(index[0], tuple):
        index = [(i,) for i in index]
    seen = {i[0] for i in index}
    if all_variants:
        index += [(name,) + ("-",) * (len(keys) - 1) for name in descriptions if name not in seen]
    order = {name: i for i, name in enumerate(descriptions)}
    # variants with runs first (registry order, then unregistered ones by name), never-run ones last
    index.sort(key=lambda t: (t[0] not in seen, order.get(t[0], len(order)), t[0],
                              [_sort_value(v) for v in t[1:]]))

    extra = [k for k in keys if k not in ("variant", "hyper")]
    mi = pd.MultiIndex.from_tuples(index, names=keys) if len(keys) > 1 else pd.Index([i[0] for i in index])
    # every per-group figure looked up once, by reindexing onto the row order (no per-cell .loc)
    status = counts.reindex(mi, fill_value=0) if len(counts) else pd.DataFrame(index=mi)
    n_done = status["done"].to_numpy() if "done" in status else [0] * len(index)
    n_failed = status["failed"].to_numpy() if "failed" in status else [0] * len(index)
    status_rows = status.to_dict("records")
    first_error = errors.reindex(mi).to_numpy() if len(errors) else [None] * len(index)
    n_settings = pooled.reindex(mi, fill_value=0).to_numpy() if len(pooled) else [0] * len(index)
    figures = {}
    for m in metrics:
        for agg in ("mean", "std", "count"):
            figures[m, agg] = stats[(m, agg)].reindex(mi).to_numpy() if len(stats) else [math.nan] * len(index)
    rows = []
    for i, idx in enumerate(index):
        variant = idx[0]
        done_i, failed_i = int(n_done[i]), int(n_failed[i])
        if done_i:
            trained = f"Yes ({done_i})"
        elif failed_i:
            trained = f"Failed ({failed_i})"
        elif any(status_rows[i].values()):
            trained = "No (" + ", ".join(f"{n} {st}" for st, n in status_rows[i].items() if n) + ")"
        else:
            trained = "No"
        row: dict[str, Any] = {"Method": variant, "Implemented": "Yes" if variant in descriptions else "No",
                               "Trained": trained}
        values = dict(zip(keys, idx))
        for k in extra:
            row[k] = values[k]
        row["n"] = done_i
        for m in metrics:
            count = figures[m, "count"][i]
            row[m] = float(figures[m, "mean"][i]) if done_i else math.nan
            row[f"{m}_std"] = float(figures[m, "std"][i]) if done_i else math.nan
            row[f"{m}_n"] = 0 if not done_i or count != count else int(count)
        if "hyper" in keys:
            hyper = values["hyper"] if values["hyper"] not in ("", "-") else "base"
        else:
            hyper = ", ".join(f"{k}={values[k]}" for k in extra) or "base"
            if n_settings[i] > 1:
                hyper += f" (pooled over {int(n_settings[i])} settings)"
        row["Hyperparameters"] = hyper
        notes = descriptions.get(variant, "variant no longer registered")
        if failed_i and isinstance(first_error[i], str):
            notes += f" — failed: {first_error[i]}"
        row["Notes"] = notes
        rows.append(row)
    columns = ["Method", "Implemented", "Trained", *extra, "n",
               *[c for m in metrics for c in (m, f"{m}_std", f"{m}_n")], "Hyperparameters", "Notes"]
    table = pd.DataFrame(rows, columns=columns)
    if sort:
        table = _sorted(table, sort, metrics, extra)
    table.attrs.update(metrics=list(metrics), group_by=keys, best=_best(table, metrics))
    return table


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


def _best(table: pd.DataFrame, metrics: Sequence[str]) -> dict[str, list[int]]:
    """{metric: row positions holding the best mean} for metrics with a direction and at least
    two different values (ties for best all marked)."""
    out = {}
    for m in metrics:
        hib = metric_column(m)[1]
        col = table[m]
        if hib is None or col.notna().sum() < 2 or col.min() == col.max():
            continue  # one value, or all equal: nothing stands out
        best = col.max() if hib else col.min()
        out[m] = [i for i, v in enumerate(col.to_numpy()) if v == best]
    return out


def build_table(db: Database, grid: Optional[str] = None, registry: Optional[Registry] = None,
                study: Optional[str] = None, metrics: Optional[Sequence[str]] = None,
                group_by: Optional[Sequence[str]] = None, sort: Optional[str] = None) -> pd.DataFrame:
    """The numeric results table of ``db`` (``grid``/``study`` runs only when given); see
    :func:`summarize`. The spec columns are loaded only when a group key needs them. The
    registered variants that never ran get their "No" rows in the whole-database table only: a
    grid's or a study's table lists what that grid or study ran."""
    need_spec = any(k not in ("variant", "method", "Method", "model.variant", "hyper", "seed")
                    for k in (group_by or ()))
    runs = load(db, grid, study, spec=need_spec)
    names = catalog(registry, tuple(runs["variant"].unique()))
    return summarize(runs, names, metrics, group_by, sort, all_variants=grid is None and study is None)


# ----------------------------------------------------------------------------- rendering

def _cell(mean: float, std: float, n: int, n_runs: int, fmt: str) -> str:
    if n == 0 or math.isnan(mean):
        return "-"
    text = fmt.format(mean) if n == 1 or math.isnan(std) else f"{fmt.format(mean)} ± {fmt.format(std)}"
    return text + (f" (n={n})" if n != n_runs else "")


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as display strings (what markdown, LaTeX and HTML show, marks aside):
    Method, Implemented, Trained, one ``mean ± std`` column per metric (titled with its
    direction; `` (n=k)`` where fewer runs than finished have it), Hyperparameters, Notes."""
    metrics = table.attrs.get("metrics", [])
    out = pd.DataFrame({"Method": table["Method"], "Implemented": table["Implemented"],
                        "Trained": table["Trained"]})
    n_runs = table["n"].to_numpy()
    for m in metrics:
        title, _, fmt = metric_column(m)
        out[title] = [_cell(a, b, int(c), int(r), fmt) for a, b, c, r in
                      zip(table[m].to_numpy(), table[f"{m}_std"].to_numpy(), table[f"{m}_n"].to_numpy(), n_runs)]
    out["Hyperparameters"] = table["Hyperparameters"]
    out["Notes"] = table["Notes"]
    return out


def _marked(table: pd.DataFrame, mark) -> tuple[list[str], list[list[str]]]:
    """Header and rows of :func:`display_table` with ``mark(text)`` applied to best cells."""
    shown = display_table(table)
    rows = [list(r) for r in shown.itertuples(index=False)]
    cols = list(shown.columns)
    for m, positions in table.attrs.get("best", {}).items():
        j = cols.index(metric_column(m)[0])
        for i in positions:
            rows[i][j] = mark(rows[i][j])
    return cols, rows


def _markdown(table: pd.DataFrame) -> str:
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    cols, rows = _marked(table, lambda s: f"**{s}**")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
          "±": r"$\pm$", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "—": "---"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(c, c) for c in str(text))


def _latex(table: pd.DataFrame) -> str:
    cols, rows = _marked(table, lambda s: "\x00" + s + "\x01")  # marks survive escaping
    fix = lambda s: latex_escape(s).replace("\x00", r"\textbf{").replace("\x01", "}")  # noqa: E731
    n_metric = len(table.attrs.get("metrics", []))
    spec = "lll" + "r" * n_metric + "ll"
    out = [r"\begin{tabular}{" + spec + "}", r"\toprule",
           " & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    out += [" & ".join(fix(v) for v in row) + r" \\" for row in rows]
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def _html(table: pd.DataFrame) -> str:
    cols, rows = _marked(table, lambda s: "\x00" + s + "\x01")
    fix = lambda s: htmllib.escape(str(s)).replace("\x00", "<strong>").replace("\x01", "</strong>")  # noqa: E731
    out = ['<table class="ablate-results">', "<thead>",
           "<tr>" + "".join(f"<th>{htmllib.escape(c)}</th>" for c in cols) + "</tr>", "</thead>", "<tbody>"]
    out += ["<tr>" + "".join(f"<td>{fix(v)}</td>" for v in row) + "</tr>" for row in rows]
    out += ["</tbody>", "</table>"]
    return "\n".join(out) + "\n"


def _json(table: pd.DataFrame) -> str:
    metrics = table.attrs.get("metrics", [])
    best = table.attrs.get("best", {})
    fixed = [c for c in table.columns if c not in {x for m in metrics for x in (m, f"{m}_std", f"{m}_n")}]
    num = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v  # noqa: E731
    records = []
    for i, r in enumerate(table.to_dict("records")):
        rec = {c: (int(r[c]) if c == "n" else num(r[c])) for c in fixed}
        rec["metrics"] = {m: {"mean": num(r[m]), "std": num(r[f"{m}_std"]), "n": int(r[f"{m}_n"]),
                              "best": i in best.get(m, ())} for m in metrics}
        records.append(rec)
    return json.dumps({"group_by": table.attrs.get("group_by", []), "metrics": metrics, "rows": records},
                      indent=1, ensure_ascii=False) + "\n"


def render(table: pd.DataFrame, fmt: str = "markdown") -> str:
    """``table`` (from :func:`build_table`) as markdown, csv (the numbers), latex, html or json."""
    if fmt == "csv":
        return table.to_csv(index=False)
    renderers = {"markdown": _markdown, "latex": _latex, "html": _html, "json": _json}
    if fmt not in renderers:
        raise ValueError(f"--format: unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    return renderers[fmt](table)


def write_results(db: Database, path: Path, grid: Optional[str] = None, table: Optional[pd.DataFrame] = None,
                  **options: Any) -> str:
    """Render the markdown table (``table``, else :func:`build_table` with ``options``) and write
    it to ``path`` under a header naming the database it came from and the time; return the table."""
    if table is None:
        table = build_table(db, grid, **options)
    md = render(table, "markdown")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    opts = ", ".join(f"{k}={v if isinstance(v, str) else ','.join(v)}" for k, v in options.items()
                     if v and k != "registry")
    head = (f"# Results\n\nRegenerated by `ablate table` from `{safe_url(db.url)}`"
            f"{f' (grid `{grid}`)' if grid else ''}{f' ({opts})' if opts else ''} at {stamp}.\n"
            "Metrics are mean ± std over seeds (sample std); Trained gives the number of finished runs, "
            "`(n=k)` marks a metric that fewer of them have; the best value of each column with a "
            "direction (↑ higher, ↓ lower is better) is in bold.\n\n")
    atomic_write_bytes(path, (head + md).encode())
    return md


