"""Launch a grid's cells as submitit jobs, with live progress.

Executors: ``local`` (processes on this machine), ``slurm`` (one job array per stage, settings
from the grid's ``launcher.slurm``), ``debug`` (in this process), ``auto`` (slurm when ``sbatch``
is on PATH, else local). submitit's LocalExecutor starts every submitted job at once and gives
every GPU job GPU 0, so for local jobs the pool of slots is ours: a cell is submitted only when a
slot is free, and on a machine with GPUs each slot owns one GPU. On Slurm the array's
parallelism is Slurm's. Shared preparation (dataset, VQ tokenizer, token cache, judge) runs
first as one job per distinct preparation, so concurrent cells never race to train the same
tokenizer.

A job that ends without a result (killed, out of memory, node lost) leaves its run ``lost``:
the next ``ablate run`` resumes it from its checkpoint. Slurm without accounting (no sacct) is
normal on small clusters, so a job's end is read from squeue and its result file.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

from .config import LauncherSpec
from .db import Database
from .db.store import ENV_URL
from .grid import Cell, Grid
from .prep_jobs import encode_tasks, run_preparation
from .prepare import prep_key

EXECUTORS = ("local", "slurm", "debug", "auto")


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


# glibc returns large freed blocks to the OS at once by default, so every training step of a
# CPU job page-faults its big temporaries afresh (measured: 5k-40k faults and ~10% of a Mamba
# step); raising the thresholds keeps them in the heap. Applied to local jobs unless set.
LOCAL_JOB_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


@contextlib.contextmanager
def job_env(db_url: str) -> Iterator[None]:
    """Jobs submitted inside inherit ``$ABLATE_DB_URL = db_url`` (local processes copy this
    environment; sbatch exports it; the debug executor runs here): the URL, password included,
    never enters a pickled job file or a log. The previous value is restored afterwards."""
    before = os.environ.get(ENV_URL)
    os.environ[ENV_URL] = db_url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_URL, None)
        else:
            os.environ[ENV_URL] = before


def resolve_executor(kind: str) -> str:
    """``auto`` -> ``slurm`` when ``sbatch`` is on PATH, else ``local``."""
    if kind == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if kind not in EXECUTORS:
        raise ValueError(f"--executor: unknown executor {kind!r}; accepted: {', '.join(EXECUTORS)}")
    return kind


def job_result(job: Any) -> Any:
    """A submitted job's result: rank 0's where the job ran several tasks (one cell over DDP
    ranks; the other ranks' results are informative only)."""
    return job.results()[0] if getattr(job, "num_tasks", 1) > 1 else job.result()


def local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def cell_tasks(kind: str, launcher: LauncherSpec) -> tuple[int, int]:
    """(nodes, tasks per node) of one cell's job: one process per GPU on Slurm with GPUs, else
    ``launcher.tasks_per_job`` (locally one node)."""
    if kind == "slurm":
        sl = launcher.slurm
        return sl.nodes, (sl.gpus_per_job if sl.gpus_per_job else launcher.tasks_per_job)
    return 1, (launcher.tasks_per_job if kind == "local" else 1)


def slurm_parameters(folder: Path, launcher: LauncherSpec, tasks: tuple[int, int] = (1, 1)) -> dict[str, Any]:
    """submitit ``SlurmExecutor.update_parameters`` arguments from the grid's ``launcher.slurm``;
    ``tasks``: (nodes, tasks per node) of the jobs (a cell across several GPUs or nodes)."""
    sl = launcher.slurm
    params: dict[str, Any] = {
        "time": sl.time_min, "cpus_per_task": sl.cpus_per_job, "mem": f"{sl.mem_gb}GB",
        "array_parallelism": sl.array_parallelism, "job_name": f"ablate-{folder.name}",
        "signal_delay_s": 120, "setup": [f"export {k}={v}" for k, v in LOCAL_JOB_ENV.items()]}
    if sl.gpus_per_job:
        params["gpus_per_node"] = sl.gpus_per_job
    if tasks != (1, 1):
        params.update(nodes=tasks[0], ntasks_per_node=tasks[1])
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(sl, name):
            params[name] = getattr(sl, name)
    if sl.extra:
        params["additional_parameters"] = dict(sl.extra)
    return params


def make_executor(kind: str, folder: Path, launcher: LauncherSpec, gpu: Optional[int] = None,
                  tasks: tuple[int, int] = (1, 1)):
    """A submitit executor for ``kind`` with the launcher's settings. ``gpu``: the one device a
    local job may see (one job per GPU); ``tasks``: (nodes, tasks per node) of each job."""
    import submitit

    if kind == "local":
        for k, v in LOCAL_JOB_ENV.items():
            os.environ.setdefault(k, v)  # inherited by the job processes submitit starts
        ex = submitit.LocalExecutor(folder=str(folder / "%j"))
        params: dict[str, Any] = {"timeout_min": launcher.timeout_min}
        if tasks[1] > 1:
            params["tasks_per_node"] = tasks[1]
        if gpu is not None:
            params.update(gpus_per_node=1, visible_gpus=(gpu,))
        ex.update_parameters(**params)
    elif kind == "debug":
        ex = submitit.DebugExecutor(folder=str(folder / "%j"))
        ex.update_parameters(timeout_min=launcher.timeout_min)
    elif kind == "slurm":
        ex = submitit.SlurmExecutor(folder=str(folder / "%j"))
        ex.update_parameters(**slurm_parameters(folder, launcher, tasks))
    else:
        raise ValueError(f"--executor: unknown executor {kind!r}; accepted: {', '.join(EXECUTORS)}")
    return ex


def slurm_active(job_ids: list[str]) -> Optional[set[str]]:
    """Job ids (``123`` or ``123_4``) Slurm still knows as queued or running, from squeue (no
    accounting needed); None if squeue could not be asked."""
    mains = sorted({j.split("_")[0] for j in job_ids})
    if not mains:
        return set()
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(mains)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue rejects ids that have left the system entirely: then none of them is active
        return set() if "Invalid job id" in out.stderr else None
    active = set()
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                  "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"):
            active.add(parts[0])
    return active


def _wait_slurm(jobs: dict[str, Any], on_done, poll_s: float = 2.0, grace_s: float = 15.0) -> None:
    """Wait for submitted Slurm jobs; ``on_done(name, result_or_exception, seconds, running)``.
    A job is over when its result file exists, or when squeue no longer lists it and no result
    file appeared within ``grace_s`` (killed: the exception says so)."""
    t0 = time.time()
    left = dict(jobs)
    gone_since: dict[str, float] = {}
    while left:
        active = slurm_active([j.job_id for j in left.values()])
        for name, job in list(left.items()):
            if job.paths.result_pickle.exists():
                try:
                    res: Any = job_result(job)
                except Exception as exc:
                    res = exc
            elif active is not None and job.job_id not in active:
                first = gone_since.setdefault(name, time.time())
                if time.time() - first < grace_s:
                    continue
                res = RuntimeError(f"Slurm job {job.job_id} left the queue without a result "
                                   f"(killed, cancelled, or out of memory; see {job.paths.stderr})")
            else:
                gone_since.pop(name, None)
                continue
            del left[name]
            on_done(name, res, time.time() - t0, len(left))
        if left:
            time.sleep(poll_s)


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


def _pool(executors: list, tasks: list[tuple[str, Any, tuple]], slots: int, on_done, on_submit=None,
          poll_s: float = 0.5) -> None:
    """Run ``tasks`` (name, fn, args) with at most ``slots`` in flight; slot ``i`` submits through
    ``executors[i]`` when there is one executor per slot (one GPU each), else through
    ``executors[0]``. ``on_done(name, result_or_exception, seconds, running)`` as each finishes."""
    queue = list(tasks)
    running: dict[str, tuple[Any, float, int]] = {}
    free = list(range(slots))
    while queue or running:
        while queue and free:
            name, fn, args = queue.pop(0)
            slot = free.pop(0)
            ex = executors[slot] if len(executors) > 1 else executors[0]
            if hasattr(fn, "submitted_at"):
                fn.submitted_at = time.time()  # the queue wait starts now, not when the task was listed
            running[name] = (ex.submit(fn, *args), time.time(), slot)
            if on_submit:
                on_submit(name, len(running))
        for name, (job, t0, slot) in list(running.items()):
            if job.done():
                try:
                    res: Any = job_result(job)
                except Exception as exc:  # the job process died or submitit failed
                    res = exc
                del running[name]
                free.append(slot)
                on_done(name, res, time.time() - t0, len(running))
        if running:
            time.sleep(poll_s)


class _Runner:
    """Submits a stage's tasks on one executor kind and calls back as each ends."""

    def __init__(self, kind: str, folder: Path, launcher: LauncherSpec, slots: int, db: Database,
                 tasks: tuple[int, int] = (1, 1)):
        self.kind, self.slots, self.db = kind, slots, db
        gpus = local_gpus() if kind == "local" and tasks[1] == 1 else 0
        if gpus:
            self.slots = min(slots, gpus)
            self.executors = [make_executor(kind, folder, launcher, gpu=i) for i in range(self.slots)]
        else:
            self.executors = [make_executor(kind, folder, launcher, tasks=tasks)]

    def run(self, tasks: list[tuple[str, Any, tuple]], on_done, on_submit=None, record_ids: bool = False) -> None:
        if self.kind != "slurm":
            _pool(self.executors, tasks, self.slots, on_done, on_submit)
            return
        ex = self.executors[0]
        with ex.batch():  # one job array for the whole stage
            submitted = [(name, ex.submit(fn, *args)) for name, fn, args in tasks]
        jobs = {name: job for name, job in submitted}
        if record_ids:
            self.db.set_job_ids({name: f"slurm:{job.job_id}" for name, job in jobs.items()})
        if on_submit:
            on_submit(None, len(jobs))
        _wait_slurm(jobs, on_done)


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
    kind = resolve_executor(executor or grid.launcher.executor)
    slots = 1 if kind == "debug" else (jobs or grid.launcher.jobs)
    cpus = grid.launcher.slurm.cpus_per_job if kind == "slurm" else grid.launcher.cpus_per_job
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
    runner = _Runner(kind, folder, grid.launcher, slots, db)
    where = f"{runner.slots} slot(s)" if kind != "slurm" else "one job array per stage"
    out.write(f"grid {grid.name}: {len(todo)} of {report.total} cells to run "
              f"({report.already_done} already done) on executor '{kind}' with {where}\n")

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
    tasks = cell_tasks(kind, grid.launcher)
    cells = runner
    if tasks != (1, 1):  # one cell across several processes (DDP): its own executor, and its slots
        ranks = tasks[0] * tasks[1]
        cells = _Runner(kind, folder, grid.launcher, max(1, runner.slots // ranks), db, tasks)
        out.write(f"each cell runs as {ranks} processes ({tasks[0]} node(s) x {tasks[1]} task(s))\n")
    with job_env(db.url):  # the jobs read the URL from their environment: no password in job files
        cells.run([(c.key, CellJob(), (c.key, str(results_dir), cpus)) for c in runnable],
                  cell_done, cell_submitted, record_ids=True)
    progress.close()
    report.done = counts["done"]
    report.failed = counts["failed"]
    report.lost = counts["lost"]
    report.wall_s = time.time() - t_start
    out.write(f"grid {grid.name}: {report.done} done, {report.failed} failed, "
              + (f"{report.lost} lost (run again to resume), " if report.lost else "")
              + f"{report.already_done} were already done ({report.wall_s:.0f}s)\n")
    return report
