"""``ablate bench layers``: the seed's speed table (seed 001, slide 14) for every variant.

For each variant, at one width, depth, token grid and caption length: the time of a full
backbone forward (``depth`` layers), of a single layer (the same backbone built with
``depth=1``), and of the sequence-mixing ops inside that single layer: self-attention,
cross-attention, the SSM scan (and the Mamba block's causal conv).

The ops are measured without touching the variants: during separate, instrumented forwards,
:func:`op_timer` replaces ``torch.nn.functional.scaled_dot_product_attention``,
``ablate.ops.selective_scan`` and ``ablate.ops.causal_conv1d`` (in every loaded module that
holds them) by wrappers that add up the time spent inside them (synchronising CUDA around each
call). An attention call counts as cross-attention when its keys are the caption (key length
T, query length not T) and as self-attention otherwise (so attention over [text; image] is
self-attention); with L == T the two are not told apart and all of it is self-attention.
The full and single-layer forwards run without wrappers and are not slowed by them.

Timing: forward only (``torch.no_grad``, eval mode), the mean over ``passes`` forwards after
``warmup`` (as the seed: "averaged over 50 forward passes"), the median beside it; batch
``batch`` of random states, captions of random length in [3, T].

Legend: B batch, L image tokens, T text tokens, D width.
"""
from __future__ import annotations

import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

OPS = ("self_attn", "cross_attn", "ssm_scan", "conv1d")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def _patched(original: Callable, wrapper: Callable) -> Iterator[None]:
    """Replace ``original`` by ``wrapper`` wherever a loaded module holds it by any name."""
    found = []
    for mod in list(sys.modules.values()):
        d = getattr(mod, "__dict__", None)
        if not isinstance(d, dict):
            continue
        for name, value in list(d.items()):
            if value is original:
                found.append((d, name))
    for d, name in found:
        d[name] = wrapper
    try:
        yield
    finally:
        for d, name in found:
            d[name] = original


@contextmanager
def op_timer(text_len: int, device: torch.device) -> Iterator[dict[str, list[float]]]:
    """``with op_timer(T, device) as acc:`` -> ``acc[op] = [seconds, calls]`` added up over the
    block for each op in :data:`OPS`."""
    from .ops import causal_conv1d, selective_scan

    acc: dict[str, list[float]] = {op: [0.0, 0] for op in OPS}
    depth = [0]  # time only the outermost op call (an op calling another is counted once)

    def timed(fn: Callable, classify: Callable[..., str]) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return fn(*args, **kwargs)
            op = classify(*args, **kwargs)
            depth[0] += 1
            _sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                acc[op][0] += time.perf_counter() - t0
                acc[op][1] += 1
                depth[0] -= 1
        return wrapper

    def attention_kind(q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> str:
        lq, lk = q.shape[-2], k.shape[-2]
        return "cross_attn" if lk == text_len and lq != text_len else "self_attn"

    sdpa = F.scaled_dot_product_attention
    with _patched(sdpa, timed(sdpa, attention_kind)), \
            _patched(selective_scan, timed(selective_scan, lambda *a, **k: "ssm_scan")), \
            _patched(causal_conv1d, timed(causal_conv1d, lambda *a, **k: "conv1d")):
        yield acc


def _inputs(batch: int, grid: tuple[int, int], text_len: int, width: int, device: torch.device,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, grid[0] * grid[1], width, generator=g)
    text = torch.randn(batch, text_len, width, generator=g)
    lens = torch.randint(min(3, text_len), text_len + 1, (batch,), generator=g)
    mask = torch.arange(text_len)[None] < lens[:, None]
    return x.to(device), text.to(device), mask.to(device)


def _build(cls: type, params: dict[str, Any], width: int, depth: int, heads: int, grid: tuple[int, int],
           text_len: int, device: torch.device, seed: int = 0) -> torch.nn.Module:
    from .registry import VariantContext

    torch.manual_seed(seed)
    ctx = VariantContext(width=width, depth=depth, heads=heads, grid=tuple(grid), text_len=text_len)
    return cls(ctx, cls.Config(**params)).to(device).eval()


def _forward(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> None:
    if getattr(model, "wants_targets", False):  # sampling-time call: no targets, no aux loss
        model(x, text, mask, targets=None, readout=None)
    else:
        model(x, text, mask)


def _times(model: torch.nn.Module, inputs: tuple, passes: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        _forward(model, *inputs)
    _sync(device)
    out = []
    for _ in range(passes):
        t0 = time.perf_counter()
        _forward(model, *inputs)
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def cells_from_grid(path: Path) -> list[dict[str, Any]]:
    """The distinct (variant, params, width, depth, heads, token grid, T) settings of a grid
    file's cells (seeds collapse), in the grid's order."""
    from .grid import load_grid

    grid = load_grid(Path(path))
    out, seen = [], set()
    for c in grid.cells:
        s = c.spec
        side = s.data.image_size // s.tokenizer.downsample
        cell = dict(variant=s.model.variant, params=s.model.params, width=s.model.width,
                    depth=s.model.depth, heads=s.model.heads, grid=(side, side), text_len=s.text.max_len)
        key = repr(sorted(cell.items()))
        if key not in seen:
            seen.add(key)
            out.append(cell)
    return out


def bench_layers(variants: Optional[Sequence[str]] = None, width: int = 96, depth: int = 4, heads: int = 4,
                 grid: tuple[int, int] = (4, 4), text_len: int = 10, batch: int = 32, passes: int = 50,
                 warmup: int = 5, device: str = "cpu", cells: Optional[Sequence[dict[str, Any]]] = None,
                 seed: int = 0) -> list[dict[str, Any]]:
    """One row per variant (or per ``cells`` entry, see :func:`cells_from_grid`):
    ``variant, family, params`` (backbone parameters at ``depth``), ``width, depth, heads, L,
    T, batch, passes, device, threads``, ``full_ms`` / ``full_median_ms`` (one forward of the
    ``depth``-layer backbone), ``layer_ms`` / ``layer_median_ms`` (``depth=1``), and per op of
    :data:`OPS` ``<op>_ms`` (time inside it per single-layer forward; 0 when the variant has
    none) and ``<op>_calls`` (calls per single-layer forward), ``mixing_share`` (the ops'
    share of the single-layer time). ``variants`` default: all registered ones. Defaults are
    the quickstart's sizes."""
    from .registry import load_registry

    reg = load_registry()
    if cells is None:
        names = list(variants) if variants else list(reg.variants)
        cells = [dict(variant=v, params={}, width=width, depth=depth, heads=heads, grid=tuple(grid),
                      text_len=text_len) for v in names]
    dev = torch.device(device)
    rows = []
    for c in cells:
        cls = reg.get(c["variant"])
        full = _build(cls, c["params"], c["width"], c["depth"], c["heads"], c["grid"], c["text_len"], dev, seed)
        one = _build(cls, c["params"], c["width"], 1, c["heads"], c["grid"], c["text_len"], dev, seed)
        inputs = _inputs(batch, c["grid"], c["text_len"], c["width"], dev, seed)
        with torch.no_grad():
            t_full = _times(full, inputs, passes, warmup, dev)
            t_one = _times(one, inputs, passes, warmup, dev)
            with op_timer(c["text_len"], dev) as acc:
                for _ in range(passes):
                    _forward(one, *inputs)
        layer_ms = statistics.mean(t_one) * 1e3
        row = dict(variant=c["variant"], family=cls.family, params=sum(p.numel() for p in full.parameters()),
                   width=c["width"], depth=c["depth"], heads=c["heads"], L=c["grid"][0] * c["grid"][1],
                   T=c["text_len"], batch=batch, passes=passes, device=str(dev), threads=torch.get_num_threads(),
                   full_ms=statistics.mean(t_full) * 1e3, full_median_ms=statistics.median(t_full) * 1e3,
                   layer_ms=layer_ms, layer_median_ms=statistics.median(t_one) * 1e3)
        for op in OPS:
            row[f"{op}_ms"] = acc[op][0] / passes * 1e3
            row[f"{op}_calls"] = acc[op][1] / passes
        row["mixing_share"] = sum(row[f"{op}_ms"] for op in OPS) / layer_ms if layer_ms else None
        if c.get("params"):
            row["model_params"] = c["params"]
        rows.append(row)
        del full, one
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`bench_layers` rows, the seed's columns: full forward, single
    layer, and the mixing ops inside one layer (ms, calls per layer in brackets)."""
    def op(r: dict[str, Any], name: str) -> str:
        calls = r[f"{name}_calls"]
        return "" if not calls else f"{r[f'{name}_ms']:.3f} ({calls:g})"

    out = ["| variant | params | depth | full fwd ms | 1-layer ms | self-attn ms | cross-attn ms "
           "| SSM scan ms | conv1d ms | ops / layer |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "" if r["mixing_share"] is None else f"{r['mixing_share']:.0%}"
        out.append(f"| {r['variant']} | {r['params']:,} | {r['depth']} | {r['full_ms']:.2f} | {r['layer_ms']:.3f} | "
                   f"{op(r, 'self_attn')} | {op(r, 'cross_attn')} | {op(r, 'ssm_scan')} | {op(r, 'conv1d')} | "
                   f"{share} |")
    return "\n".join(out)
