"""Preemption and time limits inside a job: stop at a step boundary, then let submitit requeue.

On Slurm, submitit asks for a signal (USR2 by default) some time before the time limit and on
preemption, and its handler calls the job's ``checkpoint()``, requeues the job and exits, all from
inside the signal handler: wherever the training loop happens to be, possibly halfway through an
optimizer step. :func:`install` puts a flag in front of that handler instead; the training loop
asks :func:`requested` at every step boundary, saves a checkpoint there, and :func:`hand_over`
then runs submitit's handler (checkpoint, requeue, exit). A job with no submitit handler (run in
the driver's process, or before submitit set one) keeps the default behaviour.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Optional

_state: dict[str, Any] = {"signum": None, "prev": None, "sig": None}


def _signal() -> int:
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}", signal.SIGUSR2)


def install() -> bool:
    """Defer submitit's preemption handler to the next step boundary; False if there is none."""
    sig = _signal()
    prev = signal.getsignal(sig)
    if not callable(prev) or getattr(prev, "_ablate_deferred", False):
        return getattr(prev, "_ablate_deferred", False)

    def deferred(signum: int, frame: Any) -> None:
        _state["signum"] = signum

    deferred._ablate_deferred = True  # type: ignore[attr-defined]
    _state.update(prev=prev, sig=sig, signum=None)
    signal.signal(sig, deferred)
    return True


def requested() -> bool:
    """Whether a preemption / time-limit signal arrived since :func:`install`."""
    return _state["signum"] is not None


def hand_over() -> Optional[str]:
    """Run submitit's own handler now (it checkpoints the job's callable, requeues, and exits the
    process). Returns a reason if there is nothing to hand over to."""
    prev, signum = _state["prev"], _state["signum"]
    if prev is None or signum is None:
        return "no preemption handler installed"
    signal.signal(_state["sig"], prev)
    prev(signum, None)  # normally does not return (sys.exit after requeue)
    return "the preemption handler returned"
