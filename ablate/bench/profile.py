"""Where the time goes: a profiler's events attributed to the model's labels, forward and backward.

The model code names its ops with :func:`ablate.model.labels.label` (``mamba.scan``,
``attn.self``, ...); :func:`label_times` runs a forward (and, if asked, its backward) ``passes``
times under ``torch.profiler`` and returns, per label path (``attn.self > attn.sdpa``: nested
labels, outermost first), the time inside it and not inside a nested label, per pass.

Backward ops carry no labels of their own; the profiler gives every forward op a sequence number
and the backward node it made the same number, so each ``autograd::engine::evaluate_function``
event is attributed to the label of the forward op that made it (``mamba.scan``'s backward is the
scan kernel's backward, ``mamba.in_proj``'s the two matmuls' gradients, ...).

``(other)`` is what no label covers: the forward's unlabelled ops (residual adds, reshapes,
...), the autograd engine's own bookkeeping, and the profiler's own cost per recorded op (a few
microseconds each), so sums match the profiled passes exactly; absolute times under the profiler
are therefore a little above an unprofiled run's, most for paths made of many small ops.

CPU times are the events' CPU time; on CUDA the kernels' device time under each range.
:func:`label_modules` adds labels to modules by type (e.g. every ``nn.LayerNorm`` as ``norm``)
with forward hooks, for ops the model code does not name itself.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function

from ablate.model.labels import PREFIX

OTHER = "(other)"
_FWD, _BWD = PREFIX + "pass.forward", PREFIX + "pass.backward"
_ENGINE = "autograd::engine::evaluate_function: "


@contextlib.contextmanager
def label_modules(model: nn.Module, kinds: dict[type, str]) -> Iterator[None]:
    """Within the block, each submodule of a type in ``kinds`` runs inside a label range of that
    name (forward pre- and post-hooks; removed on exit)."""
    handles, open_ = [], []

    def enter(name: str) -> Callable[..., None]:
        def pre(module: nn.Module, args: Any) -> None:
            if torch._C._autograd._profiler_enabled():
                ctx = record_function(PREFIX + name)
                ctx.__enter__()
                open_.append(ctx)
            else:
                open_.append(None)
        return pre

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        ctx = open_.pop()
        if ctx is not None:
            ctx.__exit__(None, None, None)

    for m in model.modules():
        for kind, name in kinds.items():
            if isinstance(m, kind):
                handles += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
                break
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _time(e: Any, cuda: bool) -> float:
    """Microseconds of an event: its CPU time, or on CUDA its kernels' device time."""
    if cuda:
        return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0))
    return float(e.cpu_time_total)


def _label_path(e: Any) -> Optional[str]:
    """The path of label ranges around event ``e`` (itself included), outermost first; None
    outside every label (the pass ranges are not labels)."""
    names = []
    while e is not None:
        if e.name.startswith(PREFIX) and e.name not in (_FWD, _BWD):
            names.append(e.name[len(PREFIX):])
        e = e.cpu_parent
    return " > ".join(reversed(names)) or None


def attribute(events: Any, passes: int, cuda: bool = False) -> dict[str, dict[str, float]]:
    """``{label path: {"fwd_ms", "bwd_ms", "calls"}}`` per pass from profiler ``events`` of
    ``passes`` passes, each run inside ``ablate::pass.forward`` (and ``ablate::pass.backward``)
    ranges; see the module docstring."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"fwd_ms": 0.0, "bwd_ms": 0.0, "calls": 0.0})
    fwd_total = bwd_total = engine_total = labelled = 0.0
    seq_label: dict[int, str] = {}
    for e in events:
        if e.name == _FWD:
            fwd_total += _time(e, cuda)
        elif e.name == _BWD:
            bwd_total += _time(e, cuda)
        elif e.name.startswith(PREFIX):
            path = _label_path(e)
            inner = sum(_time(c, cuda) for c in e.cpu_children if _label_path(c) != path)
            self_time = _time(e, cuda) - inner
            out[path]["fwd_ms"] += self_time
            out[path]["calls"] += 1
            labelled += self_time
        elif e.name.startswith(_ENGINE):
            engine_total += _time(e, cuda)
        if e.sequence_nr >= 0 and not e.name.startswith(_ENGINE) and e.sequence_nr not in seq_label:
            path = _label_path(e)
            if path is not None:
                seq_label[e.sequence_nr] = path
    for e in events:
        if e.name.startswith(_ENGINE):
            out[seq_label.get(e.sequence_nr, OTHER)]["bwd_ms"] += _time(e, cuda)
    out[OTHER]["fwd_ms"] += fwd_total - labelled
    out[OTHER]["bwd_ms"] += bwd_total - engine_total
    return {k: {"fwd_ms": v["fwd_ms"] / passes / 1e3, "bwd_ms": v["bwd_ms"] / passes / 1e3,
                "calls": v["calls"] / passes} for k, v in out.items()}


def label_times(forward: Callable[[], torch.Tensor], passes: int, device: torch.device,
                backward: bool = False) -> dict[str, dict[str, float]]:
    """Profile ``passes`` calls of ``forward()`` (each followed by the backward of its output's
    sum when ``backward``) and attribute their time to labels (:func:`attribute`)."""
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(passes):
            with record_function(_FWD):
                y = forward()
            if backward:
                with record_function(_BWD):
                    y.float().sum().backward()
            if cuda:
                torch.cuda.synchronize()
    return attribute(prof.events(), passes, cuda)
