"""``ablate report``: the results as one self-contained folder that any browser opens offline.

Layout of the folder (``index.html`` is the page; everything else is what it loads)::

    index.html            the page skeleton: title, navigation, the scripts below
    assets/report.js      the page logic (vanilla JS shipped with ablate), report.css its styles
    data/table.js         the table, filter facets, Pareto points, study (one JS assignment)
    data/rows/<i>.js      row i's details (curves, configuration, runs, image lists), loaded on demand
    data/texts.js         the prompts and captions the rows point into (shared: stored once)
    img/<run key>.*.png   copies of the runs' sample-sheet snapshots, samples and failure cases
    .ablate-report        marks the folder as a report (only such a folder is ever replaced)

One folder, not one file: the images stay PNG files (base64 would add a third and would have to
be parsed with the page), and a row's details load only when the row is opened, so the index of
a 10,000-run database is one table file plus a page of rows. Data travel as JavaScript files, not
JSON, because browsers refuse ``fetch`` from ``file://``; a Content-Security-Policy limits the
page to its own folder's scripts, styles and images (no inline script, no network), and the
script inserts text from the database as text only.

The folder is written next to its destination and swapped in when complete, so a failed build
leaves the previous report as it was.
"""
from __future__ import annotations

import html
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from ..db import Database
from .site_data import collect

__all__ = ["MARKER", "ReportInfo", "write_report"]

MARKER = ".ablate-report"
ASSETS = Path(__file__).resolve().parent / "assets"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'")


@dataclass
class ReportInfo:
    """What :func:`write_report` wrote: the page, its rows and runs, image files copied, holes
    (artifact files the database names that are gone), the folder's bytes and the build time."""

    index: Path
    rows: int
    runs: int
    images: int
    holes: list[str]
    bytes: int
    seconds: float


def _js(value: Any) -> str:
    """``value`` as a JavaScript expression (JSON; U+2028/9 escaped for older engines)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _page(title: str, subtitle: str) -> str:
    t, s = html.escape(title), html.escape(subtitle)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{t}</title>
<link rel="icon" href="assets/icon.svg" type="image/svg+xml">
<link rel="stylesheet" href="assets/report.css">
</head>
<body>
<header>
<h1 id="title">{t}</h1>
<nav id="nav"></nav>
<p class="meta" id="meta">{s} </p>
</header>
<main id="app"><noscript>This report draws its table with JavaScript: allow scripts for this file
(it loads nothing from the network).</noscript></main>
<script src="data/table.js"></script>
<script src="assets/report.js"></script>
</body>
</html>
"""


def check_out(out: Path) -> None:
    """``out`` may be written: a new or empty folder, or an earlier report (replaced whole).
    Raises ValueError naming the folder and what to do."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a folder; pass a folder for the report")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"--out: {out} exists and is not an ablate report (no {MARKER} in it); "
                         "pass a new or empty folder")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out: cannot create {parent}: {exc.strerror}; pass a writable --out") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (out.is_dir() and not os.access(out, os.W_OK | os.X_OK)):
        raise ValueError(f"--out: {out if out.is_dir() else parent} is not writable; pass a writable --out")


def _place(src: str, dst: str) -> None:
    """A hard link where the filesystem allows one (instant, no extra space), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_report(db: Database, out: Path, grid: Optional[str] = None, study: Optional[str] = None,
                 baseline: Optional[str] = None,
                 pareto_axes: tuple[str, str] = ("fid_domain", "train_tokens_per_s"),
                 roots: Sequence[Path] = (Path("."),)) -> ReportInfo:
    """Write the report of ``grid`` / ``study`` (or every run) to the folder ``out``.

    ``roots``: folders relative artifact paths are taken from (where ``ablate run`` ran).
    Raises ValueError (one line) for an unwritable or foreign ``out``, a bad ``baseline`` and a
    selection without runs; a StudyError for an unknown ``study``. An artifact file that is gone
    is shown as a hole, never an error."""
    t0 = time.perf_counter()
    out = Path(out)
    check_out(out)
    data = collect(db, grid, study, baseline, pareto_axes, roots)
    if study is not None:
        from .study_data import study_data

        row_of_key = {r["key"]: d["row"] for d in data.details for r in d["runs"]}
        data.table["study"] = study_data(db, study, row_of_key)
    data.table["meta"]["generated"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "data" / "rows").mkdir(parents=True)
        shutil.copytree(ASSETS, tmp / "assets")
        meta = data.table["meta"]
        subtitle = f"{meta['rows']} rows from {meta['runs']} runs"
        texts = {tmp / "index.html": _page(meta["title"], subtitle),
                 tmp / "data" / "table.js": f"window.ABLATE_DATA = {_js(data.table)};\n",
                 tmp / "data" / "texts.js": f"ablateTexts({_js(data.texts)});\n",
                 tmp / MARKER: "written by `ablate report`; the folder is replaced whole on the next run\n"}
        texts.update({tmp / "data" / "rows" / f"{d['row']}.js": f"ablateRow({d['row']}, {_js(d)});\n"
                      for d in data.details})
        size = data.image_bytes + sum(f.stat().st_size for f in (tmp / "assets").iterdir())
        for path, text in texts.items():
            raw = text.encode("utf-8")
            path.write_bytes(raw)
            size += len(raw)
        (tmp / "img").mkdir()
        for dest, src in data.copies.items():
            _place(src, os.path.join(tmp, dest))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ReportInfo(index=out / "index.html", rows=meta["rows"], runs=meta["runs"], images=len(data.copies),
                      holes=list(data.holes), bytes=size, seconds=time.perf_counter() - t0)
