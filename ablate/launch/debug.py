"""``debug``: every job in the driver's own process (submitit's DebugExecutor), one at a time:
a breakpoint in a job stops there. A job records ``proc:<pid>`` (also what any in-process caller
records); it is stopped where it runs (Ctrl-C), never by ``ablate cancel``."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from ..config import LauncherSpec
from .base import Executor


class DebugExecutor(Executor):
    kind = "debug"
    prefix = "proc"

    def __init__(self, folder: Any, launcher: LauncherSpec, slots: Optional[int] = None,
                 tasks: tuple[int, int] = (1, 1)):
        super().__init__(folder, launcher, 1, (1, 1))

    @classmethod
    def here(cls, env: Mapping[str, str], pid: int) -> Optional[str]:
        return f"proc:{pid}"  # the fallback: whatever runs a job in its own process

    def make_submitters(self) -> list[Any]:
        import submitit

        ex = submitit.DebugExecutor(folder=str(self.folder / "%j"))
        ex.update_parameters(timeout_min=self.launcher.timeout_min)
        return [ex]
