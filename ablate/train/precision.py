"""How a step runs on its hardware: autocast dtype, gradient scaling, TF32, torch.compile with a
logged fallback, and activation checkpointing of backbone layers. None of it changes what is
computed beyond rounding; fp32 with everything off is the reference.

- ``autocast(precision, device)``: bf16 or fp16 autocast (CPU and CUDA), nothing for fp32. The
  selective scan turns autocast off inside and keeps its state and sums in fp32
  (:mod:`ablate.ops.selective_scan`), as mamba-ssm's kernel does; its inputs may be half.
- fp16 needs a gradient scaler (:func:`make_scaler`), bf16 does not (fp32's exponent range).
- :func:`enable_tf32` lets CUDA matmuls and convolutions use TF32 where the GPU has it.
- :func:`checkpoint_layers` recomputes every layer of the backbone's ``layers``/``blocks`` lists
  in the backward pass (state-dict keys unchanged).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["DTYPES", "autocast", "make_scaler", "enable_tf32", "checkpoint_layers", "compile_model"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYER_LISTS = ("layers", "blocks")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``precision``'s dtype on ``device`` (a null context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (disabled, its calls pass through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def enable_tf32(device: torch.device) -> None:
    """TF32 matmuls and cuDNN convolutions on CUDA GPUs that have them (Ampere and later)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_layers(backbone: nn.Module) -> int:
    """Make every module of ``backbone``'s direct ``layers`` / ``blocks`` ModuleLists recompute
    its activations in the backward pass (when gradients are on); returns how many. The modules
    keep their names, so checkpoints load either way. 0 means the variant has no such list."""
    n = 0
    for name in LAYER_LISTS:
        layers = getattr(backbone, name, None)
        if isinstance(layers, nn.ModuleList):
            for layer in layers:
                if not getattr(layer, "_ablate_checkpointed", False):
                    layer.forward = functools.partial(_checkpointed, layer.forward)
                    layer._ablate_checkpointed = True
                n += 1
    return n


def compile_model(model: nn.Module, log: Callable[[str], None]) -> nn.Module:
    """``torch.compile(model)``, or ``model`` itself with the reason logged where compiling is
    unavailable. Compilation errors at the first call are the caller's to catch
    (:class:`CompiledOrEager`)."""
    try:
        return torch.compile(model)
    except Exception as exc:  # noqa: BLE001 - any reason to stay eager is logged, never fatal
        log(f"train.compile: staying eager ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        return model


class CompiledOrEager:
    """Calls the compiled module; if the first call fails, logs the reason once and uses the
    eager module from then on (that call is repeated eagerly). ``module`` is what runs now."""

    def __init__(self, eager: nn.Module, compiled: nn.Module, log: Callable[[str], None]):
        self.eager, self.module, self.log = eager, compiled, log
        self.tried = compiled is eager

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.tried:
            return self.module(*args, **kwargs)
        try:
            out = self.module(*args, **kwargs)
            self.tried = True
            return out
        except Exception as exc:  # noqa: BLE001
            self.log(f"train.compile: falling back to eager ({type(exc).__name__}: "
                     f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})")
            self.module, self.tried = self.eager, True
            return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.eager, name)
