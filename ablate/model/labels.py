"""Named ranges in the model code for a profiler: where a step's time goes, op by op.

``with label("mamba.scan"):`` opens a ``torch.profiler.record_function`` range named
``ablate::mamba.scan`` while a profiler records (``ablate bench layers --breakdown``), and does
nothing otherwise: outside a profile it costs one check (about half a microsecond), where an idle
``record_function`` costs several microseconds per call, too much for a decoding step.

The labels (innermost wins; the profiler's sequence numbers carry them to the backward ops):
``mamba.in_proj``, ``mamba.conv1d``, ``mamba.x_proj``, ``mamba.dt_proj``, ``mamba.scan`` (the
recurrence with its D skip and silu(z) gate, fused on the numba and CUDA paths),
``mamba.out_proj``, ``scan_order.permute`` (a direction's reordering and its inverse),
``attn.self`` / ``attn.cross`` (a whole attention: projections, the kernel, the output
projection), ``attn.sdpa`` (the attention kernel alone) and ``mlp``.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch.profiler import record_function

PREFIX = "ablate::"
_NULL = contextlib.nullcontext()


def label(name: str) -> ContextManager[object]:
    """A profiler range ``ablate::<name>`` while a profiler records; a no-op otherwise."""
    return record_function(PREFIX + name) if torch._C._autograd._profiler_enabled() else _NULL
