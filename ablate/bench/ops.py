"""Benchmarks of the selective scan paths (the tests run them only at toy size, for the API).

:func:`bench_ops` times forward+backward of one selective scan at Mamba's sizes for each
implementation (the reference loop, the torch path, the numba kernel, mambapy's parallel scan when
installed) and for each text-dependent form of the scan, plus one self-attention layer of the same
model width as a yardstick (whole training steps: :mod:`ablate.bench.step`).
:func:`format_rows` prints either as a table with ratios against a baseline measured in the same run.

Timing: best of ``repeats`` after one warm-up call (compilation, caches), wall clock, at the
caller's ``torch.get_num_threads()``; the implementations are interleaved within each repeat so a
neighbour's load hits them alike. Peak memory: the process's resident-set high-water mark during
one forward+backward, after ``malloc_trim`` and a reset of the mark (``/proc/self/clear_refs``),
minus the resident set before it; so it counts every allocation (torch, numpy, numba) that touched
memory. Absent (None) where /proc does not offer this (non-Linux).

Inputs follow the layout each path is used with: the scans in ablate get ``[b, d, L]`` views of
time-major ``[L, b, d]`` storage (as :class:`ablate.model.mamba.Mamba` passes them); mambapy gets
its own ``(b, L, d)`` layout.

Legend: b batch, d inner width (E), n state size, L sequence length.
"""
from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ablate.utils import peak_memory  # noqa: F401  (re-exported: the bench's memory figure)
from ablate.ops.selective_scan import IMPLS, numba_available, selective_scan

MEM_METHOD = "rss high-water mark (/proc/self/clear_refs), after malloc_trim"

# the text-dependent forms of the scan (see ablate.model.mamba's hooks) and what they change
CASES = {
    "plain": "A [d, n], B/C [b, n, L], D [d], z, delta_bias, softplus",
    "batch_A": "A_scale [b, d]: A_b = s_b * A (text-scaled decay, A_log_add [B, E])",
    "add_BC": "B, C + per-sample text terms [b, n, 1] (B_add, C_add)",
    "batch_D": "D [b, d] (D_add)",
    "initial_state": "initial state [b, d, n] from the text",
}


# ----------------------------------------------------------------------------------- memory


# ----------------------------------------------------------------------------------- inputs

def scan_inputs(case: str, batch: int, d_inner: int, n: int, L: int, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict[str, Any]:
    """Leaf tensors for one scan call of ``case`` (see CASES), as the Mamba block makes them:
    ``u, delta, z`` are [b, d, L] views of [L, b, d] storage; A is S4D-real, dt ~ 1e-3..1e-1."""
    if case not in CASES:
        raise ValueError(f"bench: case must be one of {sorted(CASES)}, got {case!r}")
    g = torch.Generator().manual_seed(seed)
    b, d = batch, d_inner

    def seq(scale: float = 1.0) -> Tensor:  # [b, d, L] view of time-major storage
        return (torch.randn(L, b, d, generator=g, dtype=dtype) * scale).permute(1, 2, 0)

    def bc() -> Tensor:  # [b, n, L] view of [L, b, n], as split from x_proj's output
        return torch.randn(L, b, n, generator=g, dtype=dtype).permute(1, 2, 0)

    A_log = torch.log(torch.arange(1, n + 1, dtype=dtype)).repeat(d, 1)
    lo, hi = math.log(1e-3), math.log(0.1)
    dt = torch.exp(torch.rand(d, generator=g, dtype=dtype) * (hi - lo) + lo)
    args: dict[str, Any] = dict(
        u=seq(), delta=seq(0.1), A=-torch.exp(A_log), B=bc(), C=bc(), D=torch.ones(d, dtype=dtype),
        z=seq(), delta_bias=dt + torch.log(-torch.expm1(-dt)), delta_softplus=True)
    leaves = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    if case == "batch_A":
        args["A_scale"] = torch.exp(0.3 * torch.randn(b, d, generator=g, dtype=dtype))
        leaves.append("A_scale")
    elif case == "batch_D":
        args["D"] = args["D"] + 0.1 * torch.randn(b, d, generator=g, dtype=dtype)
    elif case == "initial_state":
        args["initial_state"] = torch.randn(b, d, n, generator=g, dtype=dtype)
        leaves.append("initial_state")
    elif case == "add_BC":
        for k in ("B_add", "C_add"):
            args[k] = torch.randn(b, n, 1, generator=g, dtype=dtype)
            leaves.append(k)
    for k in leaves:
        args[k] = args[k].detach().to(device).requires_grad_()
    return args  # .to(device) preserves strides: still views of time-major storage


def _scan_call(impl: str, args: dict[str, Any]) -> Callable[[], Tensor]:
    """A closure running one forward of ``impl`` on ``args`` through :func:`selective_scan` (the
    B/C terms added inside, as the Mamba block does, so their cost and gradient are counted)."""
    kw = {k: v for k, v in args.items() if k not in ("B_add", "C_add")}

    def call() -> Tensor:
        extra = {}
        if "B_add" in args:
            extra = dict(B=args["B"] + args["B_add"], C=args["C"] + args["C_add"])
        return selective_scan(**{**kw, **extra}, impl=impl)
    return call


def _mambapy_call(args: dict[str, Any]) -> Callable[[], Tensor]:
    """mambapy's selective scan (``MambaBlock.selective_scan``: materialise exp(delta A) and
    delta B u as [b, L, d, n], Blelloch ``pscan``, contract with C) plus the same D, z, bias and
    softplus, on mambapy's (b, L, d) layout."""
    from mambapy.pscan import pscan

    x, delta, z = (args[k].detach().permute(0, 2, 1).contiguous().requires_grad_()
                   for k in ("u", "delta", "z"))
    B, C = (args[k].detach().transpose(1, 2).contiguous().requires_grad_() for k in ("B", "C"))
    A, D, bias = (args[k] for k in ("A", "D", "delta_bias"))

    def call() -> Tensor:
        dt = F.softplus(delta + bias)  # (b, L, d)
        deltaA = torch.exp(dt.unsqueeze(-1) * A)  # (b, L, d, n)
        BX = dt.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)  # (b, L, d, n)
        hs = pscan(deltaA, BX)
        y = (hs @ C.unsqueeze(-1)).squeeze(3) + D * x
        return y * F.silu(z)
    call.leaves = [x, delta, z, B, C, A, D, bias]  # type: ignore[attr-defined]
    return call


def _attention_call(batch: int, d_model: int, heads: int, L: int,
                    seed: int = 0, device: str = "cpu") -> Callable[[], Tensor]:
    """One ``nn.MultiheadAttention`` self-attention layer (q, k, v, out projections) on [b, L, D]."""
    torch.manual_seed(seed)
    layer = torch.nn.MultiheadAttention(d_model, heads, batch_first=True).to(device)
    x = torch.randn(batch, L, d_model, device=device).requires_grad_()

    def call() -> Tensor:
        return layer(x, x, x, need_weights=False)[0]
    call.leaves = [x, *layer.parameters()]  # type: ignore[attr-defined]
    return call


def _floor_call(batch: int, d_inner: int, n: int, L: int) -> Callable[[], None]:
    """The compute floor of one scan's forward+backward (:mod:`ablate.bench.floor`) as a job."""
    from ablate.bench import floor

    tile = floor.tile(n)
    steps = max(1, round(batch * d_inner * L / floor.W))

    def call() -> None:
        floor.run(steps, tile)
    call.leaves = None  # type: ignore[attr-defined]
    return call


def _fwd_bwd(call: Callable[[], Any], leaves: Optional[Sequence[Tensor]]) -> None:
    if leaves is None:  # not autograd: the floor kernels
        call()
        return
    for t in leaves:
        t.grad = None
    y = call()
    y.backward(torch.ones_like(y))
    if y.is_cuda:
        torch.cuda.synchronize()


@contextlib.contextmanager
def _peak(device: str) -> Iterator[dict[str, Optional[float]]]:
    """Peak memory a block adds: the RSS high-water mark on CPU, the caching allocator's
    ``max_memory_allocated`` on CUDA."""
    if device == "cpu":
        with peak_memory(collect=False) as mem:
            yield mem
        return
    out: dict[str, Optional[float]] = {"mb": None}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield out
    torch.cuda.synchronize()
    out["mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20


# ----------------------------------------------------------------------------------- benches

def bench_ops(lengths: Sequence[int] = (64, 256, 1024), batch: int = 32, d_inner: int = 256,
              n: int = 16, repeats: int = 3, impls: Optional[Sequence[str]] = None,
              cases: Sequence[str] = tuple(CASES), attention: bool = True,
              device: str = "cpu", floor: bool = True) -> list[dict[str, Any]]:
    """Forward+backward time and peak memory of the selective scan, one row per
    (impl, case, L): ``impl, case, L, batch, d_inner, n, threads, fwd_bwd_s`` (best of
    ``repeats``), ``fwd_bwd_median_s``, the paired ratios ``speedup_vs_mambapy``,
    ``speedup_vs_ref`` (plain case) and ``time_vs_plain`` (other cases; see :func:`format_rows`),
    ``peak_mem_mb, mem_method``.

    ``impls`` default on CPU: ref, torch, numba (when importable), mambapy (when installed) for the
    plain case; the other cases run on torch and numba (and cuda) only. On ``device="cuda"``:
    ref, torch, cuda (mamba-ssm's kernel, when installed), mambapy; peak memory is then the
    allocator's peak. ``floor`` (CPU, numba) adds an ``impl="floor"`` row per L: the numba
    kernels' arithmetic alone for as many state elements (:mod:`ablate.bench.floor`), and every
    plain row its ``time_vs_floor``. ``attention`` adds an ``impl="attention"``
    row per L: one self-attention layer of width ``d_inner // 2`` (the Mamba block's d_model),
    4 heads, over the same b and L.
    """
    if impls is None:
        if device == "cpu":
            impls = ["ref", "torch"] + (["numba"] if numba_available() else []) + (
                ["mambapy"] if _has_mambapy() else [])
        else:
            from ablate.ops.cuda import mamba_kernel
            impls = ["ref", "torch"] + (["cuda"] if mamba_kernel() is not None else []) + (
                ["mambapy"] if _has_mambapy() else [])
    unknown = [i for i in impls if i not in IMPLS and i != "mambapy"]
    if unknown:
        raise ValueError(f"bench: impls must be among {sorted(IMPLS) + ['mambapy']}, got {unknown}")
    bad_cases = [c for c in cases if c not in CASES]
    if bad_cases:
        raise ValueError(f"bench: cases must be among {sorted(CASES)}, got {bad_cases}")
    threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    for L in lengths:
        jobs: list[tuple[str, str, Callable[[], Tensor], Sequence[Tensor]]] = []
        for case in cases:
            args = scan_inputs(case, batch, d_inner, n, L, device=device)
            leaves = [v for v in args.values() if isinstance(v, Tensor) and v.requires_grad]
            for impl in impls:
                if case != "plain" and impl not in ("torch", "numba", "cuda"):
                    continue
                if impl == "mambapy":
                    call = _mambapy_call(args)
                    jobs.append((impl, case, call, call.leaves))  # type: ignore[attr-defined]
                else:
                    jobs.append((impl, case, _scan_call(impl, args), leaves))
        if floor and device == "cpu" and numba_available():
            call = _floor_call(batch, d_inner, n, L)
            jobs.append(("floor", "plain", call, None))
        if attention:
            call = _attention_call(batch, d_inner // 2, 4, L, device=device)
            jobs.append(("attention", f"self-attention D={d_inner // 2}, 4 heads", call,
                         call.leaves))  # type: ignore[attr-defined]
        times: dict[int, list[float]] = {i: [] for i in range(len(jobs))}
        for _, _, call, leaves in jobs:
            _fwd_bwd(call, leaves)  # warm-up: compilation, first-touch of buffers
        for _ in range(repeats):
            for i, (_, _, call, leaves) in enumerate(jobs):
                t0 = time.perf_counter()
                _fwd_bwd(call, leaves)
                times[i].append(time.perf_counter() - t0)
        index = {(impl, case): i for i, (impl, case, _, _) in enumerate(jobs)}

        def paired(num: Optional[int], den: Optional[int]) -> Optional[float]:
            """Median over repeats of time[num] / time[den], each pair from the same repeat:
            a neighbour's load that comes and goes cancels out of the ratio."""
            if num is None or den is None or num == den:
                return None
            return statistics.median(a / b for a, b in zip(times[num], times[den]))

        gc.collect()
        for i, (impl, case, call, leaves) in enumerate(jobs):
            with _peak(device) as mem:  # autograd graphs free by refcount
                _fwd_bwd(call, leaves)
            plain = index.get((impl, "plain")) if case in CASES else None
            rows.append(dict(impl=impl, case=case, L=L, batch=batch, d_inner=d_inner, n=n,
                             threads=threads, fwd_bwd_s=min(times[i]),
                             fwd_bwd_median_s=statistics.median(times[i]),
                             speedup_vs_mambapy=paired(index.get(("mambapy", "plain")), i)
                             if case == "plain" else None,
                             speedup_vs_ref=paired(index.get(("ref", "plain")), i)
                             if case == "plain" else None,
                             time_vs_plain=paired(i, plain),
                             time_vs_floor=paired(i, index.get(("floor", "plain"))) if case == "plain" else None,
                             peak_mem_mb=mem["mb"],
                             mem_method=MEM_METHOD if device == "cpu" else "torch.cuda.max_memory_allocated",
                             device=device))
        del jobs
    return rows


def _has_mambapy() -> bool:
    try:
        import mambapy.pscan  # noqa: F401
    except Exception:
        return False
    return True


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`bench_ops` rows with the ratios measured in the same run:
    ``x mambapy`` and ``x ref`` (their time / this row's, plain case) and ``/ plain`` (this
    case's time / the plain case's, same impl) and ``/ floor`` (this row's time / the compute
    floor's); each ratio is the median of per-repeat pairs."""
    def num(v: Optional[float], fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    out = ["| impl | case | L | fwd+bwd ms (best) | median ms | x mambapy | x ref | / plain | / floor "
           "| peak MiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['impl']} | {r['case']} | {r['L']} | {r['fwd_bwd_s'] * 1e3:.1f} | "
                   f"{r['fwd_bwd_median_s'] * 1e3:.1f} | {num(r.get('speedup_vs_mambapy'), '.1f')} | "
                   f"{num(r.get('speedup_vs_ref'), '.1f')} | {num(r.get('time_vs_plain'), '.2f')} | "
                   f"{num(r.get('time_vs_floor'), '.2f')} | {num(r.get('peak_mem_mb'), '.0f')} |")
    return "\n".join(out)
