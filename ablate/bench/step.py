"""Benchmark of whole training steps: :func:`bench_steps` times one generator training step
(forward, masked loss, backward, AdamW) per variant and precision, interleaved within each repeat,
with ratios against the first row measured in the same run (``ablate bench step``)."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch

def _train_step_closure(variant: str, batch: int, width: int, depth: int, grid: tuple[int, int],
                        text_len: int, codebook_size: int, seed: int, device: str = "cpu",
                        dtype: Optional[torch.dtype] = None, compile: bool = False) -> tuple[Callable[[], None], int]:
    """One generator training step of ``variant`` (default hyperparameters, learned text
    encoder with ``TextSpec`` defaults) as a closure, and the generator's parameter count.
    Captions have random lengths in [3, T], so Mamba variants exercise their pad masking.
    ``dtype``: autocast to it (bf16, fp16; None: fp32); ``compile``: torch.compile the model."""
    from ablate.config import TextSpec
    from ablate.model.generator import Generator
    from ablate.paradigm import Masked
    from ablate.registry import load_registry
    from ablate.text import LearnedTextEncoder

    torch.manual_seed(seed)
    cls = load_registry().get(variant)
    text = LearnedTextEncoder(TextSpec(max_len=text_len, width=width), [f"w{i}" for i in range(100)])
    model = Generator(cls, cls.Config(), text, codebook_size=codebook_size, grid=grid, width=width,
                      depth=depth, heads=4, text_len=text_len).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, codebook_size, (batch, grid[0] * grid[1]), generator=g).to(device)
    lens = torch.randint(3, text_len + 1, (batch,), generator=g)
    mask = (torch.arange(text_len)[None] < lens[:, None]).to(device)
    ids = torch.where(mask.cpu(), torch.randint(3, 103, (batch, text_len), generator=g), 0).to(device)

    net = torch.compile(model) if compile else model
    cast = (lambda: torch.autocast(device_type=codes.device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    par = Masked(codebook_size)

    def step() -> None:
        with cast():
            loss = par.loss(net, par.make_batch(codes, g), ids, mask, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if codes.is_cuda:
            torch.cuda.synchronize()
    return step, sum(p.numel() for p in model.parameters())


def bench_steps(variants: Sequence[str], batch: int = 64, width: int = 96, depth: int = 4,
                grid: tuple[int, int] = (4, 4), text_len: int = 10, codebook_size: int = 512,
                repeats: int = 5, seed: int = 0, device: str = "cpu", precisions: Sequence[str] = ("fp32",),
                compile: bool = False) -> list[dict[str, Any]]:
    """Training-step time of each variant's generator at each precision, all interleaved within
    each repeat (two warm-up steps first). ``vs_first``: the median over repeats of this row's
    step time over the first row's (first variant, first precision) in the same repeat;
    ``vs_precision``: over the same variant's first precision's. Defaults: the quickstart's size."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    rows, steps, params = [], [], []
    for v in variants:
        for p in precisions:
            step, n = _train_step_closure(v, batch, width, depth, grid, text_len, codebook_size, seed, device,
                                          dtypes.get(p), compile)
            rows.append((v, p))
            steps.append(step)
            params.append(n)
    for step in steps:
        step()
        step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - t0)
    base = {v: rows.index((v, precisions[0])) for v in variants}
    return [dict(variant=v, precision=p, compile=compile, batch=batch, width=width, depth=depth,
                 seq=grid[0] * grid[1] + text_len, params=params[i], threads=torch.get_num_threads(), device=device,
                 step_s=min(times[i]), step_median_s=statistics.median(times[i]),
                 vs_first=statistics.median(a / b for a, b in zip(times[i], times[0])),
                 vs_precision=statistics.median(a / b for a, b in zip(times[i], times[base[v]])))
            for i, (v, p) in enumerate(rows)]


def format_steps(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`bench_steps` rows."""
    first = f"{rows[0]['variant']} {rows[0].get('precision', 'fp32')}" if rows else ""
    base = rows[0].get("precision", "fp32") if rows else "fp32"
    out = [f"| variant | precision | params | step ms (best) | median ms | / {first} | / {base} |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r.get('precision', 'fp32')} | {r['params']:,} | {r['step_s'] * 1e3:.1f} | "
                   f"{r['step_median_s'] * 1e3:.1f} | {r['vs_first']:.2f} | {r.get('vs_precision', 1.0):.2f} |")
    return "\n".join(out)
