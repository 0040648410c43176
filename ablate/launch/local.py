"""``local``: processes on this machine (submitit's LocalExecutor).

submitit's LocalExecutor starts every submitted job at once and gives every GPU job GPU 0, so the
pool of slots is ours: a job is submitted only when a slot is free, and on a machine with GPUs
each slot owns one GPU (a cell over several ranks gets ``launcher.tasks_per_job`` processes in one
slot instead). A job records ``local:<pid>``, the pid of the process that trains (not of
submitit's controller above it); ``ablate cancel`` kills it when it runs on this host.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Mapping, Optional

from ..config import LauncherSpec
from .base import LOCAL_JOB_ENV, Executor, JobRef


def local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class LocalExecutor(Executor):
    kind = "local"
    prefix = "local"

    @classmethod
    def layout(cls, launcher: LauncherSpec) -> tuple[int, int]:
        return 1, launcher.tasks_per_job

    @classmethod
    def here(cls, env: Mapping[str, str], pid: int) -> Optional[str]:
        return f"local:{pid}" if env.get("SUBMITIT_EXECUTOR") == "local" else None

    @classmethod
    def active(cls, ids: list[str]) -> Optional[set[str]]:
        """The pids (of this host) still alive."""
        return {i for i in ids if i.isdigit() and _alive(int(i))}

    @classmethod
    def cancel(cls, jobs: list[JobRef], host: str) -> int:
        stopped = 0
        for job in jobs:
            if job.status == "running" and job.id.isdigit() and job.host == host:
                try:
                    os.kill(int(job.id), signal.SIGKILL)  # submitit's local jobs ignore SIGTERM
                    stopped += 1
                except ProcessLookupError:
                    pass
        return stopped

    def make_submitters(self) -> list[Any]:
        for k, v in LOCAL_JOB_ENV.items():
            os.environ.setdefault(k, v)  # inherited by the job processes submitit starts
        gpus = local_gpus() if self.tasks[1] == 1 else 0
        if gpus:
            self.slots = min(self.slots, gpus)
            return [self._submitter(gpu=i) for i in range(self.slots)]
        return [self._submitter()]

    def _submitter(self, gpu: Optional[int] = None) -> Any:
        import submitit

        ex = submitit.LocalExecutor(folder=str(self.folder / "%j"))
        params: dict[str, Any] = {"timeout_min": self.launcher.timeout_min}
        if self.tasks[1] > 1:
            params["tasks_per_node"] = self.tasks[1]
        if gpu is not None:
            params.update(gpus_per_node=1, visible_gpus=(gpu,))
        ex.update_parameters(**params)
        return ex
