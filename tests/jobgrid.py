"""Shared by the fault and Slurm tests: a small real grid, the CLI as a subprocess, DB polling."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from ablate.db import Database, DBError

GRID = """
name: {name}
base:
  data: {{name: shapes, image_size: 16, n_train: 512, n_val: 64, n_test: 64}}
  tokenizer: {{codebook_size: 32, code_dim: 8, hidden: 16, downsample: 4, steps: 30, batch_size: 32}}
  text: {{encoder: learned, max_len: 10, width: 32}}
  model: {{width: {width}, depth: {depth}, heads: 2}}
  train: {{steps: {steps}, batch_size: {batch}, warmup_steps: 5, log_every: 10, eval_every: 50, checkpoint_every: {ckpt}, throughput_warmup: 1}}
  sample: {{steps: 3, batch_size: 32}}
  eval: {{n_images: 32, judge_steps: 30, clip_steps: 30}}
{axes}seeds: [0]
launcher: {launcher}
"""
LOCAL = "{executor: local, jobs: 2, cpus_per_job: 1, timeout_min: 20}"


def slurm_launcher(partition: str) -> str:
    return ("{executor: slurm, timeout_min: 20, slurm: {partition: %s, gpus_per_job: 0, cpus_per_job: 1, "
            "mem_gb: 2, time_min: 20}}" % partition)


def write_grid(path: Path, name: str, launcher: str = LOCAL, variants=("transformer",), steps: int = 20,
               ckpt: int = 25, width: int = 32, depth: int = 1, batch: int = 8, extra: str = "") -> Path:
    """A grid over ``variants`` (no axis when ``extra`` brings its own zip)."""
    axes = extra if extra else f"axes:\n  model.variant: {list(variants)}\n"
    path.write_text(GRID.format(name=name, launcher=launcher, axes=axes, steps=steps, ckpt=ckpt, width=width,
                                depth=depth, batch=batch))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ablate.cli", *args]


def start_run(grid: Path, results: Path, db_url: str) -> subprocess.Popen:
    """``ablate run`` as a separate driver process (output captured)."""
    return subprocess.Popen(cli("run", str(grid), "--results", str(results), "--db", db_url, "--no-table"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@contextlib.contextmanager
def driving(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """The driver process for the block; killed if the block leaves it running (a failed test)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def local_job_running(run) -> bool:
    """Predicate for :func:`poll_run`: a run some local job is training."""
    return run.status == "running" and (run.job_id or "").startswith("local:")


def poll_run(db_url: str, predicate: Callable, timeout: float = 300) -> tuple[str, Optional[str]]:
    """Wait until some run satisfies ``predicate``; its (key, job id). Tolerates a database the
    driver has not created or migrated yet."""
    from sqlalchemy import select

    from ablate.db import Run

    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            db = Database(db_url, create=False)
        except DBError:
            time.sleep(0.2)
            continue
        try:
            with db.tx() as s:
                for run in s.scalars(select(Run)):
                    if predicate(run):
                        return run.key, run.job_id
        except Exception:
            pass
        finally:
            db.close()
        time.sleep(0.2)
    raise AssertionError("condition never met")


def wait_for(path: Path, timeout: float = 300) -> None:
    """Wait until ``path`` exists (a glob pattern in its last part: until one file matches)."""
    t0 = time.time()
    while not (any(path.parent.glob(path.name)) if "*" in path.name else path.exists()):
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def release_when_requeued(job_id: str, timeout: float = 120) -> None:
    """Requeued Slurm jobs wait ~2 min for their BeginTime; once the job is pending again, make it
    eligible now (``scontrol update StartTime=now``: what an impatient admin would do).

    Not in the same second as the requeue: slurmd revokes the killed instance's job credential
    with a time stamp of whole seconds, and an allocation whose credential falls in that second
    is refused ("Killing non-startable batch job: Job credential revoked"; the job then leaves
    the queue). Slurm's own requeue delay exists for this; the wait here is the least of it."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True).stdout
        if "PENDING" in st:
            time.sleep(2.0)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} was never requeued")
