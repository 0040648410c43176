"""The job: one grid cell from claim to committed result.

``run_job`` claims the cell in the database (atomically: two launchers never train it twice),
keeps a heartbeat, trains (resuming from the last atomic checkpoint), samples, evaluates, and
commits final metrics + artifacts + ``done`` in one transaction. Any exception ends the run as
``failed`` with its traceback; nothing half-written is ever marked done.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import socket
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import RunSpec, content_hash
from .db import Database
from .utils import atomic_torch_save, pick_device, seed_everything, torch_load

log = logging.getLogger("ablate.job")
HEARTBEAT_S = 20.0


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


def images_key(spec: RunSpec) -> str:
    """Key of the *images* of a dataset: the caption shuffle control shares images, tokenizer, judge."""
    return content_hash(spec.data.model_dump(mode="json", exclude={"shuffle_captions"}))


@dataclass
class Prepared:
    """What every cell on the same data and tokenizer shares (all of it cached on disk)."""

    splits: Any  # DatasetSplits (captions possibly shuffled for the control)
    vq: Any  # VQVAE
    tok_key: str
    codes: dict[str, torch.Tensor]  # split -> [n, L] long
    judge: Any  # Judge | None
    metrics: dict[str, float]  # tokenizer and judge quality


PREP_PARTS = ("tokenizer", "judge")


def prepare(spec: RunSpec, results_dir: Path, device: torch.device, say: Callable[[str], None] = print,
            parts: tuple[str, ...] = PREP_PARTS) -> Prepared:
    """Dataset -> VQ tokenizer -> token cache, and the dataset's judge; trained once, then cached.

    ``parts`` limits the work to some of the pieces (the scheduler builds them as parallel jobs).
    """
    from .data import load_dataset
    from .eval import get_judge, judge_report
    from .tokenizer import get_tokenizer, tokenize_cached

    splits = load_dataset(spec.data, results_dir)
    vq, tok_key, codes, judge, metrics = None, "", {}, None, {}
    if "tokenizer" in parts:
        # keyed by the images alone: the shuffled-caption control shares the tokenizer
        vq, tok_metrics, tok_key = get_tokenizer(spec.tokenizer, splits.image_key, splits.train.images,
                                                 splits.val.images, results_dir, device, log=say)
        codes = {name: tokenize_cached(vq, tok_key, name, getattr(splits, name).images, results_dir).flatten(1)
                 for name in ("train", "val", "test")}
        metrics.update(tok_metrics)
    if "judge" in parts:
        # the judge learns what the images show (``labels``), never the (maybe shuffled) captions
        judge = get_judge(splits, spec.eval, results_dir, device, log=say)
        if judge is not None and "tokenizer" in parts:
            metrics.update(judge_report(splits, judge, spec.eval, device))
            metrics.update(tokenizer_ceiling(spec, splits, vq, codes["test"], judge, device))
    return Prepared(splits, vq, tok_key, codes, judge, metrics)


def tokenizer_ceiling(spec: RunSpec, splits: Any, vq: Any, test_codes: torch.Tensor, judge: Any,
                      device: torch.device) -> dict[str, float]:
    """The judge's scores on the tokenizer's reconstructions of real test images: the best a
    generator over these tokens can reach (``tok_align_acc``, ``tok_fid_domain``, ...)."""
    from .eval import evaluate_images

    n = min(spec.eval.n_images, len(splits.test))
    recon = vq.decode(test_codes[:n].view(n, *vq.grid))
    attrs = splits.test.attrs[:n] if splits.test.attrs is not None else None
    scores = evaluate_images(recon, splits.test.captions[:n], attrs, splits.test, judge, spec.eval, device)
    return {f"tok_{k}": v for k, v in scores.items() if k.startswith(("align_acc", "fid_domain"))}


@dataclass
class Result:
    final: dict[str, float] = field(default_factory=dict)
    artifacts: list[tuple[str, str]] = field(default_factory=list)
    first_step_at: Optional[float] = None  # wall clock at this attempt's first / after its last step
    last_step_at: Optional[float] = None


class Heartbeat:
    """Background thread that touches the run's heartbeat so a dead job is seen as lost."""

    def __init__(self, db: Database, key: str, every_s: float = HEARTBEAT_S):
        self.db, self.key, self.every = db, key, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"heartbeat-{key}")

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.db.heartbeat(self.key)
            except Exception as exc:  # a transient DB error must not kill training
                log.warning("heartbeat failed: %s", exc)

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


def job_id_here() -> str:
    """This job's id with its scheduler, stable across a Slurm requeue: ``slurm:<array>_<task>``
    (``slurm:<id>`` outside arrays), ``local:<pid>`` for submitit's local jobs (the pid of the
    process that trains, not of submitit's controller above it), ``proc:<pid>`` for a job run in
    the driver's process."""
    env = os.environ
    executor = env.get("SUBMITIT_EXECUTOR", "")
    if executor == "slurm":
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return f"slurm:{env.get('SLURM_JOB_ID', '?')}"
    if executor == "local":
        return f"local:{os.getpid()}"
    return f"proc:{os.getpid()}"


class Pruned(Exception):
    """Raised by an ``on_metrics`` hook to stop a run early (an Optuna pruner's verdict): the
    run ends ``pruned``, not ``failed``, and keeps its last checkpoint."""

    def __init__(self, step: int, reason: str = ""):
        super().__init__(reason or f"pruned at step {step}")
        self.step = step


def run_job(key: str, db_url: str, results_dir: str, threads: int = 1,
            submitted_at: Optional[float] = None,
            on_metrics: Optional[Callable[[list[tuple[str, Optional[int], float]]], None]] = None
            ) -> dict[str, Any]:
    """Entry point of a submitted job. Returns ``{"key", "status", ...}``; never raises for a
    failure of the run itself (that is recorded in the database).

    ``on_metrics`` (a study's trial) sees every batch of curve rows once they are written; it may
    raise :class:`Pruned` to stop training there (status ``pruned``, ``{"step": ...}`` returned).

    A job that Slurm restarts after a requeue finds its run still ``running`` under its own job
    id and takes it back; a preemption signal stops training at the next step boundary with a
    checkpoint, marks the run ``pending`` and hands over to submitit, which requeues the job."""
    from . import preempt
    from .train import Interrupted

    torch.set_num_threads(max(1, threads))
    db = Database(db_url, create=False)
    try:
        run = db.run(key)
        if run is None:
            return {"key": key, "status": "missing"}
        if run.status == "done":
            return {"key": key, "status": "done", "skipped": True}
        job_id = job_id_here()
        if not db.claim(key, job_id=job_id):
            return {"key": key, "status": db.run(key).status, "skipped": True}
        preempt.install()
        db.set_code_rev(key, code_revision())
        spec = RunSpec.model_validate(run.spec)
        t0 = time.time()
        try:
            with Heartbeat(db, key):
                result = train_and_evaluate(spec, key, db, Path(results_dir), interrupt=preempt.requested,
                                            on_metrics=on_metrics)
            result.final["wall_s"] = time.time() - t0
            # the harness's own cost around the work: process start to the first training step
            # (interpreter, imports, claim, caches, model build), the wait before it (queue_s:
            # the slot pool or Slurm's queue), and after the last step (sampling, evaluation and
            # the result commit, logged once committed)
            started = process_started_at()
            if started is not None and result.first_step_at is not None:
                result.final["overhead_start_s"] = result.first_step_at - started
            if submitted_at is not None and started is not None:
                result.final["queue_s"] = max(0.0, started - submitted_at)
            t_commit = time.time()
            db.finish(key, result.final, result.artifacts)
            now = time.time()
            after = [("commit_s", None, now - t_commit)]
            if result.last_step_at is not None:
                after.append(("overhead_end_s", None, now - result.last_step_at))
            if submitted_at is not None:
                after.append(("job_span_s", None, now - submitted_at))  # submitted -> committed
            db.log_metrics(key, after)
            # only once the result is committed is the training checkpoint dispensable
            (run_dir(Path(results_dir), key) / "ckpt.pt").unlink(missing_ok=True)
            return {"key": key, "status": "done", "wall_s": result.final["wall_s"]}
        except Pruned as exc:
            db.set_status(key, "pruned", str(exc))
            return {"key": key, "status": "pruned", "step": exc.step, "error": str(exc)}
        except Interrupted as exc:
            db.set_status(key, "pending", f"preempted at step {exc.step}: checkpoint saved, job requeued")
            why = preempt.hand_over()  # submitit: checkpoint(), requeue, exit
            return {"key": key, "status": "pending", "error": f"interrupted ({why})"}
        except BaseException as exc:  # also KeyboardInterrupt / SystemExit from a timeout signal
            db.fail(key, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            if not isinstance(exc, Exception):
                raise
            return {"key": key, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        db.close()


class CellJob:
    """The submitted callable: :func:`run_job`, checkpointable for submitit (on a time limit or
    preemption the same call is requeued; the run resumes from its training checkpoint)."""

    def __init__(self) -> None:
        self.submitted_at = time.time()  # pickled with the job: the driver's submission time

    def __call__(self, key: str, db_url: str, results_dir: str, threads: int = 1) -> dict[str, Any]:
        return run_job(key, db_url, results_dir, threads, submitted_at=self.submitted_at)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def peak_mem_mb(device: torch.device) -> float:
    """Peak memory of this job: CUDA allocator peak on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_and_evaluate(spec: RunSpec, key: str, db: Database, results_dir: Path,
                       interrupt: Callable[[], bool] = lambda: False,
                       on_metrics: Optional[Callable[[list], None]] = None) -> Result:
    """Train the cell's generator, sample the test captions, evaluate; return final metrics.
    ``on_metrics`` sees each batch of curve rows after it is written (see :func:`run_job`)."""
    from .train import Trainer

    device = pick_device(spec.train.device)
    seed_everything(spec.seed)
    def say(msg: str) -> None:  # stdout is the job's log (submitit keeps it per job)
        print(f"{time.strftime('%H:%M:%S')} [{key[:8]}] {msg}", flush=True)

    prep = prepare(spec, results_dir, device, say)
    def log_metrics(rows: list) -> None:
        db.log_metrics(key, rows)
        if on_metrics is not None:
            on_metrics(rows)

    trainer = Trainer(spec, prep, device, run_dir(results_dir, key),
                      log_metrics=log_metrics, say=say, interrupt=interrupt)
    if trainer.step == 0:
        db.clear_curves(key)
    trainer.train()
    final = dict(prep.metrics)
    final.update(trainer.final_metrics())
    final.update(trainer.evaluate())
    final["peak_mem_mb"] = peak_mem_mb(device)
    bad = {k: v for k, v in final.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"non-finite final metrics: {bad}")
    return Result(final, trainer.artifacts(), trainer.first_step_at, trainer.last_step_at)
