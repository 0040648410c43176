"""Executors: where a stage's jobs run, one small class per kind (as submitit has one per
scheduler): ``local`` (processes on this machine), ``slurm`` (one job array per stage), ``debug``
(in the driver's process), and ``auto`` (slurm when ``sbatch`` is on PATH, else local).

Each class knows, for its kind: how to run a stage (slots, one GPU per local job, job arrays),
the task layout of a cell over several DDP ranks, the id of the job a process is, which recorded
ids are still alive, and how to cancel them. Nothing here imports torch or submitit at import time.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator, Optional

from ..config import LauncherSpec
from .base import LOCAL_JOB_ENV, Executor, JobRef, job_result
from .debug import DebugExecutor
from .local import LocalExecutor, local_gpus
from .slurm import SlurmExecutor, slurm_active, slurm_parameters

KINDS: dict[str, type[Executor]] = {c.kind: c for c in (LocalExecutor, SlurmExecutor, DebugExecutor)}
EXECUTORS = (*KINDS, "auto")

__all__ = ["EXECUTORS", "KINDS", "LOCAL_JOB_ENV", "DebugExecutor", "Executor", "JobRef", "LocalExecutor",
           "SlurmExecutor", "cancel", "executor", "job_env", "job_id_here", "job_result", "local_gpus", "resolve",
           "slurm_active", "slurm_parameters"]


def resolve(kind: str) -> str:
    """``auto`` -> ``slurm`` when ``sbatch`` is on PATH, else ``local``; other kinds checked."""
    if kind == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if kind not in KINDS:
        raise ValueError(f"--executor: unknown executor {kind!r}; accepted: {', '.join(EXECUTORS)}")
    return kind


def kind_of(kind: str) -> type[Executor]:
    return KINDS[resolve(kind)]


def executor(kind: str, folder: Path, launcher: LauncherSpec, slots: Optional[int] = None) -> Executor:
    """The executor of ``kind`` (``auto`` resolved) for one stage folder; ``slots``: concurrent
    jobs (default ``launcher.jobs``; Slurm's arrays ignore it, debug runs one)."""
    return kind_of(kind)(folder, launcher, slots)


def job_id_here() -> str:
    """This job's id with its scheduler, stable across a Slurm requeue: ``slurm:<array>_<task>``
    (``slurm:<id>`` outside arrays), ``local:<pid>`` for submitit's local jobs, ``proc:<pid>``
    for a job run in the driver's process."""
    for cls in (SlurmExecutor, LocalExecutor, DebugExecutor):
        found = cls.here(os.environ, os.getpid())
        if found:
            return found
    raise AssertionError("unreachable: the debug executor answers for every process")


def cancel(jobs: list[JobRef]) -> int:
    """Stop the recorded jobs, each through its kind; how many were stopped. Runs without a job
    id (never started) have nothing to stop."""
    host = socket.gethostname()
    by_prefix = {cls.prefix: cls for cls in KINDS.values()}
    stopped = 0
    for prefix, cls in by_prefix.items():
        mine = [j for j in jobs if j.prefix == prefix]
        if mine:
            stopped += cls.cancel(mine, host)
    return stopped


@contextlib.contextmanager
def job_env(db_url: str) -> Iterator[None]:
    """Jobs submitted inside inherit ``$ABLATE_DB_URL = db_url`` (local processes copy this
    environment; sbatch exports it; the debug executor runs here): the URL, password included,
    never enters a pickled job file or a log. The previous value is restored afterwards."""
    from ..db.store import ENV_URL as DB_URL_ENV

    before = os.environ.get(DB_URL_ENV)
    os.environ[DB_URL_ENV] = db_url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DB_URL_ENV, None)
        else:
            os.environ[DB_URL_ENV] = before
