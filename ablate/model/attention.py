"""Attention blocks the variants share: multi-head attention (self or cross, optionally causal,
with a key/value cache for decoding one token at a time), the Muse transformer block, and the
stack of those blocks that the ``transformer`` and ``uvit`` variants are.

Attention is torch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
A caption whose mask is all False (no real token) gets a zero cross-attention output instead of
the NaN a fully masked softmax would give.

Legend: B batch, L image tokens, T text tokens, D width, H heads.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .labels import label


def rope_tables(coords: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """2D rotary position tables (seed 002's 2D RoPE): ``coords [S, 2]`` (row, column; floats)
    -> ``(cos, sin)`` ``[S, head_dim / 2]``: the first half of each head's rotation pairs turns
    with the row, the second half with the column, at RoPE's geometric frequencies."""
    if head_dim % 4:
        raise ValueError(f"model.positions: rope2d needs a head width (model.width / model.heads) divisible by 4, "
                         f"got {head_dim}")
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # [hd/4]
    angles = torch.cat([coords[:, :1].double() * freqs, coords[:, 1:].double() * freqs], dim=-1)  # [S, hd/2]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, rope: Optional[tuple[Tensor, Tensor]]) -> Tensor:
    """Rotate ``x [B, H, S, hd]`` by ``rope = (cos, sin) [S, hd/2]`` (pairs of adjacent channels);
    ``x`` itself when ``rope`` is None. Dot products of rotated queries and keys depend on the
    coordinates' differences only."""
    if rope is None:
        return x
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def image_coords(grid: tuple[int, int], order: Optional[Tensor] = None, blocks: tuple[int, ...] = ()) -> Tensor:
    """``[L, 2]`` (row, column) of each position of the sequence: raster position ``order[i]`` on
    ``grid``; for var's scales (``blocks``, the sides' squares) each scale's token centres on the
    finest map (a coarse token sits at the centre of the area it covers)."""
    if blocks:
        sides = [int(round(b ** 0.5)) for b in blocks]
        side = sides[-1]
        out = []
        for s in sides:
            c = (torch.arange(s, dtype=torch.float64) + 0.5) * side / s - 0.5
            out.append(torch.stack(torch.meshgrid(c, c, indexing="ij"), dim=-1).reshape(-1, 2))
        return torch.cat(out)
    h, w = grid
    idx = torch.arange(h * w) if order is None else order
    return torch.stack([idx // w, idx % w], dim=-1).double()


def rope_rows(module: nn.Module, i: Optional[int] = None, n: int = 1) -> Optional[tuple[Tensor, Tensor]]:
    """A module's rotary tables (its ``rope_cos`` / ``rope_sin`` buffers) for every position, or
    for positions ``i .. i + n - 1``; None for a module with learned positions."""
    if not hasattr(module, "rope_cos"):
        return None
    if i is None:
        return module.rope_cos, module.rope_sin
    return module.rope_cos[i:i + n], module.rope_sin[i:i + n]


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

    def keys(self, src: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        """``src [B, S, D]`` -> keys and values ``[B, H, S, D/H]`` (keys normed, then rotated)."""
        b, s, _ = src.shape
        k, v = self.kv(src).view(b, s, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return apply_rope(self.k_norm(k), rope), v

    def query(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        b, n, _ = x.shape
        return apply_rope(self.q_norm(self.q(x).view(b, n, self.heads, -1).transpose(1, 2)), rope)  # [B, H, L, D/H]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        """``q [B, H, L, hd]`` over ``k, v [B, H, S, hd]``; ``mask`` broadcastable to ``[B, H, L, S]``
        (True = attend); ``causal``: query i attends keys <= i. -> ``[B, L, D]``."""
        p = self.dropout if self.training else 0.0
        with label("attn.sdpa"):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal and mask is None)
        b, _, n, _ = q.shape
        return self.out(y.transpose(1, 2).reshape(b, n, -1))

    def forward(self, x: Tensor, kv: Optional[Tensor] = None, key_mask: Optional[Tensor] = None,
                causal: bool = False, attn_mask: Optional[Tensor] = None,
                rope: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """``x: [B, L, D]``, ``kv: [B, T, D]``, ``key_mask: [B, T]`` bool (True = attend); or a
        full ``attn_mask`` ``[B, 1, L, S]``; ``causal`` (self-attention): query i attends keys <= i;
        ``rope`` (self-attention): 2D rotary tables of the positions (:func:`rope_tables`)."""
        with label("attn.self" if kv is None else "attn.cross"):
            k, v = self.keys(x if kv is None else kv, rope)
            mask = attn_mask if attn_mask is not None else (None if key_mask is None else key_mask[:, None, None, :])
            return self.attend(self.query(x, rope), k, v, mask, causal)


class KVCache:
    """Keys and values of the positions decoded so far, ``[B, H, n, hd]`` grown in place."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, like: Tensor):
        self.k = like.new_zeros(batch, heads, length, head_dim)
        self.v = like.new_zeros(batch, heads, length, head_dim)
        self.n = 0

    def add(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        m = k.shape[2]
        self.k[:, :, self.n:self.n + m] = k
        self.v[:, :, self.n:self.n + m] = v
        self.n += m
        return self.k[:, :, :self.n], self.v[:, :, :self.n]


class MuseBlock(nn.Module):
    """Pre-norm block with three residual branches::

        h = h + SelfAttn(LN(h))                   bidirectional, or causal for next-token paradigms
        h = h + CrossAttn(LN(h), text, text_mask) queries from the image, keys/values from the text
        h = h + MLP(LN(h))                        Linear(D, mlp_ratio D) -> GELU -> Linear
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, dropout: float):
        super().__init__()
        hidden = int(round(mlp_ratio * width))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = Attention(width, heads, qk_norm, dropout)
        self.cross_attn = Attention(width, heads, qk_norm, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, text: Tensor, text_mask: Tensor, has_text: Tensor, causal: bool = False,
                attn_mask: Optional[Tensor] = None, rope: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        h = h + self.drop(self.self_attn(self.norm1(h), causal=causal, attn_mask=attn_mask, rope=rope))
        h = h + self.drop(self.cross_attn(self.norm2(h), text, text_mask)) * has_text
        with label("mlp"):
            return h + self.drop(self.mlp(self.norm3(h)))

    def step(self, h: Tensor, cache: KVCache, text_kv: tuple[Tensor, Tensor], text_mask: Tensor,
             has_text: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """The next positions ``h [B, n, D]`` given the cache of the earlier ones: each reads the
        cache and all n (n = 1: causal; a whole scale: block-causal); ``rope``: their rotary
        tables ``[n, hd/2]``."""
        u = self.norm1(h)
        k, v = cache.add(*self.self_attn.keys(u, rope))
        h = h + self.self_attn.attend(self.self_attn.query(u, rope), k, v)
        u = self.norm2(h)
        h = h + self.cross_attn.attend(self.cross_attn.query(u), *text_kv, text_mask[:, None, None, :]) * has_text
        return h + self.mlp(self.norm3(h))


def text_inputs(x: Tensor, text: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(text, key_mask, gate)`` for cross-attention: padded states zeroed (mask alone would
    still let NaN/inf garbage into the matmul); an empty caption attends to its zeroed pads and
    its output is then multiplied by ``gate = 0``."""
    text_mask = text_mask.bool()
    has_text = text_mask.any(dim=1)  # [B]
    text = torch.where(text_mask.unsqueeze(-1), text, text.new_zeros(()))
    key_mask = text_mask | ~has_text.unsqueeze(1)
    return text, key_mask, has_text.to(x.dtype).view(-1, 1, 1)


Apply = Callable[[int, MuseBlock, Tensor], Tensor]


class TransformerStack(nn.Module):
    """``depth`` Muse blocks over the image tokens, cross-attending to the text; bidirectional,
    or causal when built with ``ctx.causal``. No final LayerNorm: the generator applies its own.
    Subclasses change how the blocks are chained (:meth:`run`) or add modules (:meth:`_add_modules`)."""

    family = "transformer"
    scan_orders: tuple[str, ...] = ()
    paradigms = ("masked", "ar", "var")
    rope = True  # its self-attention takes model.positions: rope2d

    def __init__(self, ctx, cfg):  # noqa: ANN001  (VariantContext, the variant's Config)
        super().__init__()
        if ctx.width % ctx.heads:
            raise ValueError(f"model.width ({ctx.width}) must be divisible by model.heads ({ctx.heads})")
        self.causal, self.heads = ctx.causal, ctx.heads
        self.scale_blocks = ctx.blocks  # var: block-causal over the scales
        if ctx.blocks:
            self.register_buffer("block_mask", ctx.block_mask(), persistent=False)
        if ctx.positions == "rope2d":
            cos, sin = rope_tables(torch.tensor(ctx.coords), ctx.width // ctx.heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(MuseBlock(ctx.width, ctx.heads, cfg.mlp_ratio, cfg.qk_norm, ctx.dropout)
                                    for _ in range(ctx.depth))
        self._add_modules(ctx, cfg)
        self._init(3 * ctx.depth)

    def _add_modules(self, ctx, cfg) -> None:  # noqa: ANN001
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

    _text_inputs = staticmethod(text_inputs)

    def run(self, h: Tensor, apply: Apply) -> Tensor:
        """Chain the blocks: ``h = apply(i, block_i, h)`` in order."""
        for i, block in enumerate(self.blocks):
            h = apply(i, block, h)
        return h

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``h: [B, L, D]``."""
        text, key_mask, gate = text_inputs(x, text, text_mask)
        mask = self.block_mask if self.scale_blocks else None
        rope = self.rope_at()
        return self.run(x, lambda i, block, h: block(h, text, key_mask, gate, self.causal, mask, rope))

    def rope_at(self, i: Optional[int] = None, n: int = 1) -> Optional[tuple[Tensor, Tensor]]:
        return rope_rows(self, i, n)

    def decoder(self, text: Tensor, text_mask: Tensor, length: int) -> "StackDecoder | None":
        """One position (or, block-causal, one block) at a time (needs ``ctx.causal``): each
        block's key/value cache, the caption's keys and values computed once."""
        if not self.causal:
            raise ValueError("decoder: the backbone was not built causal (ctx.causal)")
        return StackDecoder(self, text, text_mask, length)


class StackDecoder:
    def __init__(self, stack: TransformerStack, text: Tensor, text_mask: Tensor, length: int):
        self.stack = stack
        b, _, d = text.shape
        self.text, self.key_mask, self.gate = text_inputs(text, text, text_mask)
        self.text_kv = [blk.cross_attn.keys(self.text) for blk in stack.blocks]
        self.caches = [KVCache(b, stack.heads, length, d // stack.heads, text) for _ in stack.blocks]
        self.pos = 0

    def step(self, x: Tensor) -> Tensor:
        """``x [B, D]`` the next position's input -> ``h [B, D]``; or ``x [B, n, D]`` the next n
        positions (var: a whole scale, which reads itself and everything before it) -> ``[B, n, D]``."""
        single = x.dim() == 2
        x = x.unsqueeze(1) if single else x
        rope = self.stack.rope_at(self.pos, x.shape[1])
        self.pos += x.shape[1]
        out = self.stack.run(x, lambda i, block, h: block.step(
            h, self.caches[i], self.text_kv[i], self.key_mask, self.gate, rope))
        return out.squeeze(1) if single else out
