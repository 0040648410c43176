"""The job: one grid cell from claim to committed result.

``run_job`` claims the cell in the database (atomically: two launchers never train it twice) and
gets the claim's token; keeps a heartbeat; trains (resuming from the furthest checkpoint),
samples, evaluates, and commits final metrics + artifacts + ``done`` in one transaction. Every
write is conditioned on the token: once the run was marked lost and claimed by another attempt,
this one stops at its next step boundary and writes nothing more. Any exception ends the run as
``failed`` with its traceback; nothing half-written is ever marked done.

The database URL comes from the job's environment (``$ABLATE_DB_URL``, set by the launcher),
never from its pickled arguments: submitit's job files sit on a shared filesystem.
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import RunSpec
from .db import Database
from .db.store import ENV_URL, DBError, NotOwner
from .dist import SINGLE, Dist, TorchDist
from .launch import job_id_here
from .prepare import CELL_PARTS, prepare
from .utils import pick_device, seed_everything

log = logging.getLogger("ablate.job")
# seconds between heartbeats; a run is lost after launcher.lost_after_s without one
HEARTBEAT_S = float(os.environ.get("ABLATE_HEARTBEAT_S", "20"))


def code_revision() -> str:
    """The git commit of the code that runs (``+dirty`` when the tree has changes), else the version."""
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from . import __version__
    return f"v{__version__}"


@dataclass
class Result:
    final: dict[str, float] = field(default_factory=dict)
    artifacts: list[tuple[str, str]] = field(default_factory=list)
    first_step_at: Optional[float] = None  # wall clock at this attempt's first / after its last step
    last_step_at: Optional[float] = None


class Heartbeat:
    """Background thread that touches the run's heartbeat so a dead job is seen as lost. When a
    heartbeat finds the run no longer owned by this attempt, :attr:`taken` is set and beating stops."""

    def __init__(self, db: Database, key: str, token: str, every_s: float = HEARTBEAT_S):
        self.db, self.key, self.token, self.every = db, key, token, every_s
        self.taken = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"heartbeat-{key}")

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if not self.db.heartbeat(self.key, self.token):
                    log.warning("run %s was taken by another attempt: this one stops", self.key)
                    self.taken.set()
                    return
            except Exception as exc:  # a transient DB error must not kill training
                log.warning("heartbeat failed: %s", exc)

    def check(self) -> None:
        """Raise :class:`NotOwner` if a heartbeat found the run taken."""
        if self.taken.is_set():
            raise NotOwner(f"run {self.key}: taken by another attempt (this attempt's heartbeat "
                           "matched no row); stopping without writing")

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_dir(results_dir: Path, key: str) -> Path:
    return Path(results_dir) / "runs" / key


def process_started_at() -> Optional[float]:
    """Wall-clock time this process started (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class Pruned(Exception):
    """Raised by an ``on_metrics`` hook to stop a run early (an Optuna pruner's verdict): the
    run ends ``pruned``, not ``failed``, and keeps its last checkpoint."""

    def __init__(self, step: int, reason: str = ""):
        super().__init__(reason or f"pruned at step {step}")
        self.step = step


def job_db_url(db_url: Optional[str] = None) -> str:
    """The database URL of a job: given (in-process callers), else ``$ABLATE_DB_URL``."""
    url = db_url or os.environ.get(ENV_URL)
    if not url:
        raise DBError(f"job: no database URL (the launcher passes it in ${ENV_URL}; set it, or pass --db)")
    return url


def run_job(key: str, db_url: Optional[str], results_dir: str, threads: int = 1,
            submitted_at: Optional[float] = None,
            on_metrics: Optional[Callable[[list[tuple[str, Optional[int], float]]], None]] = None
            ) -> dict[str, Any]:
    """Entry point of a submitted job. Returns ``{"key", "status", ...}``; never raises for a
    failure of the run itself (that is recorded in the database). ``db_url`` None: from the
    environment (:func:`job_db_url`).

    ``on_metrics`` (a study's trial) sees every batch of curve rows once they are written; it may
    raise :class:`Pruned` to stop training there (status ``pruned``, ``{"step": ...}`` returned).

    A job that Slurm restarts after a requeue finds its run still ``running`` under its own job
    id and takes it back; a preemption signal (during preparation, training, sampling or
    evaluation) stops the job at the next safe point with a checkpoint, marks the run ``pending``
    and hands over to submitit, which requeues the job. A job whose run was taken by another
    attempt returns ``{"status": "taken"}`` having written nothing after it found out."""
    from . import preempt
    from .fingerprint import variant_fingerprint
    from .train import Interrupted

    torch.set_num_threads(max(1, threads))
    db = Database(job_db_url(db_url), create=False)
    dist = SINGLE
    try:
        run = db.run(key)
        if run is None:
            return {"key": key, "status": "missing"}
        spec = RunSpec.model_validate(run.spec)
        dist = job_dist(spec)
        if not dist.main:  # the other ranks never write: rank 0 tells them whether to train
            return follow(key, spec, Path(results_dir), dist)
        if run.status == "done":
            dist.broadcast_object(False)
            return {"key": key, "status": "done", "skipped": True}
        job_id = job_id_here()
        token = db.claim(key, job_id=job_id)
        dist.broadcast_object(token is not None)
        if token is None:
            return {"key": key, "status": db.run(key).status, "skipped": True}
        preempt.install()
        t0 = time.time()
        try:
            db.set_provenance(key, token, code_revision(), variant_fingerprint(spec.model.variant))
            with Heartbeat(db, key, token) as hb:
                def interrupt() -> bool:  # asked at every safe point
                    hb.check()
                    return preempt.requested()

                result = train_and_evaluate(spec, key, db, token, Path(results_dir), interrupt=interrupt,
                                            on_metrics=on_metrics, dist=dist)
                hb.check()
            result.final["wall_s"] = time.time() - t0
            # the harness's own cost around the work: process start to the first training step
            # (interpreter, imports, claim, caches, model build), the wait before it (queue_s:
            # the slot pool or Slurm's queue), and after the last step (sampling, evaluation and
            # the result commit, up to the commit: written in the same transaction as ``done``)
            started = process_started_at()
            if started is not None and result.first_step_at is not None:
                result.final["overhead_start_s"] = result.first_step_at - started
            if submitted_at is not None and started is not None:
                result.final["queue_s"] = max(0.0, started - submitted_at)
            t_commit = time.time()

            def late() -> dict[str, float]:
                now = time.time()
                out = {"commit_s": now - t_commit}  # writing the result rows (the COMMIT aside)
                if result.last_step_at is not None:
                    out["overhead_end_s"] = now - result.last_step_at
                if submitted_at is not None:
                    out["job_span_s"] = now - submitted_at  # submitted -> committed
                return out

            db.finish(key, result.final, result.artifacts, token=token, late=late)
            # only once the result is committed are the training checkpoints dispensable
            from .train import remove_checkpoints

            remove_checkpoints(run_dir(Path(results_dir), key))
            return {"key": key, "status": "done", "wall_s": result.final["wall_s"]}
        except NotOwner as exc:
            log.warning("%s", exc)
            return {"key": key, "status": "taken", "error": str(exc)}
        except Pruned as exc:
            db.release(key, token, "pruned", str(exc))
            return {"key": key, "status": "pruned", "step": exc.step, "error": str(exc)}
        except Interrupted as exc:
            if not db.release(key, token, "pending", f"preempted at step {exc.step}: checkpoint saved, job requeued"):
                return {"key": key, "status": "taken", "error": "preempted after the run was taken"}
            why = preempt.hand_over()  # submitit: checkpoint(), requeue, exit
            return {"key": key, "status": "pending", "error": f"interrupted ({why})"}
        except BaseException as exc:  # also KeyboardInterrupt / SystemExit from a timeout signal
            if dist.world > 1 and peer_lost(exc):  # another rank died: resumable, not the run's fault
                why = f"a rank of the {dist.world} was lost ({type(exc).__name__}: {str(exc)[:300]}); resumable"
                db.release(key, token, "lost", why)
                return {"key": key, "status": "lost", "error": why}
            db.fail(key, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", token)
            if not isinstance(exc, Exception):
                raise
            return {"key": key, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        db.close()
        dist.close()


def job_dist(spec: RunSpec) -> Dist:
    """This job's ranks: one process, or the tasks the launcher started for the cell (submitit's
    ``tasks_per_node``, locally or on Slurm), joined into a process group (gloo on CPU, NCCL on
    CUDA) whose collectives time out after ``$ABLATE_DIST_TIMEOUT_S`` (default 1800 s), so that
    the ranks of a cell whose peer died exit instead of hanging."""
    try:
        import submitit

        env = submitit.JobEnvironment()
        n = env.num_tasks
    except Exception:  # not inside a submitit job (in-process callers, tests): one process
        return SINGLE
    if n <= 1:
        return SINGLE
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    device = pick_device(spec.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    return TorchDist(float(os.environ.get("ABLATE_DIST_TIMEOUT_S", "1800")), device.type)


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank is gone (its process
    died: the connection closed, or the collective timed out)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "connection closed", "connection reset", "timed out", "timeout", "broken pipe", "gloo", "nccl",
        "distbackenderror"))


def follow(key: str, spec: RunSpec, results_dir: Path, dist: Dist) -> dict[str, Any]:
    """A rank other than 0: train and sample the cell with the others if rank 0 claimed it;
    never touches the database. Its exit status is informative only: rank 0 records the run."""
    from . import preempt
    from .train import Interrupted

    if not dist.broadcast_object(None):
        return {"key": key, "status": "skipped", "rank": dist.rank}
    preempt.install()
    try:
        train_and_evaluate(spec, key, None, None, results_dir, interrupt=preempt.requested, dist=dist)
        return {"key": key, "status": "done", "rank": dist.rank}
    except Interrupted as exc:
        return {"key": key, "status": "pending", "rank": dist.rank, "error": f"interrupted at step {exc.step}"}
    except Exception as exc:  # rank 0 decides what the run's status is
        return {"key": key, "status": "failed", "rank": dist.rank, "error": f"{type(exc).__name__}: {exc}"}


class CellJob:
    """The submitted callable: :func:`run_job`, checkpointable for submitit (on a time limit or
    preemption the same call is requeued; the run resumes from its training checkpoint)."""

    def __init__(self) -> None:
        self.submitted_at = time.time()  # pickled with the job: the driver's submission time

    def __call__(self, key: str, results_dir: str, threads: int = 1) -> dict[str, Any]:
        # the database URL comes from the environment, never from these (pickled) arguments
        return run_job(key, None, results_dir, threads, submitted_at=self.submitted_at)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def train_and_evaluate(spec: RunSpec, key: str, db: Optional[Database], token: Optional[str], results_dir: Path,
                       interrupt: Callable[[], bool] = lambda: False,
                       on_metrics: Optional[Callable[[list], None]] = None, dist: Dist = SINGLE) -> Result:
    """Train the cell's generator, sample the test captions, evaluate; return final metrics.
    ``on_metrics`` sees each batch of curve rows after it is written (see :func:`run_job`).
    With several ranks (``dist``) every rank trains and samples; rank 0 alone prepares first
    (the others then load its caches), writes, evaluates and returns the metrics (the others
    return an empty result, and ``db`` is None there)."""
    from .train import Interrupted, Trainer

    device = pick_device(spec.train.device)
    seed_everything(spec.seed)
    def say(msg: str) -> None:  # stdout is the job's log (submitit keeps it per job)
        print(f"{time.strftime('%H:%M:%S')} [{key[:8]}] {msg}", flush=True)

    def safe_point() -> None:
        if interrupt():
            raise Interrupted(0)

    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if not dist.main:
        dist.barrier()  # rank 0 has prepared (built and cached everything)
    # the other ranks train and sample: they load the data and tokens, never the judges
    parts = CELL_PARTS if dist.main else tuple(p for p in CELL_PARTS if p != "judge")
    prep = prepare(spec, results_dir, device, say, parts=parts, safe_point=safe_point)
    if dist.main and dist.world > 1:
        dist.barrier()
    safe_point()

    def log_metrics(rows: list) -> None:
        if db is None:
            return
        db.log_metrics(key, rows, token)
        if on_metrics is not None:
            on_metrics(rows)

    trainer = Trainer(spec, prep, device, run_dir(results_dir, key), log_metrics=log_metrics, say=say,
                      interrupt=interrupt, attempt=token[:12] if token else None, dist=dist)
    if trainer.step == 0 and db is not None:
        db.clear_curves(key, token)
    trainer.train()
    trainer.safe_point()
    final = dict(prep.metrics)
    final.update(trainer.final_metrics())
    final.update(trainer.evaluate())
    if not dist.main:
        return Result()
    trainer.safe_point(collective=False)
    bad = {k: v for k, v in final.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"non-finite final metrics: {bad}")
    return Result(final, trainer.artifacts(), trainer.first_step_at, trainer.last_step_at)
