"""Launch a grid's cells as submitit jobs, at most ``jobs`` at a time, with live progress.

submitit's LocalExecutor starts every submitted job at once, so the pool of slots is ours: a
cell is submitted only when a slot is free. Shared preparation (dataset, VQ tokenizer, token
cache, judge) runs first as one job per distinct preparation, so concurrent cells never race to
train the same tokenizer.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from .config import RunSpec, content_hash
from .db import Database
from .grid import Cell, Grid

EXECUTORS = ("local", "debug")
# a `running` cell whose heartbeat (every HEARTBEAT_S) is older than this is taken for dead: `lost`
LOST_AFTER_S = 180.0


@dataclass
class LaunchReport:
    grid: str
    total: int
    already_done: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0  # running elsewhere, or failed earlier without --retry-failed
    errors: dict[str, str] = field(default_factory=dict)  # key -> one-line reason
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0


def prep_key(spec: RunSpec) -> str:
    """Cells with equal data/tokenizer/text/eval-judge settings share one preparation job."""
    from .jobs import images_key

    return content_hash({"images": images_key(spec), "tok": spec.tokenizer.model_dump(mode="json"),
                         "judge": spec.eval.judge_steps, "device": spec.train.device})


def prepare_job(spec_json: dict, results_dir: str, threads: int, part: str) -> dict[str, Any]:
    """Job body: build one cache the cells need, ``part`` of :data:`ablate.jobs.PREP_PARTS`
    (never raises: DebugExecutor would open pdb)."""
    import torch

    from .jobs import prepare
    from .utils import pick_device

    torch.set_num_threads(max(1, threads))
    try:
        spec = RunSpec.model_validate(spec_json)
        prep = prepare(spec, Path(results_dir), pick_device(spec.train.device), parts=(part,))
        return {"status": "done", "metrics": prep.metrics}
    except Exception as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}


# glibc returns large freed blocks to the OS at once by default, so every training step of a
# CPU job page-faults its big temporaries afresh (measured: 5k-40k faults and ~10% of a Mamba
# step); raising the thresholds keeps them in the heap. Applied to local jobs unless set.
LOCAL_JOB_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def make_executor(kind: str, folder: Path, timeout_min: int):
    import submitit

    if kind == "local":
        for k, v in LOCAL_JOB_ENV.items():
            os.environ.setdefault(k, v)  # inherited by the job processes submitit starts
        ex = submitit.LocalExecutor(folder=str(folder / "%j"))
    elif kind == "debug":
        ex = submitit.DebugExecutor(folder=str(folder / "%j"))
    else:
        raise ValueError(f"--executor: unknown executor {kind!r}; accepted: {', '.join(EXECUTORS)}")
    params: dict[str, Any] = {"timeout_min": timeout_min}
    if kind == "local":
        import torch

        # submitit's local jobs see only the GPUs they are given (CUDA_VISIBLE_DEVICES="" otherwise)
        if torch.cuda.is_available():
            params["gpus_per_node"] = torch.cuda.device_count()
    ex.update_parameters(**params)
    return ex


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


def _pool(executor, tasks: list[tuple[str, Any, tuple]], slots: int, on_done, on_submit=None,
          poll_s: float = 0.5) -> None:
    """Run ``tasks`` (name, fn, args) through ``executor`` with at most ``slots`` in flight;
    ``on_done(name, result_or_exception, seconds)`` is called as each finishes."""
    queue = list(tasks)
    running: dict[str, tuple[Any, float]] = {}
    while queue or running:
        while queue and len(running) < slots:
            name, fn, args = queue.pop(0)
            running[name] = (executor.submit(fn, *args), time.time())
            if on_submit:
                on_submit(name, len(running))
        for name, (job, t0) in list(running.items()):
            if job.done():
                try:
                    res: Any = job.result()
                except Exception as exc:  # the job process died or submitit failed
                    res = exc
                del running[name]
                on_done(name, res, time.time() - t0, len(running))
        if running:
            time.sleep(poll_s)


def launch(grid: Grid, db: Database, results_dir: Path, executor: Optional[str] = None,
           jobs: Optional[int] = None, retry_failed: bool = False, out: Optional[TextIO] = None) -> LaunchReport:
    """Register the grid's cells and run every one that is not done. Returns a summary."""
    out = out or sys.stdout
    t_start = time.time()
    kind = executor or grid.launcher.executor
    slots = 1 if kind == "debug" else (jobs or grid.launcher.jobs)
    cpus = grid.launcher.cpus_per_job
    report = LaunchReport(grid=grid.name, total=len(grid.cells))
    for key in db.mark_lost(LOST_AFTER_S):
        out.write(f"cell {key[:12]} was running with no heartbeat for {LOST_AFTER_S:.0f}s: marked lost, will resume\n")
    statuses = db.register(grid.name, [(c.key, c.variant, c.seed, c.spec.model_dump(mode="json"), c.overrides)
                                       for c in grid.cells])
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

    out.write(f"grid {grid.name}: {len(todo)} of {report.total} cells to run "
              f"({report.already_done} already done) on executor '{kind}' with {slots} slot(s)\n")
    folder = Path(results_dir) / "submitit" / grid.name
    ex = make_executor(kind, folder, grid.launcher.timeout_min)

    # 1. shared preparation, one job per distinct data/tokenizer setting
    preps: dict[str, Cell] = {}
    for c in todo:
        preps.setdefault(prep_key(c.spec), c)
    prep_failed: dict[str, str] = {}

    def prep_done(name: str, res: Any, secs: float, _running: int) -> None:
        if isinstance(res, Exception) or res.get("status") != "done":
            prep_failed[name] = str(res) if isinstance(res, Exception) else res["error"]
            out.write(f"preparation {name} failed: {prep_failed[name]}\n")
        else:
            out.write(f"preparation {name} ready in {secs:.0f}s\n")

    from .jobs import PREP_PARTS

    out.write(f"preparing {len(preps)} dataset setting(s): {', '.join(PREP_PARTS)}\n")
    _pool(ex, [(f"{k}/{part}", prepare_job, (c.spec.model_dump(mode="json"), str(results_dir), cpus, part))
               for k, c in preps.items() for part in PREP_PARTS], slots, prep_done)
    prep_failed = {name.split("/")[0]: why for name, why in prep_failed.items()}

    # 2. the cells
    progress = Progress(len(todo), slots, out)
    counts = {"done": 0, "failed": 0}
    runnable = []
    for c in todo:
        reason = prep_failed.get(prep_key(c.spec))
        if reason is None:
            runnable.append(c)
            continue
        if db.claim(c.key):
            db.fail(c.key, f"preparation failed: {reason}")
        counts["failed"] += 1
        report.errors[c.key] = f"preparation failed: {reason}"
    by_key = {c.key: c for c in runnable}

    def cell_submitted(_key: str, running: int) -> None:
        progress.show(counts["done"], running, counts["failed"])

    def cell_done(key: str, res: Any, secs: float, running: int) -> None:
        c = by_key[key]
        label = f"{c.variant} seed={c.seed} {key[:8]}"
        if isinstance(res, Exception):
            # the process died before it could record anything: never leave the run `running`
            first = str(res).strip().splitlines()[-1] if str(res).strip() else ""
            if db.statuses([key]).get(key) == "running":
                db.fail(key, f"job ended without a result: {type(res).__name__}: {res}")
            res = {"status": "failed", "error": f"job ended without a result: {type(res).__name__}: {first}"}
        if res.get("status") == "done":
            counts["done"] += 1
            if not res.get("skipped"):
                progress.durations.append(secs)
            note = f"done {label} in {secs:.0f}s"
        else:
            counts["failed"] += 1
            report.errors[key] = res.get("error", res.get("status"))
            note = f"FAILED {label}: {report.errors[key]}"
        progress.show(counts["done"], running, counts["failed"], note)

    from .jobs import run_job

    progress.show(0, 0, counts["failed"])
    _pool(ex, [(c.key, run_job, (c.key, db.url, str(results_dir), cpus)) for c in runnable], slots,
          cell_done, cell_submitted)
    progress.close()
    report.done = counts["done"]
    report.failed = counts["failed"]
    report.wall_s = time.time() - t_start
    out.write(f"grid {grid.name}: {report.done} done, {report.failed} failed, "
              f"{report.already_done} were already done ({report.wall_s:.0f}s)\n")
    return report
