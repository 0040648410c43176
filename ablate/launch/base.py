"""What every executor kind shares: the stage runner's contract and the local slot pool.

An :class:`Executor` is bound to one stage folder, the grid's launcher settings, its slots and
the task layout of each job (``(nodes, tasks per node)``: one cell over several DDP ranks). It
runs a stage's tasks (``run``) and calls back as each ends. Its class methods answer for the
kind as a whole, wherever they are asked: the id of the job this process is (``here``), which
recorded job ids are still alive (``active``), and how to stop them (``cancel``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional

from ..config import LauncherSpec

Task = tuple[str, Any, tuple]  # (name, callable, args)
OnDone = Callable[[str, Any, float, int], None]  # (name, result or exception, seconds, still running)
OnSubmit = Callable[[Optional[str], int], None]  # (name or None for a whole array, running)
OnIds = Callable[[dict[str, str]], None]  # {name: recorded job id} once the scheduler gave them

# glibc returns large freed blocks to the OS at once by default, so every training step of a
# CPU job page-faults its big temporaries afresh (measured: 5k-40k faults and ~10% of a Mamba
# step); raising the thresholds keeps them in the heap. Applied to local jobs unless set.
LOCAL_JOB_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


@dataclass(frozen=True)
class JobRef:
    """A cell's recorded job: ``job_id`` as the database holds it (``<prefix>:<id>``), the run's
    status and the host its heartbeat came from."""

    key: str
    status: str
    job_id: Optional[str]
    host: Optional[str] = None

    @property
    def prefix(self) -> str:
        return (self.job_id or "").partition(":")[0]

    @property
    def id(self) -> str:
        return (self.job_id or "").partition(":")[2]


def job_result(job: Any) -> Any:
    """A submitted job's result: rank 0's where the job ran several tasks (one cell over DDP
    ranks; the other ranks' results are informative only)."""
    return job.results()[0] if getattr(job, "num_tasks", 1) > 1 else job.result()


class Executor:
    """One executor kind; see the module docstring. Subclasses set :attr:`kind` (the name a
    grid's ``launcher.executor`` and ``--executor`` use) and :attr:`prefix` (of the job ids it
    records) and build their submitit executors in :meth:`submitters`."""

    kind: ClassVar[str]
    prefix: ClassVar[str]

    def __init__(self, folder: Path, launcher: LauncherSpec, slots: Optional[int] = None,
                 tasks: tuple[int, int] = (1, 1)):
        self.folder, self.launcher, self.tasks = Path(folder), launcher, tasks
        self.slots = max(1, slots or launcher.jobs)
        self.submitters: list[Any] = self.make_submitters()

    # -- the kind as a whole ---------------------------------------------------------------------
    @classmethod
    def layout(cls, launcher: LauncherSpec) -> tuple[int, int]:
        """(nodes, tasks per node) of one cell's job under ``launcher``."""
        return 1, 1

    @classmethod
    def cpus(cls, launcher: LauncherSpec) -> int:
        """CPU threads of one job (its torch threads)."""
        return launcher.cpus_per_job

    @classmethod
    def here(cls, env: Mapping[str, str], pid: int) -> Optional[str]:
        """This process's job id, ``<prefix>:<id>``, if it is a job of this kind; else None."""
        return None

    @classmethod
    def active(cls, ids: list[str]) -> Optional[set[str]]:
        """Which of ``ids`` (without prefix) are still queued or running; None if unknown."""
        return None

    @classmethod
    def cancel(cls, jobs: list[JobRef], host: str) -> int:
        """Stop these jobs (all of this kind); how many were stopped."""
        return 0

    # -- one stage -------------------------------------------------------------------------------
    def make_submitters(self) -> list[Any]:
        raise NotImplementedError

    @property
    def ranks(self) -> int:
        return self.tasks[0] * self.tasks[1]

    def for_cells(self) -> "Executor":
        """The executor of the cells' stage: this one, or, when a cell runs as several processes
        (DDP), one with that task layout whose slots hold whole cells."""
        tasks = self.layout(self.launcher)
        if tasks == (1, 1):
            return self
        return type(self)(self.folder, self.launcher, max(1, self.slots // (tasks[0] * tasks[1])), tasks)

    def describe(self) -> str:
        return f"{self.slots} slot(s)"

    def run(self, tasks: list[Task], on_done: OnDone, on_submit: Optional[OnSubmit] = None,
            on_ids: Optional[OnIds] = None, poll_s: float = 0.5) -> None:
        """Run ``tasks`` with at most :attr:`slots` in flight; slot ``i`` submits through
        ``submitters[i]`` when there is one per slot (one GPU each), else through the one.
        The jobs record their own ids (``on_ids`` is not called)."""
        queue = list(tasks)
        running: dict[str, tuple[Any, float, int]] = {}
        free = list(range(self.slots))
        subs = self.submitters
        while queue or running:
            while queue and free:
                name, fn, args = queue.pop(0)
                slot = free.pop(0)
                if hasattr(fn, "submitted_at"):
                    fn.submitted_at = time.time()  # the queue wait starts now, not when the task was listed
                sub = subs[slot] if len(subs) > 1 else subs[0]
                running[name] = (sub.submit(fn, *args), time.time(), slot)
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
