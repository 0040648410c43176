"""The state of a training run: everything a resumed job needs, saved and loaded as one.

:class:`TrainState` holds the model, its EMA copy, the optimizer, the learning-rate schedule, the
step and the run's counters (timed seconds, data seconds, last losses, peak memory). Its
:meth:`~TrainState.optimizer_step` is the one place where a step's gradients become weights:
clip, step, schedule, EMA.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ablate.train.precision import make_scaler
from ablate.utils import atomic_torch_save, torch_load

__all__ = ["TrainState", "lr_factor", "param_groups", "latest_checkpoint", "foreign_checkpoints",
           "remove_checkpoints"]

# counters saved with the weights (their defaults: a fresh run, or a checkpoint older than them)
COUNTERS = {"train_s": 0.0, "train_cpu_s": 0.0, "data_s": 0.0, "timed_steps": 0, "last_train_loss": float("nan"),
            "last_val_loss": float("nan"), "loss_acc": 0.0, "loss_n": 0, "peak_mem_mb": float("nan")}


def lr_factor(step: int, spec) -> float:  # noqa: ANN001
    """Linear warmup, then cosine decay to ``min_lr_ratio`` at the last step."""
    if spec.warmup_steps and step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    span = max(1, spec.steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms, embeddings or positions."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _header(f: Path) -> Optional[tuple[int, Optional[str]]]:
    """(step, code fingerprint or None when unrecorded) of checkpoint ``f``; None when unreadable."""
    try:
        st = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        return int(st["step"]), st.get("fingerprint")
    except Exception:  # a file being replaced right now, or damaged: not a resume point
        return None


def latest_checkpoint(folder: Path, fingerprint: Optional[str] = None) -> Optional[Path]:
    """The checkpoint furthest in training among the attempts' files (``ckpt*.pt``) in ``folder``;
    with ``fingerprint``, among those written by that code only (see :func:`foreign_checkpoints`)."""
    best, best_step = None, -1
    for f in sorted(Path(folder).glob("ckpt*.pt")):
        head = _header(f)
        if head is None or (fingerprint is not None and head[1] != fingerprint):
            continue
        if head[0] > best_step:
            best, best_step = f, head[0]
    return best


def foreign_checkpoints(folder: Path, fingerprint: str) -> list[tuple[Path, Optional[str]]]:
    """The checkpoints in ``folder`` written by other code than ``fingerprint`` (or by a version
    that did not record its code), with the fingerprint each names. A run's result comes from one
    code version: weights trained by other code are no resume point for it."""
    out = []
    for f in sorted(Path(folder).glob("ckpt*.pt")):
        head = _header(f)
        if head is not None and head[1] != fingerprint:
            out.append((f, head[1]))
    return out


def remove_checkpoints(folder: Path) -> None:
    """Delete every attempt's checkpoint (once the run's result is committed)."""
    for f in Path(folder).glob("ckpt*.pt"):
        f.unlink(missing_ok=True)


class TrainState:
    """Model, EMA, AdamW, schedule, step and counters of one run (``spec``: its TrainSpec)."""

    def __init__(self, model: nn.Module, spec: Any, device: torch.device):
        self.model, self.spec, self.device = model, spec, device
        self.net: Any = model  # what a step calls: the model, compiled and/or DDP-wrapped
        self.ema = copy.deepcopy(model).requires_grad_(False) if spec.ema_decay > 0 else None
        self.opt = torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr, betas=spec.betas,
                                     fused=device.type == "cuda")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, spec))
        self.scaler = make_scaler(getattr(spec, "precision", "fp32"), device)
        self.step = 0
        self.fingerprint: Optional[str] = None  # the code that trains it, saved with every checkpoint
        for name, value in COUNTERS.items():
            setattr(self, name, value)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` (scaled first under fp16); they add up over micro-batches."""
        self.scaler.scale(loss).backward()

    def optimizer_step(self) -> None:
        """Apply the gradients of step ``self.step``: (unscale,) clip, AdamW, schedule, EMA.
        Under fp16 a step whose gradients overflowed is skipped by the scaler (its scale halves)."""
        t = self.spec
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        if t.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.ema is not None:
            # warm EMA: short runs must not average in the random initialisation
            decay = min(t.ema_decay, (1 + self.step) / (10 + self.step))
            torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.model.parameters()],
                                 1 - decay)
            for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(bm)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "fingerprint": self.fingerprint, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "ema": self.ema.state_dict() if self.ema else {},
                "scaler": self.scaler.state_dict(),
                **{name: getattr(self, name) for name in COUNTERS}}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(st["ema"])
        self.step = int(st["step"])
        for name, default in COUNTERS.items():
            setattr(self, name, type(default)(st.get(name, default)))

    def save(self, path: Path) -> None:
        """Write the state atomically (a reader never sees half a checkpoint)."""
        atomic_torch_save(self.state_dict(), path)

    def load(self, path: Path) -> None:
        self.load_state_dict(torch_load(path))
