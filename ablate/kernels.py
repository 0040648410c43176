"""The compiled CPU kernels a grid's cells call, compiled once in the preparation stage.

The numba kernels of the Mamba block (selective scan forward and backward, causal conv, the
decoding step) compile on their first call per type signature, about 20 s of one core for a
training and sampling cell, and then live in numba's on-disk cache. Without this stage every
cell that starts before the cache exists compiles them itself: on a fresh install the first
wave of Mamba cells (two at once on a 2-core laptop, hundreds in a Slurm array) each spends
those seconds. :func:`warm_kernels` instead runs each distinct Mamba model configuration of the
grid once, at a tiny size, through the cell's own code paths (the paradigm's loss, backward and
sampler, under the run's precision), so that every kernel signature a cell will call is
compiled into the cache by one job beside the tokenizer and judges. Sizes do not enter a
kernel's signature, so two positions per row and two captions are enough.

Missing a signature here costs a cell its compile time, never a wrong number: the kernels are
the same functions either way.
"""
from __future__ import annotations

import importlib.util
import time
from typing import Any, Iterable, Optional

__all__ = ["model_key", "needs_warmup", "warm_kernels"]

_FAMILIES = ("mamba", "hybrid")  # backbones built from ablate.model.mamba.Mamba
_TINY_GRID = (2, 2)
_TINY_SCALES = [1, 2]


def _on_cpu(device: str) -> bool:
    if device == "cpu":
        return True
    if device == "auto":
        import torch

        return not torch.cuda.is_available()
    return False


def model_key(spec: Any) -> tuple:
    """What decides the kernels a cell calls (everything but sizes)."""
    import json

    return (spec.model.variant, json.dumps(spec.model.params, sort_keys=True), spec.model.paradigm,
            spec.model.order, spec.model.positions, spec.train.precision, spec.sample.decode,
            spec.sample.guidance > 0)


def needs_warmup(specs: Iterable[Any], registry: Optional[Any] = None) -> bool:
    """Whether some cell of ``specs`` runs a Mamba backbone on the CPU where numba is installed
    (then the preparation stage compiles its kernels once)."""
    if importlib.util.find_spec("numba") is None:
        return False
    if registry is None:
        from .registry import load_registry

        registry = load_registry()
    for spec in specs:
        cls = registry.variants.get(spec.model.variant)
        if cls is not None and getattr(cls, "family", None) in _FAMILIES and _on_cpu(spec.train.device):
            return True
    return False


def _warm_one(spec: Any) -> bool:
    """Run ``spec``'s model once, tiny: a training step's loss and backward under the run's
    precision, and the paradigm's sampler with the run's guidance and decoding. False where the
    model has no Mamba block (nothing to compile)."""
    import torch

    from .config import SampleSpec, TextSpec
    from .model import Generator
    from .model.mamba import Mamba
    from .paradigm import generation_order, get
    from .registry import load_registry
    from .text import LearnedTextEncoder
    from .train.precision import autocast

    m, device = spec.model, torch.device("cpu")
    cls = load_registry().get(m.variant)
    cfg = cls.Config(**m.params)
    text_len, codebook = 4, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = LearnedTextEncoder(TextSpec(max_len=text_len, width=m.width), [f"w{i}" for i in range(8)])
        order = generation_order(m.order, _TINY_GRID)
        par = get(m.paradigm, codebook, order, _TINY_SCALES if m.paradigm == "var" else None)
        blocks = getattr(par, "blocks", ())
        grid = (1, sum(blocks)) if blocks else _TINY_GRID
        model = Generator(cls, cfg, text, codebook_size=codebook, grid=grid, width=m.width, depth=1,
                          heads=m.heads, text_len=text_len, causal=par.causality != "none",
                          order=order if m.paradigm == "ar" else None, blocks=blocks,
                          positions=m.positions).to(device)
        if not any(isinstance(x, Mamba) for x in model.modules()):
            return False
        g = torch.Generator().manual_seed(0)
        n = grid[0] * grid[1]
        codes = torch.randint(0, codebook, (2, n), generator=g)
        mask = torch.tensor([[True] * text_len, [True, True] + [False] * (text_len - 2)])  # one padded caption
        ids = torch.where(mask, torch.randint(3, 11, (2, text_len), generator=g), 0)
        model.train()
        with autocast(spec.train.precision, device):
            loss = par.loss(model, par.make_batch(codes, g), ids, mask, 0.0)
        loss.backward()
        model.eval()
        sample = SampleSpec(steps=2, guidance=spec.sample.guidance, batch_size=2, decode=spec.sample.decode)
        null_ids = torch.zeros(1, text_len, dtype=torch.long)
        with torch.no_grad():
            par.sample(model, ids, mask, null_ids, torch.zeros(1, text_len, dtype=torch.bool), sample, g)
    return True


def warm_kernels(specs: Iterable[Any], say: Any = print) -> dict[str, float]:
    """Compile (or load from numba's cache) the CPU kernels of every distinct Mamba model
    configuration in ``specs`` that runs on the CPU. ``{"configs": n warmed, "seconds": s}``."""
    from .registry import load_registry

    registry = load_registry()
    t0, seen, warmed = time.time(), set(), 0
    for spec in specs:
        cls = registry.variants.get(spec.model.variant)
        if cls is None or getattr(cls, "family", None) not in _FAMILIES or not _on_cpu(spec.train.device):
            continue
        key = model_key(spec)
        if key in seen:
            continue
        seen.add(key)
        warmed += bool(_warm_one(spec))
    secs = time.time() - t0
    say(f"kernels: {warmed} model configuration(s) compiled or loaded in {secs:.1f}s")
    return {"configs": float(warmed), "seconds": secs}
