"""Shared by the variant test files: a small problem (B=2 samples, a 3x4 token grid, T=5 caption
tokens, width 16), a backbone built in float64 from a seed, and right-padded inputs."""
from __future__ import annotations

import torch

from ablate.registry import VariantContext

F64 = torch.float64
GRID = (3, 4)
B, L, T, D = 2, 12, 5, 16
CTX = VariantContext(width=D, depth=2, heads=2, grid=GRID, text_len=T)


def build(cls, ctx: VariantContext = CTX, seed: int = 0, **params):
    """``cls`` with ``params`` on ``ctx``, seeded, float64, eval mode."""
    torch.manual_seed(seed)
    return cls(ctx, cls.Config(**params)).double().eval()


def inputs(seed: int = 0, n_real=(3, 5), zero_pads: bool = True):
    """``x [B, L, D]``, ``text [B, T, D]``, ``mask [B, T]`` with ``n_real`` real tokens per row;
    padded states zeroed as the generator hands them over (``zero_pads``) or left random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g, dtype=F64)
    text = torch.randn(B, T, D, generator=g, dtype=F64)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(n_real).unsqueeze(1)  # right-padded
    return x, (text * mask.unsqueeze(-1) if zero_pads else text), mask


def assert_resume_is_exact(spec, prep, root, stop_at: int):
    """Train ``spec`` uninterrupted, and again killed right after a checkpoint at step
    ``stop_at`` and resumed: the final weights (EMA too) must be identical. Returns the
    uninterrupted trainer."""
    from ablate.train import Trainer

    cpu = torch.device("cpu")
    full = Trainer(spec, prep, cpu, root / "runs" / "full")
    full.train()
    part = Trainer(spec, prep, cpu, root / "runs" / "resumed")
    for _ in range(stop_at):  # as if the job were killed right after this checkpoint
        part.train_step(part.step)
        part.step += 1
    part.save_checkpoint()
    del part
    resumed = Trainer(spec, prep, cpu, root / "runs" / "resumed")
    assert resumed.step == stop_at
    resumed.train()
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        if torch.is_tensor(a):  # (the text encoder also stores its vocabulary as extra state)
            assert torch.equal(a, b), name
    if full.ema is not None:
        for a, b in zip(full.ema.parameters(), resumed.ema.parameters()):
            assert torch.equal(a, b)
    return full
