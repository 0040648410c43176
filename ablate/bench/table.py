"""``ablate bench table``: how long ``ablate table`` takes on a large results database.

:func:`build_db` writes a fresh SQLite database shaped like a real one (the resolved spec of each
run, its configuration key and code fingerprint, its grid link and overrides, 20 final metrics, a
few loss curves, some failed and pending runs, some seeds made by older code), in bulk.
:func:`bench_table` then times (1) the table in process: load, summarise and render, best of
``repeats``, with the three parts broken down, and (2) the command a user types, ``ablate table
--db URL``, as a subprocess: wall time including Python's start and imports, and, apart, Python's
start with the imports alone (a fresh interpreter importing the modules the command imported).

Default shape: 10,000 runs = 10 variants x 100 hyperparameter settings x 10 seeds, so the
table has 1,000 configuration rows, plus one row per configuration with seeds made by older
code (an eighth of them: 125) and unregistered variants' rows, of 20 metric columns.
"""
from __future__ import annotations

import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional

METRICS = ["fid_domain", "fid", "align_acc", "clip_score", "blank_rate", "fragment_rate",
           "train_tokens_per_s", "sample_images_per_s", "params", "backbone_params", "peak_mem_mb",
           "train_loss", "val_loss", "judge_acc", "align_acc_real", "fid_domain_real",
           "tok_align_acc", "tok_fid_domain", "train_s", "wall_s"]
VARIANTS = ["transformer", "uvit", "mamba-prefix", "m-mamba", "mamba-xattn", "mamba-parallel",
            "mamba-text-A", "mamba-skip-E", "hybrid-gsa", "mamba-critic"]


def build_db(path: Path, runs: int = 10_000, n_metrics: int = 20, variants: int = 10, seeds: int = 10,
             curve_runs: int = 50, curve_steps: int = 16, seed: int = 0) -> str:
    """Write a fresh SQLite results database at ``path`` (replaced if present); return its URL.

    Runs cycle through ``variants`` x settings x ``seeds``; a setting varies ``model.width``,
    ``train.lr`` and ``sample.guidance``. Each run carries its setting's configuration key
    (:func:`ablate.config.stored_config_key`, as ``Database.register`` stores it) and its
    variant's code fingerprint; 2.5% of the runs that started were made by the variant's older
    code (the first two seeds of every eighth setting, finished a day earlier), so those
    configurations' rows split as in a database that outlived a code change. 2% of runs failed,
    1% pending (not started: no fingerprint); the rest are done with ``n_metrics`` final metrics
    each. ``curve_runs`` runs get train/val loss curves."""
    from sqlalchemy import insert

    from ablate import __version__
    from ablate.config import RunSpec, stored_config_key
    from ablate.db import Database, GridRun, Metric, Run

    if n_metrics > len(METRICS):
        raise ValueError(f"bench table: at most {len(METRICS)} metrics, got {n_metrics}")
    if variants > len(VARIANTS):
        raise ValueError(f"bench table: at most {len(VARIANTS)} variants, got {variants}")
    path = Path(path)
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    url = f"sqlite:///{path.resolve()}"
    db = Database(url)
    rng = random.Random(seed)
    base = RunSpec().model_dump(mode="json")
    widths, lrs, guidances = [64, 96, 128, 192, 256], [3e-4, 1e-3, 2e-3, 3e-3], [1.0, 2.0, 3.0, 4.0, 5.0]
    now = datetime(2025, 1, 1)

    def code(variant: str, version: str) -> str:  # the shape of ablate.fingerprint's: <version>-<16 hex>
        return f"{__version__}-{hashlib.sha256(f'{variant}/{version}'.encode()).hexdigest()[:16]}"

    config_keys: dict[tuple[str, int], str] = {}  # (variant, setting): its key, hashed once per setting
    run_rows, link_rows = [], []
    for i in range(runs):
        v = VARIANTS[i % variants]
        setting, s = divmod(i // variants, seeds)
        width, lr, g = widths[setting % 5], lrs[(setting // 5) % 4], guidances[(setting // 20) % 5]
        over = {"model.variant": v, "model.width": width, "train.lr": lr, "sample.guidance": g}
        spec = {**base, "seed": s, "model": {**base["model"], "variant": v, "width": width},
                "train": {**base["train"], "lr": lr}, "sample": {**base["sample"], "guidance": g}}
        if (v, setting) not in config_keys:
            config_keys[v, setting] = stored_config_key(spec)
        status = "failed" if i % 50 == 7 else "pending" if i % 100 == 3 else "done"
        older = s < 2 and (setting + i % variants) % 8 == 0
        started = status != "pending"
        run_rows.append(dict(id=i + 1, key=f"{i:016x}", grid="bench", variant=v, seed=s, spec=spec,
                             overrides=over, status=status, created_at=now, attempts=1 if started else 0,
                             config_key=config_keys[v, setting],
                             fingerprint=code(v, "old" if older else "new") if started else None,
                             finished_at=now + timedelta(days=-1 if older else 0, seconds=i) if started else None,
                             error="RuntimeError: out of memory\nTraceback ..." if status == "failed" else None))
        link_rows.append(dict(grid="bench", run_id=i + 1, overrides=over))
    metric_rows = []
    for r in run_rows:
        if r["status"] != "done":
            continue
        for name in METRICS[:n_metrics]:
            metric_rows.append(dict(run_id=r["id"], name=name, step=None, value=rng.random() * 100))
    for r in run_rows[:curve_runs]:
        for step in range(1, curve_steps + 1):
            metric_rows.append(dict(run_id=r["id"], name="train_loss", step=step * 25, value=6 / step))
            metric_rows.append(dict(run_id=r["id"], name="val_loss", step=step * 25, value=6.2 / step))
    with db.tx() as s:
        s.execute(insert(Run), run_rows)
        s.execute(insert(GridRun), link_rows)
        s.execute(insert(Metric), metric_rows)
    db.close()
    return url


def _time_in_process(url: str, fmt: str) -> dict[str, float]:
    """The table as ``ablate table`` makes it (no pandas): the runs with the metrics it can show
    (:func:`~ablate.results.load_columns`), then :func:`~ablate.report.summary.build` on them (a
    spec per configuration, the variants' catalog, the statistics, the paradigms), then the text;
    all in one read transaction."""
    from ablate.db.read import reading
    from ablate.report.render import render
    from ablate.report.summary import build, table_metrics
    from ablate.results import load_columns

    with reading(url) as r:
        t0 = time.perf_counter()
        runs = load_columns(r, spec=False, metrics=table_metrics())
        t1 = time.perf_counter()
        table = build(r, runs=runs)
        t2 = time.perf_counter()
        text = render(table, fmt)
        t3 = time.perf_counter()
    return dict(load_s=t1 - t0, summarize_s=t2 - t1, render_s=t3 - t2, total_s=t3 - t0,
                table_rows=len(table), chars=len(text))


# imports again, in a fresh interpreter, every module a run of the command left in sys.modules
_REIMPORT = """import importlib, sys
for name in sys.stdin.read().split():
    try:
        importlib.import_module(name)
    except Exception:
        pass
"""


def bench_table(runs: int = 10_000, n_metrics: int = 20, repeats: int = 3, fmt: str = "markdown",
                workdir: Optional[Path] = None, subprocess_runs: bool = True) -> list[dict[str, Any]]:
    """Build the database, then time ``ablate table`` on it; one row per measurement:
    ``what`` (build_db | in_process | subprocess), ``runs, metrics, format, seconds`` (best of
    ``repeats``), ``median_s``, and for in_process the best run's ``load_s, summarize_s,
    render_s, table_rows``."""
    tmp = tempfile.TemporaryDirectory(prefix="ablate-bench-table-") if workdir is None else None
    where = Path(workdir or tmp.name)  # type: ignore[union-attr]
    where.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        url = build_db(where / "bench.db", runs=runs, n_metrics=n_metrics)
        rows: list[dict[str, Any]] = [dict(what="build_db", runs=runs, metrics=n_metrics, format="",
                                           seconds=time.perf_counter() - t0, median_s=None)]
        _time_in_process(url, fmt)  # warm-up: imports, the SQLite page cache
        inproc = [_time_in_process(url, fmt) for _ in range(repeats)]
        best = min(inproc, key=lambda r: r["total_s"])
        rows.append(dict(what="in_process", runs=runs, metrics=n_metrics, format=fmt, seconds=best["total_s"],
                         median_s=statistics.median(r["total_s"] for r in inproc),
                         **{k: best[k] for k in ("load_s", "summarize_s", "render_s", "table_rows")}))
        if subprocess_runs:
            cmd = [sys.executable, "-m", "ablate.cli", "table", "--db", url, "--format", fmt,
                   "--out", str(where / "RESULTS.md"), "--results", str(where)]
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            walls = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                walls.append(time.perf_counter() - t0)
                if done.returncode != 0:
                    raise RuntimeError(f"bench table: `ablate table` failed: {done.stderr.strip()[-500:]}")
            probe = subprocess.run([sys.executable, "-c", "import sys, ablate.cli; ablate.cli.main("
                                    f"{cmd[3:]!r}); print(' '.join(sorted(sys.modules)))"],
                                   capture_output=True, text=True, env=env, check=True)
            modules = [m for m in probe.stdout.strip().splitlines()[-1].split() if not m.endswith("__main__")]
            starts = []  # Python's start and the command's imports, without its work
            for _ in range(repeats):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", _REIMPORT], input=" ".join(modules), capture_output=True,
                               text=True, env=env, check=True)
                starts.append(time.perf_counter() - t0)
            rows.append(dict(what="subprocess", runs=runs, metrics=n_metrics, format=fmt, seconds=min(walls),
                             median_s=statistics.median(walls), imports_s=statistics.median(starts),
                             imports_torch="torch" in modules, imports_pandas="pandas" in modules,
                             imports_numpy="numpy" in modules, imports_sqlalchemy="sqlalchemy" in modules,
                             modules=len(modules)))
        return rows
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`bench_table` rows."""
    out = ["| what | runs | metrics | format | best s | median s | detail |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["what"] == "in_process":
            detail = (f"load {r['load_s']:.3f} s, summarise {r['summarize_s']:.3f} s, render "
                      f"{r['render_s']:.3f} s; {r['table_rows']} table rows")
        elif r["what"] == "subprocess":
            detail = (f"of which Python start + imports {r['imports_s']:.2f} s (median); "
                      f"torch imported: {'yes' if r['imports_torch'] else 'no'}"
                      + "".join(f", {name}: {'yes' if r[f'imports_{name}'] else 'no'}"
                                for name in ("pandas", "numpy", "sqlalchemy") if f"imports_{name}" in r)
                      + (f"; {r['modules']} modules" if "modules" in r else ""))
        else:
            detail = ""
        med = "" if r.get("median_s") is None else f"{r['median_s']:.3f}"
        out.append(f"| {r['what']} | {r['runs']:,} | {r['metrics']} | {r['format']} | {r['seconds']:.3f} | "
                   f"{med} | {detail} |")
    return "\n".join(out)
