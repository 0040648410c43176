"""Codebook health: how many codes a tokenizer uses, how evenly, per stage, and when that is a
collapse to refuse rather than a tokenizer to hand to the generator."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ablate.config import TokenizerSpec


def code_stats(codes: Tensor, K: int) -> dict[str, float]:
    """Codebook health of long codes [...] from a K-code book: ``codebook_usage`` (share of the K
    codes that occur) and ``perplexity`` (exp of the entropy of their frequencies)."""
    hist = torch.bincount(codes.flatten().cpu(), minlength=K).double()
    p = hist / hist.sum().clamp_min(1)
    nz = p[p > 0]
    return {"codebook_usage": float((hist > 0).double().mean()), "perplexity": float(torch.exp(-(nz * nz.log()).sum()))}


class CodebookCollapse(RuntimeError):
    """A trained tokenizer that uses almost none of its codes (``str(err)``: one line, the remedy)."""


# a tokenizer using fewer than this share of the codes it could use on the validation images
# (min(K, validation tokens)) has collapsed; healthy ones use most (measured: 98-99% of 512 codes
# on shapes, against 9 codes = 1.8% for the seed-0 tokenizer whose encoder died)
COLLAPSE_SHARE = 0.05


def check_collapse(spec: TokenizerSpec, metrics: dict[str, float], n_tokens: int, key: str,
                   log: Callable[[str], None] = print) -> None:
    """Raise :class:`CodebookCollapse` when the validation codes show a collapsed tokenizer:
    fewer than max(2, COLLAPSE_SHARE * min(K, n_tokens)) distinct codes. Tokenizers trained no
    longer than their warmup (smoke tests: 20 steps use 1 of 32 codes at any seed) are only
    logged: they never had the learning rate to collapse or to recover."""
    used = round(metrics["tok_codebook_usage"] * spec.codebook_size)
    if used >= max(2.0, COLLAPSE_SHARE * min(spec.codebook_size, n_tokens)):
        return
    if spec.total_steps <= spec.warmup_steps:
        log(f"tokenizer {key}: {used} of {spec.codebook_size} codes used after {spec.total_steps} steps "
            f"(within its {spec.warmup_steps} warmup steps: not checked for collapse)")
        return
    shown = ("codebook_size", "downsample", "act", "lookup", "lr", "seed")
    settings = ", ".join(f"{k}: {getattr(spec, k)}" for k in shown) + f", steps: {spec.total_steps}"
    raise CodebookCollapse(
        f"tokenizer {key} collapsed: {used} of {spec.codebook_size} codes used on the validation images "
        f"(perplexity {metrics['tok_perplexity']:.1f}, recon mse {metrics['tok_recon_mse']:.4f}) with "
        f"tokenizer {{{settings}}}; a relu encoder that died does this: set tokenizer.act: silu, or "
        f"another tokenizer.seed, or a lower tokenizer.lr")


def stage_metrics(stages: list[dict[str, float]]) -> dict[str, float]:
    """Per-stage health as metrics ``tok_stage<i>_<name>`` (only for schedules of several stages)."""
    if len(stages) < 2:
        return {}
    return {f"tok_stage{int(r['stage'])}_{k}": float(v) for r in stages for k, v in r.items()
            if k in ("recon_mse", "codebook_usage", "perplexity", "restarts")}
