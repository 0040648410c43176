"""The results table as text: display strings and the markdown, csv, LaTeX, HTML and JSON
renderers of :func:`ablate.report.table.build_table`'s numeric table, and ``results/RESULTS.md``.

Each metric cell reads ``mean ± h (n=k)``, h the half-width of the 95% Student-t interval
(``mean (n=1)`` without one). The marks ``build_table`` computed (``attrs``: ``best``, ``tied``,
``baseline``) become **bold** / _italic_ in markdown, ``\\textbf`` / ``\\textit`` in LaTeX,
``<strong>`` / ``<em>`` in HTML and ``"best"`` / ``"tied"`` in JSON; csv is the numbers alone
(written as pandas' ``to_csv`` writes the frame: floats as ``repr`` does, absent values empty).

The renderers take the table as :func:`~ablate.report.table.build_table`'s pandas frame or as
:func:`ablate.report.summary.build`'s :class:`~ablate.report.summary.Table`, and import no pandas
for the latter (``ablate table``).
"""
from __future__ import annotations

import csv
import html as htmllib
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from ..db.engine import safe_url
from ..utils import atomic_write_bytes
from .summary import FORMATS, Table, metric_column, missing

if TYPE_CHECKING:
    import pandas as pd

    from ..db import Database
    from ..db.read import Reader

AnyTable = Union[Table, "pd.DataFrame"]

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


def _table(table: AnyTable) -> Table:
    return table if isinstance(table, Table) else Table.from_frame(table)


def _display(table: Table) -> tuple[list[str], list[list[str]]]:
    """Header and rows of :func:`display_table`."""
    metrics = table.attrs.get("metrics", [])
    methods = [str(m) for m in table["Method"]]
    if "older_code" in table:
        methods = [m + " †" if old else m for m, old in zip(methods, table["older_code"])]
    shown = {"Method": methods}
    if "Paradigm" in table:  # rows that generate in different ways (masked, ar, var)
        shown["Paradigm"] = table["Paradigm"]
    shown.update(Implemented=table["Implemented"], Trained=table["Trained"])
    for m in metrics:
        title, _, fmt = metric_column(m)
        shown[title] = [_cell(a, lo, hi, int(c), fmt) for a, lo, hi, c in
                        zip(table[m], table[f"{m}_ci95_low"], table[f"{m}_ci95_high"], table[f"{m}_n"])]
    base = table.attrs.get("baseline")
    for m in _diff_metrics(table.attrs):
        title, _, fmt = metric_column(m)
        shown[f"Δ {title} vs {base['label']}"] = [
            _diff_cell(d, lo, hi, bool(s), i == base["row"], fmt) for i, (d, lo, hi, s) in
            enumerate(zip(table[f"{m}_diff"], table[f"{m}_diff_ci95_low"], table[f"{m}_diff_ci95_high"],
                          table[f"{m}_significant"]))]
    shown["Hyperparameters"] = table["Hyperparameters"]
    shown["Notes"] = table["Notes"]
    return list(shown), [list(row) for row in zip(*shown.values())]


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as display strings (what markdown, LaTeX and HTML show, marks aside): Method
    (`` †`` for older code), Implemented, Trained, one ``mean ± h (n=k)`` column per metric
    (h: half-width of the 95% t-interval; titled with its direction), with a baseline one
    ``Δ <metric> vs <baseline>`` column per metric with a direction, Hyperparameters, Notes."""
    import pandas as pd

    cols, rows = _display(_table(table))
    return pd.DataFrame({c: [row[j] for row in rows] for j, c in enumerate(cols)}, columns=cols)


def _marked(table: Table, best, tied) -> tuple[list[str], list[list[str]]]:
    """Header and rows of :func:`display_table` with ``best(text)`` / ``tied(text)`` applied to
    the marked cells."""
    cols, rows = _display(table)
    for marks, mark in ((table.attrs.get("best", {}), best), (table.attrs.get("tied", {}), tied)):
        for m, positions in marks.items():
            j = cols.index(metric_column(m)[0])
            for i in positions:
                rows[i][j] = mark(rows[i][j])
    return cols, rows


def _footnotes(table: Table) -> list[str]:
    """One line per mark the table uses that a reader must know (markdown only)."""
    attrs = table.attrs
    metrics = attrs.get("metrics", [])
    out = []
    if any(k == 1 for m in metrics for k in table[f"{m}_n"]):
        out.append("n=1: a single run: no interval, and never marked best.")
    if "older_code" in table and any(table["older_code"]):
        out.append("†: runs of older code than the newest of their configuration (fingerprint in Notes).")
    if attrs.get("best") or attrs.get("tied"):
        out.append("**bold**: best, significantly (95% Welch) better than every other row; "
                   "_italic_: tied with the best (no significant difference).")
    if attrs.get("baseline"):
        out.append("Δ: difference to the baseline [95% Welch interval]; *: the interval excludes 0.")
    return out


def _markdown(table: Table) -> str:
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


def _latex(table: Table) -> str:
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


def _html(table: Table) -> str:
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


def _json_value(v: Any) -> Any:
    """A JSON value: absent values as null, numpy scalars as Python's."""
    if missing(v):
        return None
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


def _json(table: Table) -> str:
    attrs = table.attrs
    metrics = attrs.get("metrics", [])
    best, tied = attrs.get("best", {}), attrs.get("tied", {})
    per_cell = {m + suffix: (m, name) for m in metrics for suffix, name in _CELL.items() if m + suffix in table}
    fixed = [c for c in table.columns if c not in per_cell]
    records = []
    for i in range(len(table)):
        rec = {c: int(table[c][i]) if c == "n" else bool(table[c][i]) if c == "older_code" else _json_value(table[c][i])
               for c in fixed}
        cells: dict[str, dict[str, Any]] = {m: {} for m in metrics}
        for col, (m, name) in per_cell.items():
            v = _json_value(table[col][i])
            cells[m][name] = int(v) if name == "n" else bool(v) if name == "significant" else v
        for m in metrics:
            cells[m].update(best=i in best.get(m, ()), tied=i in tied.get(m, ()))
        rec["metrics"] = cells
        records.append(rec)
    base = attrs.get("baseline")
    return json.dumps({"group_by": attrs.get("group_by", []), "metrics": metrics,
                       "baseline": None if base is None else {k: _json_value(v) for k, v in base.items()},
                       "rows": records}, indent=1, ensure_ascii=False) + "\n"


def _csv_cell(v: Any) -> Any:
    if missing(v):
        return ""
    return repr(v) if isinstance(v, float) else v


def _csv(table: Table) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(table.columns)
    w.writerows([_csv_cell(v) for v in row] for row in zip(*(table[c] for c in table.columns)))
    return out.getvalue()


def render(table: AnyTable, fmt: str = "markdown") -> str:
    """``table`` (from :func:`~ablate.report.table.build_table` or
    :func:`~ablate.report.summary.build`) as markdown, csv (the numbers), latex, html or json."""
    renderers = {"markdown": _markdown, "csv": _csv, "latex": _latex, "html": _html, "json": _json}
    if fmt not in renderers:
        raise ValueError(f"--format: unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    return renderers[fmt](_table(table))


def write_results(db: Union[Database, Reader], path: Path, grid: Optional[str] = None,
                  table: Optional[AnyTable] = None, **options: Any) -> str:
    """Render the markdown table (``table``, else :func:`~ablate.report.summary.build` with
    ``options``) and write it to ``path`` under a header naming the database it came from, the
    time and how to read the marks; return the table."""
    if table is None:
        from ..db.read import reading
        from .summary import build

        with reading(db) as r:
            table = build(r, grid, **options)
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
