"""Launch a grid's cells as jobs on one of :mod:`ablate.launch`'s executors, with live progress.

Shared preparation (dataset, VQ tokenizer, token cache, judge) runs first as one job per distinct
preparation, so concurrent cells never race to train the same tokenizer; then the cells. A job
that ends without a result (killed, out of memory, node lost) leaves its run ``lost``: the next
``ablate run`` resumes it from its checkpoint.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from . import launch as executors
from .db import Database
from .grid import Cell, Grid
from .prep_jobs import encode_tasks, run_preparation
from .prepare import prep_key


@dataclass
class LaunchReport:
    grid: str
    total: int
    already_done: int = 0
    done: int = 0
    failed: int = 0
    lost: int = 0  # jobs that ended without a result: resumed by the next run
    skipped: int = 0  # running elsewhere, or failed earlier without --retry-failed
    errors: dict[str, str] = field(default_factory=dict)  # key -> one-line reason
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.lost == 0


class Progress:
    """One status line: updated in place on a terminal, one line per change otherwise."""

    def __init__(self, total: int, slots: int, out: TextIO):
        self.total, self.slots, self.out = total, slots, out
        self.t0 = time.time()
        self.durations: list[float] = []
        self.tty = out.isatty()
        self._last = ""

    def show(self, done: int, running: int, failed: int, note: str = "") -> None:
        left = self.total - done - failed
        eta = ""
        if self.durations and left:
            per = sum(self.durations) / len(self.durations)
            eta = f", ETA {per * left / max(1, min(self.slots, left)) / 60:.1f} min"
        line = (f"[{time.time() - self.t0:6.0f}s] cells: {done} done, {running} running, "
                f"{failed} failed, {left - running} queued{eta}{'  ' + note if note else ''}")
        if line == self._last:
            return
        self._last = line
        if self.tty:
            self.out.write("\r\033[K" + line)
            if note:
                self.out.write("\n")
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def stale_runs(db: Database, keys: list[str]) -> dict[str, tuple[Optional[str], str]]:
    """The finished runs among ``keys`` whose code fingerprint differs from the installed code's
    for their variant: ``{key: (their fingerprint or None if unknown, the installed one)}``."""
    from .fingerprint import variant_fingerprint
    from .registry import UnknownVariant

    current: dict[str, Optional[str]] = {}
    out = {}
    for key, (variant, fp) in db.done_fingerprints(keys).items():
        if variant not in current:
            try:
                current[variant] = variant_fingerprint(variant)
            except UnknownVariant:  # no longer registered: nothing installed can rerun it
                current[variant] = None
        if current[variant] is not None and fp != current[variant]:
            out[key] = (fp, current[variant])
    return out


def supersede_stale(db: Database, keys: list[str], results_dir: Path, out: TextIO) -> int:
    """Keep each stale finished run as history (``superseded``, its files moved to
    ``runs/<key>@<id>``) and make its cell pending again; returns how many."""
    from .jobs import run_dir

    stale = stale_runs(db, keys)
    for key, (was, now) in stale.items():
        def move(history: str, key: str = key) -> Optional[tuple[str, str]]:
            src, dst = run_dir(results_dir, key), run_dir(results_dir, history)
            if not src.exists():
                return None
            src.rename(dst)
            return str(src), str(dst)

        try:
            history = db.supersede(key, move)
        except BaseException:
            moved = [p for p in run_dir(results_dir, key).parent.glob(f"{key}@*")
                     if not run_dir(results_dir, key).exists()]
            for p in moved[:1]:  # the transaction failed after the move: put the files back
                p.rename(run_dir(results_dir, key))
            raise
        out.write(f"cell {key[:12]}: code changed ({(was or 'unknown')} -> {now}); "
                  f"the old run is kept as {history}, retraining\n")
    return len(stale)


def launch(grid: Grid, db: Database, results_dir: Path, executor: Optional[str] = None,
           jobs: Optional[int] = None, retry_failed: bool = False, out: Optional[TextIO] = None,
           lost_after_s: Optional[float] = None, rerun_stale: bool = False) -> LaunchReport:
    """Register the grid's cells and run every one that is not done (with ``rerun_stale``, also
    those done by code whose fingerprint differs from the installed code's). Returns a summary."""
    out = out or sys.stdout
    t_start = time.time()
    kind = executors.resolve(executor or grid.launcher.executor)
    cpus = executors.KINDS[kind].cpus(grid.launcher)
    lost_after = lost_after_s if lost_after_s is not None else grid.launcher.lost_after_s
    report = LaunchReport(grid=grid.name, total=len(grid.cells))
    for key in db.mark_lost(lost_after):
        out.write(f"cell {key[:12]} was running with no heartbeat for {lost_after:.0f}s: marked lost, will resume\n")
    cells = [(c.key, c.variant, c.seed, c.spec.model_dump(mode="json"), c.overrides) for c in grid.cells]
    statuses = db.register(grid.name, cells)
    if rerun_stale and supersede_stale(db, [c.key for c in grid.cells], results_dir, out):
        statuses = db.register(grid.name, cells)
    todo: list[Cell] = []
    for c in grid.cells:
        st = statuses[c.key]
        if st == "done":
            report.already_done += 1
        elif st == "running" or (st == "failed" and not retry_failed):
            report.skipped += 1
            why = "running elsewhere" if st == "running" else "failed earlier (use --retry-failed)"
            report.errors[c.key] = why
        else:
            todo.append(c)
    if not todo:
        out.write(f"grid {grid.name}: all {report.total} cells already done"
                  + (f" ({report.skipped} skipped)" if report.skipped else "") + "; nothing to run\n")
        report.wall_s = time.time() - t_start
        return report

    folder = Path(results_dir) / "submitit" / grid.name
    runner = executors.executor(kind, folder, grid.launcher, jobs)
    out.write(f"grid {grid.name}: {len(todo)} of {report.total} cells to run "
              f"({report.already_done} already done) on executor '{kind}' with {runner.describe()}\n")

    # 1. shared preparation, one job per distinct data/tokenizer setting (and the token store)
    n_tasks = encode_tasks(kind, runner.slots, grid.launcher.prepare_tasks)
    prep_failed = run_preparation(runner, [c.spec for c in todo], Path(results_dir), cpus, n_tasks, out)

    # 2. the cells
    progress = Progress(len(todo), runner.slots if kind != "slurm" else len(todo), out)
    counts = {"done": 0, "failed": 0, "lost": 0, "elsewhere": 0}
    runnable = []
    for c in todo:
        reason = prep_failed.get(prep_key(c.spec))
        if reason is None:
            runnable.append(c)
            continue
        token = db.claim(c.key)
        if token is not None:
            db.fail(c.key, f"preparation failed: {reason}", token)
        counts["failed"] += 1
        report.errors[c.key] = f"preparation failed: {reason}"
    by_key = {c.key: c for c in runnable}

    def cell_submitted(_key: Optional[str], running: int) -> None:
        progress.show(counts["done"], running, counts["failed"] + counts["lost"])

    def cell_done(key: str, res: Any, secs: float, running: int) -> None:
        c = by_key[key]
        label = f"{c.variant} seed={c.seed} {key[:8]}"
        if isinstance(res, Exception):
            # the process died before it could record anything: never leave the run `running`;
            # `lost` (not `failed`): nothing says the cell itself is broken, the next run resumes it
            first = str(res).strip().splitlines()[-1] if str(res).strip() else type(res).__name__
            reason = f"job ended without a result: {first}"
            db.set_status(key, "lost", reason, only_from=("running", "pending"))
            res = {"status": "lost", "error": reason}
        status = res.get("status")
        if status == "done":
            counts["done"] += 1
            if not res.get("skipped"):
                progress.durations.append(secs)
            note = f"done {label} in {secs:.0f}s"
        elif status == "taken":  # marked lost while it ran, then claimed by another attempt
            counts["elsewhere"] += 1
            report.skipped += 1
            report.errors[key] = "taken over by another attempt"
            note = f"{label} was taken over by another attempt; this job stopped without writing"
        elif res.get("skipped") and status == "running":
            counts["elsewhere"] += 1
            report.skipped += 1
            report.errors[key] = "running elsewhere"
            note = f"{label} is being run by another launcher"
        elif status in ("lost", "pending"):
            counts["lost"] += 1
            report.errors[key] = res.get("error", status)
            note = f"LOST {label}: {report.errors[key]} (the next run resumes it)"
        else:
            counts["failed"] += 1
            report.errors[key] = res.get("error", status)
            note = f"FAILED {label}: {report.errors[key]}"
        progress.show(counts["done"], running, counts["failed"] + counts["lost"], note)

    from .jobs import CellJob

    progress.show(0, 0, counts["failed"])
    cells = runner.for_cells()  # one cell across several processes (DDP): slots hold whole cells
    if cells.ranks > 1:
        out.write(f"each cell runs as {cells.ranks} processes ({cells.tasks[0]} node(s) x "
                  f"{cells.tasks[1]} task(s))\n")
    with executors.job_env(db.url):  # the jobs read the URL from their environment: no password in job files
        cells.run([(c.key, CellJob(), (c.key, str(results_dir), cpus)) for c in runnable],
                  cell_done, cell_submitted, on_ids=db.set_job_ids)
    progress.close()
    report.done = counts["done"]
    report.failed = counts["failed"]
    report.lost = counts["lost"]
    report.wall_s = time.time() - t_start
    out.write(f"grid {grid.name}: {report.done} done, {report.failed} failed, "
              + (f"{report.lost} lost (run again to resume), " if report.lost else "")
              + f"{report.already_done} were already done ({report.wall_s:.0f}s)\n")
    return report
