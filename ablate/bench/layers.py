"""``ablate bench layers``: the seed's speed table (seed 001, slide 14) for every variant.

For each variant, at one width, depth, token grid and caption length: the time of a full
backbone forward (``depth`` layers), of a single layer (the same backbone built with
``depth=1``), and of the sequence-mixing ops inside that single layer: self-attention,
cross-attention, the SSM scan (and the Mamba block's causal conv).

The ops are the model's own labels (:mod:`ablate.model.labels`), read from a profile of
separate forwards (:mod:`ablate.bench.profile`): self- and cross-attention are the attention
kernel inside an ``attn.self`` / ``attn.cross`` range (attention over [text; image] is
self-attention), the SSM scan is ``mamba.scan`` (with its D skip and gate), the conv
``mamba.conv1d``. The full and single-layer forwards run unprofiled.

:func:`bench_breakdown` (``ablate bench breakdown``) times every labelled op of a backbone in a
training step, forward and backward, and what no label covers, for the closing question of any
speed work: where does the time go?

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
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ablate.bench.profile import OTHER, label_modules, label_times

OPS = ("self_attn", "cross_attn", "ssm_scan", "conv1d")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# the seed's op columns: (column, label path suffix)
OP_LABELS = (("self_attn", "attn.self > attn.sdpa"), ("cross_attn", "attn.cross > attn.sdpa"),
             ("ssm_scan", "mamba.scan"), ("conv1d", "mamba.conv1d"))


def op_columns(times: dict[str, dict[str, float]]) -> dict[str, list[float]]:
    """``{op: [seconds per pass, calls per pass]}`` for each op of :data:`OPS` from
    :func:`ablate.bench.profile.label_times` (forward times)."""
    out = {op: [0.0, 0.0] for op in OPS}
    for op, suffix in OP_LABELS:
        for path, t in times.items():
            if path == suffix or path.endswith(" > " + suffix):
                out[op][0] += t["fwd_ms"] / 1e3
                out[op][1] += t["calls"]
    return out


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
            acc = op_columns(label_times(lambda: one(*inputs), passes, dev))
        layer_ms = statistics.mean(t_one) * 1e3
        row = dict(variant=c["variant"], family=cls.family, params=sum(p.numel() for p in full.parameters()),
                   width=c["width"], depth=c["depth"], heads=c["heads"], L=c["grid"][0] * c["grid"][1],
                   T=c["text_len"], batch=batch, passes=passes, device=str(dev), threads=torch.get_num_threads(),
                   precision=precision,
                   full_ms=statistics.mean(t_full) * 1e3, full_median_ms=statistics.median(t_full) * 1e3,
                   layer_ms=layer_ms, layer_median_ms=statistics.median(t_one) * 1e3)
        for op in OPS:
            row[f"{op}_ms"] = acc[op][0] * 1e3
            row[f"{op}_calls"] = acc[op][1]
            row[f"{op}_call_ms"] = acc[op][0] / acc[op][1] * 1e3 if acc[op][1] else None
        row["mixing_share"] = sum(row[f"{op}_ms"] for op in OPS) / layer_ms if layer_ms else None
        if c.get("params"):
            row["model_params"] = c["params"]
        rows.append(row)
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


def bench_breakdown(variants: Sequence[str], width: int = 96, depth: int = 4, heads: int = 4,
                    grid: tuple[int, int] = (4, 4), text_len: int = 10, batch: int = 32, passes: int = 10,
                    warmup: int = 2, device: str = "cpu", seed: int = 0, precision: str = "fp32",
                    params: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """Per variant, per labelled op of its backbone (and :data:`~ablate.bench.profile.OTHER`):
    forward and backward milliseconds of one training pass (train mode, the backward of the
    output's sum), calls per pass and its share of the pass. Every ``nn.LayerNorm`` counts as
    ``norm``. Rows: ``variant, L, T, batch, width, depth, op, fwd_ms, bwd_ms, calls, share``
    plus a ``(total)`` row per variant."""
    from ablate.registry import load_registry
    from ablate.train.precision import autocast

    reg = load_registry()
    dev = torch.device(device)
    rows = []
    for v in variants:
        cls = reg.get(v)
        model = _build(cls, params or {}, width, depth, heads, grid, text_len, dev, seed).train()
        x, text, mask = _inputs(batch, grid, text_len, width, dev, seed)
        x.requires_grad_(True)

        def forward() -> torch.Tensor:
            with autocast(precision, dev):
                out = model(x, text, mask)
            return out[0] if isinstance(out, tuple) else out

        for _ in range(warmup):
            forward().float().sum().backward()
        with label_modules(model, {torch.nn.LayerNorm: "norm"}):
            times = label_times(forward, passes, dev, backward=True)
        total = sum(t["fwd_ms"] + t["bwd_ms"] for t in times.values())
        base = dict(variant=v, L=grid[0] * grid[1], T=text_len, batch=batch, width=width, depth=depth,
                    device=str(dev), threads=torch.get_num_threads(), precision=precision, passes=passes)
        order = sorted(times, key=lambda k: (k == OTHER, -(times[k]["fwd_ms"] + times[k]["bwd_ms"])))
        for op in order:
            t = times[op]
            rows.append(dict(base, op=op, fwd_ms=t["fwd_ms"], bwd_ms=t["bwd_ms"], calls=t["calls"],
                             share=(t["fwd_ms"] + t["bwd_ms"]) / total if total else None))
        rows.append(dict(base, op="(total)", fwd_ms=sum(t["fwd_ms"] for t in times.values()),
                         bwd_ms=sum(t["bwd_ms"] for t in times.values()), calls=None, share=1.0))
    return rows


def format_breakdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`bench_breakdown` rows, one block per variant."""
    out = ["| variant | L | batch | op | fwd ms | bwd ms | calls | share |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calls = "" if r["calls"] is None else f"{r['calls']:g}"
        out.append(f"| {r['variant']} | {r['L']} | {r['batch']} | {r['op']} | {r['fwd_ms']:.2f} | "
                   f"{r['bwd_ms']:.2f} | {calls} | {r['share']:.0%} |")
    return "\n".join(out)
