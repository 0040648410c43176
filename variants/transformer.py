"""`transformer`: the Muse baseline block, repeated ``depth`` times.

Each block is pre-norm and has three residual branches::

    h = h + SelfAttn(LN(h))                   bidirectional over the image tokens, no causal mask
    h = h + CrossAttn(LN(h), text, text_mask) queries from the image, keys/values from the text
    h = h + MLP(LN(h))                        Linear(D, mlp_ratio D) -> GELU -> Linear

No final LayerNorm: the generator applies its own before the head. Attention is torch's
``scaled_dot_product_attention``. A caption whose mask is all False (no real token) gets a zero
cross-attention output instead of the NaN a fully masked softmax would give.

Legend: B batch, L image tokens, T text tokens, D width, H heads.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ablate.registry import VariantContext


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width as a multiple of D")
    qk_norm: bool = Field(False, description="LayerNorm on queries and keys per head")


class Attention(nn.Module):
    """Multi-head attention; ``kv is None`` means self-attention."""

    def __init__(self, width: int, heads: int, qk_norm: bool, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        hd = width // heads
        self.q_norm = nn.LayerNorm(hd) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(hd) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, kv: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """``x: [B, L, D]``, ``kv: [B, T, D]``, ``key_mask: [B, T]`` bool (True = attend)."""
        b, n, d = x.shape
        src = x if kv is None else kv
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)  # [B, H, L, D/H]
        k, v = self.kv(src).view(b, src.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, T]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, cfg: Config, dropout: float):
        super().__init__()
        hidden = int(round(cfg.mlp_ratio * width))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = Attention(width, heads, cfg.qk_norm, dropout)
        self.cross_attn = Attention(width, heads, cfg.qk_norm, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, text: Tensor, text_mask: Tensor, has_text: Tensor) -> Tensor:
        h = h + self.drop(self.self_attn(self.norm1(h)))
        h = h + self.drop(self.cross_attn(self.norm2(h), text, text_mask)) * has_text
        return h + self.drop(self.mlp(self.norm3(h)))


class Transformer(nn.Module):
    name = "transformer"
    description = "Muse transformer: self-attention, cross-attention to text, MLP"
    family = "transformer"
    Config = Config
    scan_orders: tuple[str, ...] = ()

    def __init__(self, ctx: VariantContext, cfg: Config):
        super().__init__()
        if ctx.width % ctx.heads:
            raise ValueError(f"model.width ({ctx.width}) must be divisible by model.heads ({ctx.heads})")
        self.blocks = nn.ModuleList(Block(ctx.width, ctx.heads, cfg, ctx.dropout) for _ in range(ctx.depth))
        self._add_modules(ctx, cfg)
        self._init(3 * ctx.depth)

    def _add_modules(self, ctx: VariantContext, cfg: Config) -> None:
        """Where a subclass adds its modules (after the blocks, before initialisation)."""

    def _init(self, n_residuals: int) -> None:
        """GPT-2 style for the blocks: N(0, 0.02) weights, zero biases, residual projections
        scaled down so the residual stream's variance does not grow with depth."""
        for name, p in self.blocks.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(n_residuals) if name.endswith(("out.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith(".bias") and "norm" not in name:
                nn.init.zeros_(p)

    @staticmethod
    def _text_inputs(x: Tensor, text: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(text, key_mask, gate)`` for the blocks' cross-attention: padded states zeroed (mask
        alone would still let NaN/inf garbage into the matmul); an empty caption attends to its
        zeroed pads and its output is then multiplied by ``gate = 0``."""
        text_mask = text_mask.bool()
        has_text = text_mask.any(dim=1)  # [B]
        text = torch.where(text_mask.unsqueeze(-1), text, text.new_zeros(()))
        key_mask = text_mask | ~has_text.unsqueeze(1)
        return text, key_mask, has_text.to(x.dtype).view(-1, 1, 1)

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``h: [B, L, D]``."""
        text, key_mask, gate = self._text_inputs(x, text, text_mask)
        h = x
        for block in self.blocks:
            h = block(h, text, key_mask, gate)
        return h


VARIANT = Transformer
