"""``slurm``: one job array per stage (submitit's SlurmExecutor), settings from the grid's
``launcher.slurm``; the array's parallelism is Slurm's. A cell with ``gpus_per_job`` GPUs runs
one task per GPU (``nodes`` x ``gpus_per_job`` DDP ranks). The driver records
``slurm:<array>_<task>`` at submission, stable across requeues, so ``ablate cancel`` can
``scancel`` a job before it starts.

Slurm without accounting (no sacct) is normal on small clusters, so a job's end is read from
squeue and its result file.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from ..config import LauncherSpec
from .base import LOCAL_JOB_ENV, Executor, JobRef, OnDone, OnIds, OnSubmit, Task, job_result

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def slurm_parameters(folder: Path, launcher: LauncherSpec, tasks: tuple[int, int] = (1, 1)) -> dict[str, Any]:
    """submitit ``SlurmExecutor.update_parameters`` arguments from the grid's ``launcher.slurm``;
    ``tasks``: (nodes, tasks per node) of the jobs (a cell across several GPUs or nodes)."""
    sl = launcher.slurm
    params: dict[str, Any] = {
        "time": sl.time_min, "cpus_per_task": sl.cpus_per_job, "mem": f"{sl.mem_gb}GB",
        "array_parallelism": sl.array_parallelism, "job_name": f"ablate-{Path(folder).name}",
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
        if len(parts) == 2 and parts[1] not in ENDED:
            active.add(parts[0])
    return active


def wait_jobs(jobs: dict[str, Any], on_done: OnDone, poll_s: float = 2.0, grace_s: float = 15.0) -> None:
    """Wait for submitted Slurm jobs. A job is over when its result file exists, or when squeue no
    longer lists it and no result file appeared within ``grace_s`` (killed: the exception says so)."""
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


class SlurmExecutor(Executor):
    kind = "slurm"
    prefix = "slurm"

    @classmethod
    def layout(cls, launcher: LauncherSpec) -> tuple[int, int]:
        sl = launcher.slurm
        return sl.nodes, (sl.gpus_per_job if sl.gpus_per_job else launcher.tasks_per_job)

    @classmethod
    def cpus(cls, launcher: LauncherSpec) -> int:
        return launcher.slurm.cpus_per_job

    @classmethod
    def here(cls, env: Mapping[str, str], pid: int) -> Optional[str]:
        if env.get("SUBMITIT_EXECUTOR") != "slurm":
            return None
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return f"slurm:{env.get('SLURM_JOB_ID', '?')}"

    @classmethod
    def active(cls, ids: list[str]) -> Optional[set[str]]:
        return slurm_active(ids)

    @classmethod
    def cancel(cls, jobs: list[JobRef], host: str) -> int:
        ids = sorted({j.id for j in jobs if j.id})
        if not ids or not shutil.which("scancel"):
            return 0
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
        return len(ids)

    def make_submitters(self) -> list[Any]:
        import submitit

        ex = submitit.SlurmExecutor(folder=str(self.folder / "%j"))
        ex.update_parameters(**slurm_parameters(self.folder, self.launcher, self.tasks))
        return [ex]

    def describe(self) -> str:
        return "one job array per stage"

    def run(self, tasks: list[Task], on_done: OnDone, on_submit: Optional[OnSubmit] = None,
            on_ids: Optional[OnIds] = None, poll_s: float = 2.0) -> None:
        ex = self.submitters[0]
        with ex.batch():  # one job array for the whole stage
            submitted = [(name, ex.submit(fn, *args)) for name, fn, args in tasks]
        jobs = dict(submitted)
        if on_ids:
            on_ids({name: f"{self.prefix}:{job.job_id}" for name, job in jobs.items()})
        if on_submit:
            on_submit(None, len(jobs))
        wait_jobs(jobs, on_done, poll_s=poll_s)
