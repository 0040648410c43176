"""``ablate bench report``: how long ``ablate report`` takes on a large database, and how long its
page takes to open in headless Chromium.

:func:`build_report_db` writes the database of ``ablate bench table``
(:func:`ablate.bench.table.build_db`: 10,000 runs = 10 variants x 100 settings x 10 seeds, 20
final metrics, some failed, pending and older-code runs) with train and validation loss curves on
every run and, for every finished run, the files a real job leaves: a sample sheet (6 prompts x
the default spec's snapshot steps, 32x32 tiles), ``samples.png`` (64 tiles) with its captions. With
``one_config_per_run`` every run is a configuration of its own (a 10,000-trial study's shape:
10,000 table rows instead of about 1,100).

:func:`bench_report` then times (1) the report in process (:func:`ablate.report.site.write_report`),
best of ``repeats``, each into a new folder, with its CPU time (on a shared machine the wall time
also counts other processes; the load average is printed beside it); (2) ``ablate report`` as the subprocess a user runs; (3) with Chromium, the
index page from navigation start until drawn (as the page measures it; the first load after
the browser starts is a warm-up), one sort by a metric over every row, and opening a row page
with its images.
"""
from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ablate.bench.table import build_db

PROMPTS = ["a large red circle in the top left", "a small blue square in the center",
           "a large green triangle in the right", "a small yellow circle in the bottom",
           "a large purple square in the top", "a small orange triangle in the left"]


def _pngs(k: int, n_tiles: int, cols: int, seed: int) -> list[bytes]:
    """``k`` different PNG strips of ``n_tiles`` 32x32 tiles (``cols`` a row, 2 px gaps, as
    ``ablate.train.save_sheet`` lays them out): a dark tile with one coloured blob each."""
    from PIL import Image

    g = np.random.default_rng(seed)
    rows = -(-n_tiles // cols)
    out = []
    for _ in range(k):
        sheet = np.full((rows * 34, cols * 34, 3), 255, np.uint8)
        for i in range(n_tiles):
            r, c = divmod(i, cols)
            tile = np.full((32, 32, 3), 24, np.uint8)
            y, x, s = *g.integers(2, 22, 2), int(g.integers(4, 10))
            tile[y:y + s, x:x + s] = g.integers(60, 255, 3)
            sheet[r * 34:r * 34 + 32, c * 34:c * 34 + 32] = tile
        buf = io.BytesIO()
        Image.fromarray(sheet).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def build_report_db(path: Path, runs: int = 10_000, one_config_per_run: bool = False) -> str:
    """The database at ``path`` (replaced) with curves on every run and artifacts under
    ``path.parent / "runs"``; returns its URL."""
    from sqlalchemy import insert, select, update

    from ablate.config import RunSpec
    from ablate.db import Artifact, Database, Run
    from ablate.report.site_data import expected_steps
    from ablate.results import flatten

    steps = sorted(expected_steps(flatten(RunSpec().model_dump(mode="json"))))  # what the page expects
    url = build_db(path, runs=runs, curve_runs=runs, curve_steps=16)
    strips, grids = _pngs(8, len(PROMPTS), len(PROMPTS), 0), _pngs(4, 64, 8, 1)
    db = Database(url, create=False)
    try:
        with db.engine.connect() as conn:
            done = conn.execute(select(Run.id, Run.key).where(Run.status == "done")).all()
        rows = []
        for rid, key in done:
            folder = path.parent / "runs" / key
            (folder / "sheet").mkdir(parents=True, exist_ok=True)
            for j, step in enumerate(steps):
                (folder / "sheet" / f"step_{step:06d}.png").write_bytes(strips[(rid + j) % len(strips)])
            (folder / "sheet" / "prompts.json").write_text(json.dumps({"prompts": PROMPTS, "tile": [32, 32], "gap": 2}))
            (folder / "samples.png").write_bytes(grids[rid % len(grids)])
            (folder / "samples.txt").write_text("\n".join(PROMPTS[i % len(PROMPTS)] for i in range(64)) + "\n")
            rows += [dict(run_id=rid, kind="sheet", path=str(folder / "sheet")),
                     dict(run_id=rid, kind="samples", path=str(folder / "samples.png"))]
        with db.tx() as s:
            s.execute(insert(Artifact), rows)
            if one_config_per_run:
                s.execute(update(Run).values(config_key=Run.config_key + "-" + Run.key))
    finally:
        db.close()
    return url


def _browser_times(index: Path) -> dict[str, float]:
    """Milliseconds: index drawn (second load; the first warms the browser), sorting every row by
    FID and redrawing, a row page with its sample sheet drawn."""
    from ablate.report.browser import chromium, load_report, wait_for

    with chromium() as d:
        load_report(d, index)
        loads = [load_report(d, index) for _ in range(3)]
        sort_ms = d.execute_script("""
            const th = [...document.querySelectorAll('#results thead th')].find(t => t.textContent.startsWith('FID (domain)'));
            const t0 = performance.now(); th.click(); return performance.now() - t0;""")
        t0 = time.perf_counter()
        d.execute_script("location.hash = '#row/0'")
        wait_for(d, "document.querySelectorAll('#row-view .tile').length > 0", 30)
        row_ms = (time.perf_counter() - t0) * 1000
        errors = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]
    if errors:
        raise RuntimeError(f"bench report: the page logged errors: {errors[0]}")
    return {"index_ms": min(loads), "index_median_ms": statistics.median(loads), "sort_ms": float(sort_ms),
            "row_ms": row_ms}


def bench_report(runs: int = 10_000, repeats: int = 2, one_config_per_run: bool = False,
                 browser: bool = True, subprocess_run: bool = True,
                 workdir: Optional[Path] = None) -> list[dict[str, Any]]:
    """Build the database, time the report and (``browser``, when Chromium is there) its page.
    One row per measurement: ``what`` (build_db | in_process | subprocess | chromium),
    ``runs``, ``rows`` (table rows), ``seconds`` (best), ``detail``."""
    from ablate.db import Database
    from ablate.report.site import write_report

    tmp = tempfile.TemporaryDirectory(prefix="ablate-bench-report-") if workdir is None else None
    where = Path(workdir or tmp.name)  # type: ignore[union-attr]
    where.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        url = build_report_db(where / "bench.db", runs=runs, one_config_per_run=one_config_per_run)
        out: list[dict[str, Any]] = [dict(what="build_db", runs=runs, rows=None, seconds=time.perf_counter() - t0,
                                          detail="curves on every run; sheet + samples per finished run")]
        db = Database(url, create=False)
        infos, cpu = [], []
        try:
            for k in range(repeats):  # each into a new folder (replacing a report first deletes it)
                c0 = time.process_time()
                infos.append(write_report(db, where / f"report{k}", roots=[where]))
                cpu.append(time.process_time() - c0)
        finally:
            db.close()
        b = min(range(repeats), key=lambda k: infos[k].seconds)
        best = infos[b]
        out.append(dict(what="in_process", runs=runs, rows=best.rows, seconds=best.seconds,
                        detail=f"median {statistics.median(i.seconds for i in infos):.2f} s, CPU {cpu[b]:.2f} s; "
                               f"{best.images:,} images; {best.bytes / 1e6:.1f} MB; holes {len(best.holes)}; "
                               f"load average {os.getloadavg()[0]:.1f}"))
        if subprocess_run:
            cmd = [sys.executable, "-m", "ablate.cli", "report", "--db", url, "--results", str(where),
                   "--out", str(where / "report-cli")]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(f"bench report: `ablate report` failed: {done.stderr.strip()[-500:]}")
            out.append(dict(what="subprocess", runs=runs, rows=best.rows, seconds=wall,
                            detail="`ablate report --db URL`: Python start, imports and the build"))
        if browser:
            from ablate.report.browser import missing

            why = missing()
            if why:
                out.append(dict(what="chromium", runs=runs, rows=best.rows, seconds=None, detail=f"skipped: {why}"))
            else:
                ms = _browser_times(best.index)
                out.append(dict(what="chromium", runs=runs, rows=best.rows, seconds=ms["index_ms"] / 1000,
                                detail=f"index drawn (median {ms['index_median_ms']:.0f} ms of 3); sort all rows "
                                       f"{ms['sort_ms']:.0f} ms; row page with images {ms['row_ms']:.0f} ms"))
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`bench_report` rows."""
    out = ["| what | runs | table rows | best s | detail |", "|---|---|---|---|---|"]
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.3f}"
        rows_ = "" if r["rows"] is None else f"{r['rows']:,}"
        out.append(f"| {r['what']} | {r['runs']:,} | {rows_} | {secs} | {r['detail']} |")
    return "\n".join(out)
