"""The results table as text: display strings and the markdown, csv, LaTeX, HTML and JSON
renderers of :func:`ablate.report.table.build_table`'s numeric table, and ``results/RESULTS.md``.

Each metric cell reads ``mean ± h (n=k)``, h the half-width of the 95% Student-t interval
(``mean (n=1)`` without one). The marks ``build_table`` computed (``attrs``: ``best``, ``tied``,
``baseline``) become **bold** / _italic_ in markdown, ``\\textbf`` / ``\\textit`` in LaTeX,
``<strong>`` / ``<em>`` in HTML and ``"best"`` / ``"tied"`` in JSON; csv is the numbers alone.
"""
from __future__ import annotations

import html as htmllib
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from ..db import Database, safe_url
from ..utils import atomic_write_bytes
from .table import FORMATS, build_table, metric_column

__all__ = ["display_table", "latex_escape", "render", "write_results"]


def _num(fmt: str, v: float) -> str:
    return fmt.format(v)


def _cell(mean: float, low: float, high: float, n: int, fmt: str) -> str:
    """``mean ± h (n=k)``, h the 95% t-interval's half-width; ``mean (n=1)`` without one."""
    if n == 0 or math.isnan(mean):
        return "-"
    if n < 2 or math.isnan(low):
        return f"{_num(fmt, mean)} (n={n})"
    return f"{_num(fmt, mean)} ± {_num(fmt, (high - low) / 2)} (n={n})"


def _diff_cell(diff: float, low: float, high: float, sig: bool, is_base: bool, fmt: str) -> str:
    """``+d [low, high]`` (95% Welch), ``*`` where it excludes 0."""
    if is_base:
        return "(baseline)"
    if math.isnan(diff):
        return "-"
    d = _num(fmt, diff)
    d = d if d.startswith("-") else "+" + d
    if math.isnan(low):
        return f"{d} (no interval: n<2 or no spread)"
    return f"{d} [{_num(fmt, low)}, {_num(fmt, high)}]" + ("*" if sig else "")


def _diff_metrics(attrs: dict) -> list[str]:
    """The metrics whose difference to the baseline is shown: those with a direction."""
    if not attrs.get("baseline"):
        return []
    return [m for m in attrs.get("metrics", []) if metric_column(m)[1] is not None]


def _bare(table: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """``(table without attrs, its attrs)``: pandas deep-copies ``attrs`` (the marks: lists of
    up to every row) on every column access, which would dominate rendering a large table."""
    attrs = table.attrs
    bare = table.copy(deep=False)
    bare.attrs = {}
    return bare, attrs


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as display strings (what markdown, LaTeX and HTML show, marks aside): Method
    (`` †`` for older code), Implemented, Trained, one ``mean ± h (n=k)`` column per metric
    (h: half-width of the 95% t-interval; titled with its direction), with a baseline one
    ``Δ <metric> vs <baseline>`` column per metric with a direction, Hyperparameters, Notes."""
    table, attrs = _bare(table)
    metrics = attrs.get("metrics", [])
    methods = table["Method"].astype(str)
    if "older_code" in table:
        methods = methods.where(~table["older_code"].astype(bool), methods + " †")
    out = pd.DataFrame({"Method": methods, "Implemented": table["Implemented"], "Trained": table["Trained"]})
    if "Paradigm" in table:  # rows that generate in different ways (masked, ar, var)
        out.insert(1, "Paradigm", table["Paradigm"])
    for m in metrics:
        title, _, fmt = metric_column(m)
        out[title] = [_cell(a, lo, hi, int(c), fmt) for a, lo, hi, c in
                      zip(table[m].to_numpy(float), table[f"{m}_ci95_low"].to_numpy(float),
                          table[f"{m}_ci95_high"].to_numpy(float), table[f"{m}_n"].to_numpy())]
    base = attrs.get("baseline")
    for m in _diff_metrics(attrs):
        title, _, fmt = metric_column(m)
        out[f"Δ {title} vs {base['label']}"] = [
            _diff_cell(d, lo, hi, bool(s), i == base["row"], fmt) for i, (d, lo, hi, s) in
            enumerate(zip(table[f"{m}_diff"].to_numpy(float), table[f"{m}_diff_ci95_low"].to_numpy(float),
                          table[f"{m}_diff_ci95_high"].to_numpy(float), table[f"{m}_significant"].to_numpy()))]
    out["Hyperparameters"] = table["Hyperparameters"]
    out["Notes"] = table["Notes"]
    return out


def _marked(table: pd.DataFrame, best, tied) -> tuple[list[str], list[list[str]]]:
    """Header and rows of :func:`display_table` with ``best(text)`` / ``tied(text)`` applied to
    the marked cells."""
    attrs = table.attrs
    shown = display_table(table)
    rows = [list(r) for r in shown.itertuples(index=False)]
    cols = list(shown.columns)
    for marks, mark in ((attrs.get("best", {}), best), (attrs.get("tied", {}), tied)):
        for m, positions in marks.items():
            j = cols.index(metric_column(m)[0])
            for i in positions:
                rows[i][j] = mark(rows[i][j])
    return cols, rows


def _footnotes(table: pd.DataFrame) -> list[str]:
    """One line per mark the table uses that a reader must know (markdown only)."""
    table, attrs = _bare(table)
    metrics = attrs.get("metrics", [])
    out = []
    if any((table[f"{m}_n"] == 1).any() for m in metrics):
        out.append("n=1: a single run: no interval, and never marked best.")
    if "older_code" in table and table["older_code"].any():
        out.append("†: runs of older code than the newest of their configuration (fingerprint in Notes).")
    if attrs.get("best") or attrs.get("tied"):
        out.append("**bold**: best, significantly (95% Welch) better than every other row; "
                   "_italic_: tied with the best (no significant difference).")
    if attrs.get("baseline"):
        out.append("Δ: difference to the baseline [95% Welch interval]; *: the interval excludes 0.")
    return out


def _markdown(table: pd.DataFrame) -> str:
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    cols, rows = _marked(table, lambda s: f"**{s}**", lambda s: f"_{s}_")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    notes = _footnotes(table)
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
          "±": r"$\pm$", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "—": "---", "†": r"\dag{}",
          "Δ": r"$\Delta$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(c, c) for c in str(text))


def _latex(table: pd.DataFrame) -> str:
    # marks survive escaping as control characters
    cols, rows = _marked(table, lambda s: "\x00" + s + "\x01", lambda s: "\x02" + s + "\x01")
    fix = lambda s: latex_escape(s).replace("\x00", r"\textbf{").replace("\x02", r"\textit{") \
        .replace("\x01", "}")  # noqa: E731
    spec = "lll" + "r" * (len(cols) - 5) + "ll"
    out = [r"\begin{tabular}{" + spec + "}", r"\toprule",
           " & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    out += [" & ".join(fix(v) for v in row) + r" \\" for row in rows]
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def _html(table: pd.DataFrame) -> str:
    cols, rows = _marked(table, lambda s: "\x00" + s + "\x01", lambda s: "\x02" + s + "\x03")
    fix = lambda s: htmllib.escape(str(s)).replace("\x00", "<strong>").replace("\x01", "</strong>") \
        .replace("\x02", "<em>").replace("\x03", "</em>")  # noqa: E731
    out = ['<table class="ablate-results">', "<thead>",
           "<tr>" + "".join(f"<th>{htmllib.escape(c)}</th>" for c in cols) + "</tr>", "</thead>", "<tbody>"]
    out += ["<tr>" + "".join(f"<td>{fix(v)}</td>" for v in row) + "</tr>" for row in rows]
    out += ["</tbody>", "</table>"]
    return "\n".join(out) + "\n"


_CELL = {"": "mean", "_std": "std", "_n": "n", "_ci95_low": "ci95_low", "_ci95_high": "ci95_high",
         "_diff": "diff", "_diff_ci95_low": "diff_ci95_low", "_diff_ci95_high": "diff_ci95_high",
         "_significant": "significant"}


def _json(table: pd.DataFrame) -> str:
    table, attrs = _bare(table)
    metrics = attrs.get("metrics", [])
    best, tied = attrs.get("best", {}), attrs.get("tied", {})
    per_cell = {m + suffix: (m, name) for m in metrics for suffix, name in _CELL.items() if m + suffix in table}
    fixed = [c for c in table.columns if c not in per_cell]

    def num(v: Any) -> Any:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return v.item() if isinstance(v, np.generic) else v

    records = []
    for i, r in enumerate(table.to_dict("records")):
        rec = {c: (int(r[c]) if c == "n" else bool(r[c]) if c == "older_code" else num(r[c])) for c in fixed}
        cells: dict[str, dict[str, Any]] = {m: {} for m in metrics}
        for col, (m, name) in per_cell.items():
            v = num(r[col])
            cells[m][name] = int(v) if name == "n" else bool(v) if name == "significant" else v
        for m in metrics:
            cells[m].update(best=i in best.get(m, ()), tied=i in tied.get(m, ()))
        rec["metrics"] = cells
        records.append(rec)
    base = attrs.get("baseline")
    return json.dumps({"group_by": attrs.get("group_by", []), "metrics": metrics,
                       "baseline": None if base is None else {k: num(v) for k, v in base.items()},
                       "rows": records}, indent=1, ensure_ascii=False) + "\n"


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
    it to ``path`` under a header naming the database it came from, the time and how to read
    the marks; return the table."""
    if table is None:
        table = build_table(db, grid, **options)
    md = render(table, "markdown")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    opts = ", ".join(f"{k}={v if isinstance(v, str) else ','.join(v) if not isinstance(v, bool) else v}"
                     for k, v in options.items() if v and k != "registry")
    head = (f"# Results\n\nRegenerated by `ablate table` from `{safe_url(db.url)}`"
            f"{f' (grid `{grid}`)' if grid else ''}{f' ({opts})' if opts else ''} at {stamp}.\n"
            "One row per configuration (the resolved spec without the seed) and code version: runs are "
            "averaged only over seeds of one configuration trained by the same code. Metrics are "
            "mean ± the half-width of the 95% Student-t interval, with n (the runs that have the "
            "metric; n=1: no interval). Hyperparameters names what differs between the rows of one "
            "variant (and the grid's overrides of its base). Marks, in columns with a direction (↑ higher, "
            "↓ lower is better) only: **bold** is the best, significantly better than every other row "
            "(95% Welch interval of the difference excluding 0; never with n<2); otherwise the best and "
            "the rows not significantly different from it are _italic_ (tied). † after a Method: runs of "
            "older code than the newest of that configuration (Notes gives the fingerprint)."
            + (" Δ columns: difference to the baseline with its 95% Welch interval; * where it "
               "excludes 0." if table.attrs.get("baseline") else "") + "\n\n")
    atomic_write_bytes(path, (head + md).encode())
    return md
