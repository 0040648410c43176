"""What the Mamba variants share: their SSM options, the masked caption mean, the pre-norm
multi-direction Mamba layer. (A leading underscore: the registry does not look for variants here.)
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ablate.model.mamba import Mamba, MambaState, prefill, step
from ablate.model.scan_order import MultiDirection, inverse, permute

ScanOrder = Literal["forward", "bidirectional", "cross4"]
SCAN_ORDERS: tuple[str, ...] = ("forward", "bidirectional", "cross4")


class MambaOptions(BaseModel):
    """The options every Mamba variant takes (a variant's Config subclasses this)."""

    model_config = ConfigDict(extra="forbid")

    scan: ScanOrder = Field(
        "bidirectional", description="image scan directions, one Mamba each (forward: causal ablation)")
    d_state: int = Field(16, ge=1, description="N, SSM state size")
    d_conv: int = Field(4, ge=1, description="causal conv width")
    expand: int = Field(2, ge=1, description="E = expand * D")


def masked_mean(v: Tensor, mask: Tensor) -> Tensor:
    """``[B, T, D]``, ``[B, T]`` bool -> ``[B, D]``: the mean over real tokens, whatever the
    padded positions hold (NaN included); zero for a caption with no real token."""
    v = torch.where(mask.unsqueeze(-1), v, v.new_zeros(()))
    return v.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(v.dtype)


def prefix_text(name: str, text_len: int, seq_len: int, x: Tensor, text: Tensor,
                text_mask: Tensor) -> tuple[Tensor, Tensor]:
    """For a variant that reads ``[text; image]`` (built for ``text_len`` caption tokens and
    ``seq_len`` positions in all): check the shapes (ValueError naming the variant), and return
    the caption with its padded states zeroed (garbage-proof) and its mask as bool."""
    t, length = text.shape[1], x.shape[1]
    if t != text_len or seq_len != t + length:
        raise ValueError(f"{name}: built for T={text_len}, S={seq_len}; got text [B, {t}, D] and x [B, {length}, D]")
    text_mask = text_mask.bool()
    return torch.where(text_mask.unsqueeze(-1), text, text.new_zeros(())), text_mask


class MambaBackbone(nn.Module):
    """Base of the Mamba variants: the contract attributes they share (family, scan orders, and
    what makes one causal: a forward scan, the only order that reads no later image token)."""

    family = "mamba"
    scan_orders = SCAN_ORDERS
    paradigms: tuple[str, ...] = ("masked",)

    @classmethod
    def causal_problem(cls, cfg: BaseModel) -> str | None:
        scan = getattr(cfg, "scan", "forward")
        if scan != "forward":
            return (f"model.params.scan: {scan} reads image tokens after the one it predicts; a causal paradigm "
                    "needs scan: forward")
        return None


class MambaLayer(nn.Module):
    """Pre-norm residual layer: ``s + sum_k unscan_k(Mamba_k(scan_k(LN(s))))``."""

    def __init__(self, width: int, cfg: MambaOptions, n_directions: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mix = MultiDirection(
            lambda: Mamba(width, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand), n_directions)
        self.drop = nn.Dropout(dropout)

    def forward(self, s: Tensor, orders: Tensor, mask: Tensor) -> Tensor:
        return s + self.drop(self.mix(self.norm(s), orders, mask))

    def prefill(self, s: Tensor, order: Tensor, mask: Tensor) -> tuple[Tensor, MambaState]:
        """One direction (``order [B, S]`` per sample): the layer over ``s`` and the state after
        it, to continue position by position with :meth:`step`."""
        (mixer,) = self.mix.mixers
        y, state = prefill(mixer, permute(self.norm(s), order), permute(mask, order))
        return s + permute(y, inverse(order)), state

    def step(self, s: Tensor, state: MambaState) -> Tensor:
        """The next position ``s [B, D]`` (a forward scan's next element), or the next n
        ``s [B, n, D]`` (one scan from the state)."""
        (mixer,) = self.mix.mixers
        return s + step(mixer, self.norm(s), state)
