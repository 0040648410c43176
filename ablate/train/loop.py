"""One readable training loop: :func:`fit` over a :class:`~ablate.train.state.TrainState`, a
:class:`~ablate.train.stream.TokenStream` and :class:`Hooks`.

Everything random in a step (batch choice, masking, caption dropout, dropout) is seeded by
``(seed, step)``, so a run resumed from a checkpoint takes exactly the steps it would have taken
uninterrupted. The loop knows nothing of logging, validation, sample sheets or checkpoints:
those are hooks, called after every step.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ablate.dist import SINGLE, Dist
from ablate.paradigm import drop_text
from ablate.train.precision import autocast
from ablate.utils import step_seed

__all__ = ["fit", "train_step", "Hooks", "Interrupted"]

# (model, codes [B, L], feats [B, T, F], mask [B, T], generator, share (s, S)) -> scalar loss: the
# share's part of the global batch's mean loss (the mean itself when S = 1)
StepLoss = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator, tuple[int, int]],
                    torch.Tensor]


class Interrupted(Exception):
    """Training stopped at a step boundary on request (preemption, time limit) after saving a
    checkpoint there; a new job resumes from ``step``."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}; checkpoint saved")
        self.step = step


class Hooks:
    """What happens around the steps. The defaults do nothing."""

    def after_step(self, state: Any, loss: float) -> None:
        """Called after each optimizer step (``state.step`` already counts it)."""

    def interrupted(self) -> bool:
        """Asked at every step boundary before the last: stop here? (May raise to abort.)"""
        return False

    def checkpoint(self, state: Any) -> None:
        """Save what a resumed job needs (called before :class:`Interrupted` is raised)."""

    def finish(self, state: Any) -> None:
        """Called once when the last step is done."""


def train_step(state: Any, stream: Any, step_loss: StepLoss, seed: int, cond_dropout: float,
               dist: Dist = SINGLE) -> float:
    """One optimizer step at ``state.step`` (not incremented); returns the global batch's loss.
    Sets ``state.data_t``: the seconds this step spent reading its batches.

    The global batch is split into S = world x ``grad_accum`` shares (micro-batches on ranks);
    every share replays the step's random draws for the whole global batch and keeps its rows
    (:func:`ablate.paradigm.random_mask`), and its loss is its part of the global mean, so any
    split computes the same step as one process with the whole batch, up to float rounding."""
    step, t = state.step, state.spec
    accum, world = t.grad_accum, dist.world
    shares = world * accum
    torch.manual_seed(step_seed(seed, step, salt=1))  # module dropout
    state.model.train()
    state.opt.zero_grad(set_to_none=True)
    total, state.data_t = 0.0, 0.0
    for micro in range(accum):
        share = (dist.rank + world * micro, shares)
        g = torch.Generator().manual_seed(step_seed(seed, step))  # the global batch's draws
        t0 = time.perf_counter()
        codes, feats, mask = stream.train_batch(step, share[0], shares, world)  # [B, L], [B, T, F], [B, T]
        state.data_t += time.perf_counter() - t0
        feats, mask = drop_text(feats, mask, *stream.null, cond_dropout, generator=g, share=share)
        with dist.no_sync(state.net, last=micro == accum - 1), autocast(t.precision, state.device):
            loss = step_loss(state.net, codes, feats, mask, g, share)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        # DDP averages gradients over ranks; the shares' parts add up to the global mean
        state.backward(loss * world if world > 1 else loss)
        total += loss.item()
    state.optimizer_step()
    return dist.sum(total)


def fit(state: Any, stream: Any, step_loss: StepLoss, spec: Any, hooks: Hooks, dist: Dist = SINGLE) -> None:
    """Train from ``state.step`` to ``spec.train.steps``.

    Steps from ``spec.train.throughput_warmup`` on are timed into ``state.train_s`` (and their
    data reading into ``state.data_s``, the process's CPU time over them into
    ``state.train_cpu_s``); ``state.first_step_at`` / ``last_step_at`` are this
    attempt's wall-clock times of its first step's start and latest step's end."""
    try:
        _fit(state, stream, step_loss, spec, hooks, dist)
    finally:
        if hasattr(stream, "close"):
            stream.close()


def _fit(state: Any, stream: Any, step_loss: StepLoss, spec: Any, hooks: Hooks, dist: Dist) -> None:
    t = spec.train
    cuda = next(state.model.parameters()).device.type == "cuda"
    while state.step < t.steps:
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        if getattr(state, "first_step_at", None) is None:
            state.first_step_at = time.time()  # wall clock: compared with the submission time
        loss = train_step(state, stream, step_loss, spec.seed, t.cond_dropout, dist)
        if cuda:
            torch.cuda.synchronize()
        state.last_step_at = time.time()
        if state.step >= t.throughput_warmup:
            state.train_s += time.perf_counter() - t0
            state.train_cpu_s += time.process_time() - c0
            state.data_s += state.data_t
            state.timed_steps += 1
        state.step += 1
        hooks.after_step(state, loss)
        if state.step < t.steps and dist.any(hooks.interrupted()):
            hooks.checkpoint(state)
            raise Interrupted(state.step)
    hooks.finish(state)
