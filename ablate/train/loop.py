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

from ablate.model import drop_text
from ablate.utils import step_seed

__all__ = ["fit", "train_step", "Hooks", "Interrupted"]

# (model, codes [B, L], feats [B, T, F], mask [B, T], generator) -> scalar loss
StepLoss = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


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


def train_step(state: Any, stream: Any, step_loss: StepLoss, seed: int, cond_dropout: float) -> float:
    """One optimizer step at ``state.step`` (not incremented); returns the loss. Sets
    ``state.data_t``: the seconds this step spent reading its batch."""
    step = state.step
    g = torch.Generator().manual_seed(step_seed(seed, step))
    torch.manual_seed(step_seed(seed, step, salt=1))  # module dropout
    t0 = time.perf_counter()
    codes, feats, mask = stream.train_batch(step)  # [B, L], [B, T, F], [B, T]
    state.data_t = time.perf_counter() - t0
    feats, mask = drop_text(feats, mask, *stream.null, cond_dropout, generator=g)
    state.model.train()
    loss = step_loss(state.model, codes, feats, mask, g)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}")
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer_step()
    return loss.item()


def fit(state: Any, stream: Any, step_loss: StepLoss, spec: Any, hooks: Hooks) -> None:
    """Train from ``state.step`` to ``spec.train.steps``.

    Steps from ``spec.train.throughput_warmup`` on are timed into ``state.train_s`` (and their
    data reading into ``state.data_s``); ``state.first_step_at`` / ``last_step_at`` are this
    attempt's wall-clock times of its first step's start and latest step's end."""
    try:
        _fit(state, stream, step_loss, spec, hooks)
    finally:
        if hasattr(stream, "close"):
            stream.close()


def _fit(state: Any, stream: Any, step_loss: StepLoss, spec: Any, hooks: Hooks) -> None:
    t = spec.train
    cuda = next(state.model.parameters()).device.type == "cuda"
    while state.step < t.steps:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if getattr(state, "first_step_at", None) is None:
            state.first_step_at = time.time()  # wall clock: compared with the submission time
        loss = train_step(state, stream, step_loss, spec.seed, t.cond_dropout)
        if cuda:
            torch.cuda.synchronize()
        state.last_step_at = time.time()
        if state.step >= t.throughput_warmup:
            state.train_s += time.perf_counter() - t0
            state.data_s += state.data_t
            state.timed_steps += 1
        state.step += 1
        hooks.after_step(state, loss)
        if state.step < t.steps and hooks.interrupted():
            hooks.checkpoint(state)
            raise Interrupted(state.step)
    hooks.finish(state)
