"""``ablate bench sample``: sampling images/s of every paradigm x backbone, paired in one run.

Each cell is a generator with random weights (sampling cost does not depend on what the weights
learned) at the given size: ``masked`` decodes in ``sample.steps`` parallel steps, ``var`` scale by
scale, ``ar`` one token at a time (``decode: cached``: recurrent Mamba state / attention KV cache; ``full``: the
whole sequence again per token). Classifier-free guidance doubles every batch, as in a run.
Mamba backbones scan forward in every paradigm (the causal order), so a variant's rows differ in
the paradigm alone; ``var`` runs on VAR's scales for the grid's side (:func:`default_scales`), one
forward per scale. Timing: per token grid, every cell once as warm-up, then ``repeats`` rounds
of all cells interleaved; ``vs_first`` is the median over rounds of this cell's images/s over
the round's first cell's (same grid), ``vs_masked`` over the same variant's masked cell's and
``vs_ar`` over its ar cell's.
Token codes are decoded, not images (the VQ decoder's cost is the same for every cell).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Optional, Sequence

import torch

DEFAULT_VARIANTS = ("transformer", "mamba-prefix", "mamba-adaln", "hybrid-gsa")


def default_scales(side: int) -> list[int]:
    """VAR's scale schedules (1, 2, 3, 4, 6, 8 for an 8x8 map; 1, 2, 3, 4, 5, 6, 8, 10, 13, 16
    for 16x16), else 1, 2, 4, ... up to ``side``."""
    known = {8: [1, 2, 3, 4, 6, 8], 16: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]}
    if side in known:
        return known[side]
    out = [1]
    while out[-1] * 2 < side:
        out.append(out[-1] * 2)
    return out + [side] if out[-1] != side else out


def _cell(paradigm: str, variant: str, grid: tuple[int, int], width: int, depth: int, text_len: int,
          codebook: int, seed: int, device: str) -> tuple[Any, Any]:
    from ablate.config import TextSpec
    from ablate.model import Generator
    from ablate.paradigm import generation_order, get
    from ablate.registry import load_registry
    from ablate.text import LearnedTextEncoder

    cls = load_registry().get(variant)
    params = {"scan": "forward"} if "scan" in cls.Config.model_fields else {}
    load_registry().check_paradigm(variant, cls.Config(**params).model_dump(mode="json"), paradigm)
    torch.manual_seed(seed)
    text = LearnedTextEncoder(TextSpec(max_len=text_len, width=width), [f"w{i}" for i in range(100)])
    order = generation_order("raster", grid)
    if paradigm == "var" and grid[0] != grid[1]:
        raise ValueError(f"var: a square token map; got {grid[0]}x{grid[1]}")
    par = get(paradigm, codebook, order, default_scales(grid[0]) if paradigm == "var" else None)
    blocks = getattr(par, "blocks", ())
    seq_grid = (1, sum(blocks)) if blocks else grid  # var: every scale's tokens, coarse to fine
    model = Generator(cls, cls.Config(**params), text, codebook_size=codebook, grid=seq_grid, width=width,
                      depth=depth, heads=4, text_len=text_len, causal=par.causality != "none",
                      order=order if paradigm == "ar" else None, blocks=blocks).to(device).eval()
    return par, model


def bench_sample(paradigms: Sequence[str] = ("masked", "ar", "var"), variants: Sequence[str] = DEFAULT_VARIANTS,
                 grids: Sequence[tuple[int, int]] = ((8, 8), (16, 16)), batch: int = 32, width: int = 96,
                 depth: int = 4, text_len: int = 10, codebook: int = 512, steps: int = 10, guidance: float = 2.0,
                 decode: str = "cached", repeats: int = 3, seed: int = 0, device: str = "cpu",
                 skipped: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """One row per (token grid, variant, paradigm) the variant can serve (the others are named
    in ``skipped``): ``images_per_s`` (best round), ``images_per_s_median``, ``vs_first``,
    ``vs_masked`` (see the module docstring)."""
    from ablate.config import SampleSpec

    spec = SampleSpec(steps=steps, guidance=guidance, batch_size=batch, decode=decode)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, text_len + 1, (batch,), generator=g)
    mask = (torch.arange(text_len)[None] < lens[:, None]).to(device)
    ids = torch.where(mask.cpu(), torch.randint(3, 103, (batch, text_len), generator=g), 0).to(device)
    null_ids, null_mask = torch.zeros(1, text_len, dtype=torch.long, device=device), torch.zeros(
        1, text_len, dtype=torch.bool, device=device)
    rows: list[dict[str, Any]] = []
    for grid in grids:
        cells = []
        for v in variants:
            for p in paradigms:
                try:
                    cells.append((p, v, *_cell(p, v, grid, width, depth, text_len, codebook, seed, device)))
                except ValueError as exc:
                    if skipped is not None:
                        skipped.append(f"{v} {p}: {str(exc).split(': ', 2)[-1]}")
        if not cells:
            continue

        def run(par: Any, model: Any) -> float:
            gen = torch.Generator(device).manual_seed(seed)
            t0 = time.perf_counter()
            with torch.no_grad():
                par.sample(model, ids, mask, null_ids, null_mask, spec, gen)
            if device == "cuda":
                torch.cuda.synchronize()
            return batch / (time.perf_counter() - t0)

        for _, _, par, model in cells:
            run(par, model)  # warm-up
        rates: list[list[float]] = [[] for _ in cells]
        for _ in range(repeats):
            for i, (_, _, par, model) in enumerate(cells):
                rates[i].append(run(par, model))
        masked_of = {v: i for i, (p, v, *_rest) in enumerate(cells) if p == "masked"}
        ar_of = {v: i for i, (p, v, *_rest) in enumerate(cells) if p == "ar"}
        for i, (p, v, _par, _model) in enumerate(cells):  # noqa: B007
            j = masked_of.get(v)
            rows.append(dict(
                paradigm=p, variant=v, L=grid[0] * grid[1], batch=batch, width=width, depth=depth,
                decode=decode if p in ("ar", "var") else "-",
                steps=steps if p == "masked" else len(_par.blocks) if p == "var" else grid[0] * grid[1],
                threads=torch.get_num_threads(), device=device,
                images_per_s=max(rates[i]), images_per_s_median=statistics.median(rates[i]),
                vs_first=statistics.median(a / b for a, b in zip(rates[i], rates[0])),
                vs_masked=None if j is None else statistics.median(a / b for a, b in zip(rates[i], rates[j])),
                vs_ar=None if v not in ar_of else statistics.median(a / b for a, b in zip(rates[i], rates[ar_of[v]]))))
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`bench_sample` rows."""
    out = ["| L | variant | paradigm | decode | forwards | images/s (best) | median | / first | / masked | / ar |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vm = "" if r["vs_masked"] is None else f"{r['vs_masked']:.2f}"
        va = "" if r.get("vs_ar") is None else f"{r['vs_ar']:.2f}"
        out.append(f"| {r['L']} | {r['variant']} | {r['paradigm']} | {r['decode']} | {r['steps']} | "
                   f"{r['images_per_s']:.2f} | {r['images_per_s_median']:.2f} | {r['vs_first']:.2f} | {vm} | {va} |")
    return "\n".join(out)
