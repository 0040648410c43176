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

``--like-seed 001`` sets the seed's own size (the aMUSEd-256 backbone: width 1024, 22 layers,
16 heads, 16x16 image tokens, CLIP's 77 caption tokens, batch 32, 50 passes; UViT vs M-Mamba)
and :func:`seed_comparison` sets the seed's A100 figures beside ours as ratios, which carry over
from one machine to another where absolute times do not: M-Mamba / UViT for the whole backbone
and for one layer, and the SSM scan / self-attention per call (the seed's "Attention v.s. SSM"
column times one call of each: 2.33e-4 s against 1.19e-3 s).

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
    from ablate.ops import causal_conv1d, selective_scan

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
    from ablate.registry import VariantContext

    torch.manual_seed(seed)
    ctx = VariantContext(width=width, depth=depth, heads=heads, grid=tuple(grid), text_len=text_len)
    return cls(ctx, cls.Config(**params)).to(device).eval()


def _forward(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> None:
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
    from ablate.grid import load_grid

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


# seed 001, slide 14 ("1 A100 GPU, 32 batch size, averaged over 50 forward passes"): its size and
# its figures in ms, per (variant, column of our rows)
SEED_001_SIZE = dict(variants=["uvit", "m-mamba"], width=1024, depth=22, heads=16, tokens=(16, 16), text_len=77,
                     batch=32, passes=50, warmup=5)
SEED_001_MS = {("uvit", "full_ms"): 137.0, ("uvit", "layer_ms"): 5.94, ("uvit", "self_attn_call_ms"): 1.19,
               ("uvit", "cross_attn_call_ms"): 1.16, ("m-mamba", "full_ms"): 217.0, ("m-mamba", "layer_ms"): 8.92,
               ("m-mamba", "ssm_scan_call_ms"): 0.233}
SEED_001_RATIOS = (  # (what, numerator, denominator)
    ("M-Mamba / UViT, whole backbone forward", ("m-mamba", "full_ms"), ("uvit", "full_ms")),
    ("M-Mamba / UViT, one layer", ("m-mamba", "layer_ms"), ("uvit", "layer_ms")),
    ("SSM scan / self-attention, one call", ("m-mamba", "ssm_scan_call_ms"), ("uvit", "self_attn_call_ms")),
    ("cross- / self-attention (UViT), one call", ("uvit", "cross_attn_call_ms"), ("uvit", "self_attn_call_ms")),
)


def seed_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed 001 ratios (:data:`SEED_001_RATIOS`) from the seed's figures and from ``rows``
    (which must hold a ``uvit`` and an ``m-mamba`` row): ``what, seed, here, here_vs_seed``;
    ``here`` is None where a row lacks the op (then no comparison is made)."""
    by = {r["variant"]: r for r in rows}
    missing = [v for v in ("uvit", "m-mamba") if v not in by]
    if missing:
        raise ValueError(f"--like-seed 001: compares uvit with m-mamba; no row for {', '.join(missing)}")
    out = []
    for what, (vn, cn), (vd, cd) in SEED_001_RATIOS:
        seed = SEED_001_MS[(vn, cn)] / SEED_001_MS[(vd, cd)]
        num, den = by[vn].get(cn), by[vd].get(cd)
        here = num / den if num and den else None
        out.append(dict(what=what, seed=seed, here=here, here_vs_seed=here / seed if here else None))
    return out


def format_comparison(comparison: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    size = (f"width {r['width']}, depth {r['depth']}, L={r['L']}, T={r['T']}, batch {r['batch']}, "
            f"{r['passes']} passes, {r['precision']}")
    out = [f"seed 001 (1 A100) against this run ({r['device']}, {size}):", "",
           "| ratio | seed 001 | here | here / seed |", "|---|---|---|---|"]
    for c in comparison:
        here = "" if c["here"] is None else f"{c['here']:.3f}"
        vs = "" if c["here_vs_seed"] is None else f"{c['here_vs_seed']:.2f}"
        out.append(f"| {c['what']} | {c['seed']:.3f} | {here} | {vs} |")
    return "\n".join(out)


def bench_layers(variants: Optional[Sequence[str]] = None, width: int = 96, depth: int = 4, heads: int = 4,
                 grid: tuple[int, int] = (4, 4), text_len: int = 10, batch: int = 32, passes: int = 50,
                 warmup: int = 5, device: str = "cpu", cells: Optional[Sequence[dict[str, Any]]] = None,
                 seed: int = 0, precision: str = "fp32") -> list[dict[str, Any]]:
    """One row per variant (or per ``cells`` entry, see :func:`cells_from_grid`):
    ``variant, family, params`` (backbone parameters at ``depth``), ``width, depth, heads, L,
    T, batch, passes, device, threads``, ``full_ms`` / ``full_median_ms`` (one forward of the
    ``depth``-layer backbone), ``layer_ms`` / ``layer_median_ms`` (``depth=1``), and per op of
    :data:`OPS` ``<op>_ms`` (time inside it per single-layer forward; 0 when the variant has
    none), ``<op>_calls`` (calls per single-layer forward) and ``<op>_call_ms`` (per call),
    ``mixing_share`` (the ops' share of the single-layer time). ``variants`` default: all
    registered ones. Defaults are the quickstart's sizes. ``precision``: fp32, or bf16 / fp16
    autocast around every forward."""
    from ablate.registry import load_registry
    from ablate.train.precision import autocast

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
        with torch.no_grad(), autocast(precision, dev):
            t_full = _times(full, inputs, passes, warmup, dev)
            t_one = _times(one, inputs, passes, warmup, dev)
            with op_timer(c["text_len"], dev) as acc:
                for _ in range(passes):
                    _forward(one, *inputs)
        layer_ms = statistics.mean(t_one) * 1e3
        row = dict(variant=c["variant"], family=cls.family, params=sum(p.numel() for p in full.parameters()),
                   width=c["width"], depth=c["depth"], heads=c["heads"], L=c["grid"][0] * c["grid"][1],
                   T=c["text_len"], batch=batch, passes=passes, device=str(dev), threads=torch.get_num_threads(),
                   precision=precision,
                   full_ms=statistics.mean(t_full) * 1e3, full_median_ms=statistics.median(t_full) * 1e3,
                   layer_ms=layer_ms, layer_median_ms=statistics.median(t_one) * 1e3)
        for op in OPS:
            row[f"{op}_ms"] = acc[op][0] / passes * 1e3
            row[f"{op}_calls"] = acc[op][1] / passes
            row[f"{op}_call_ms"] = acc[op][0] / acc[op][1] * 1e3 if acc[op][1] else None
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
