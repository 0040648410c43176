"""`mamba-seqlin-in` / `mamba-seqlin-out`: text and image joined by a learned linear map over the
*sequence* dimension (``S = T + L -> L``), at the input or at the output of a Mamba stack.

Both concatenate the caption and the image, ``s = [text; x]`` ``[B, S, D]``, and use one map
``W [L, S]``, ``b [L]`` that mixes positions, the same for every channel (``b`` is broadcast
over D: a per-position offset)::

    SeqLin(s)[:, l, :] = sum_j W[l, j] s[:, j, :] + b[l]

``mamba-seqlin-in`` (the notes' "linear layer at the input on the seq_len dimension")::

    u = SeqLin([text; x])                                      [B, L, D]
    u = u + sum_k unscan_k(Mamba_k(scan_k(LN(u))))              depth layers, image tokens only
    h = u

``mamba-seqlin-out`` ("linear layer at the output")::

    s = [text; x]                                              as mamba-prefix (text_position: prefix)
    s = s + sum_k unscan_k(Mamba_k(scan_k(LN(s))))              depth layers over S positions
    h = SeqLin(s with padded text positions zeroed)             [B, L, D]

Init of the map: ``W[:, T:] = I_L`` (image positions map to themselves), ``W[:, :T] ~
N(0, text_init_std^2)`` (a small random read of every text position), ``b = 0``. So at init
``seqlin-in`` is the plain image Mamba stack on ``x + small text mix`` and ``seqlin-out`` is
``mamba-prefix`` plus a small text mix at the output; with ``W[:, :T] = 0`` each is exactly that.

Padding. Padded text states are zeroed first (``torch.where``, so NaN/inf cannot leak); a
column of ``W`` times a zero row contributes nothing, so pad *values* never matter. ``W`` is
tied to positions, so the pads' *placement* does (a caption shifted by one position meets other
columns): the encoders right-pad, which is what it learns. In ``seqlin-out`` the Mamba stack makes
pads inert as mamba-prefix does (pads first in every direction's order, ``mask`` in each Mamba),
but the stack's *outputs* at pad positions are functions of biases, not zero, hence the
re-zeroing before the map. The text length is fixed at build time (``W`` has T columns).

Both variants read the caption through position-tied weights only: ``seqlin-in`` at the first
layer only (the inner layers never see the text again, as the notes warn), ``seqlin-out`` once
more after the stack.

Init otherwise as mamba-prefix: mamba-ssm's ``Mamba`` per mixer, out_proj weights divided by
sqrt(depth * K). No final LayerNorm: the generator applies its own.

Legend: B batch, L image tokens, T text tokens, S = T + L, D width, K scan directions.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ablate.model.scan_order import pads_first, scan_permutations, sequence_orders
from ablate.registry import VariantContext
from variants._common import MambaBackbone, MambaLayer as Layer, MambaOptions


class Config(MambaOptions):
    text_init_std: float = Field(
        0.02, ge=0, description="std of the sequence map's initial text columns W[:, :T] (image columns start at I)")


class SeqLinear(nn.Module):
    """The map over positions: ``[B, S, D] -> [B, L, D]``, ``W [L, S]``, ``b [L]``."""

    def __init__(self, text_len: int, length: int, text_init_std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(length, text_len + length))
        self.bias = nn.Parameter(torch.zeros(length))
        with torch.no_grad():
            nn.init.normal_(self.weight[:, :text_len], std=text_init_std)
            self.weight[:, text_len:].copy_(torch.eye(length))

    def forward(self, s: Tensor) -> Tensor:
        return F.linear(s.transpose(1, 2), self.weight, self.bias).transpose(1, 2)


def _stack(ctx: VariantContext, cfg: Config, k: int) -> nn.ModuleList:
    """``depth`` mamba-prefix layers (pre-norm, K directions) with out_proj / sqrt(depth K)."""
    layers = nn.ModuleList(Layer(ctx.width, cfg, k, ctx.dropout) for _ in range(ctx.depth))
    with torch.no_grad():
        for layer in layers:
            for mixer in layer.mix.mixers:
                mixer.out_proj.weight.div_(math.sqrt(ctx.depth * k))
    return layers


def _check(name: str, text_len: int, length: int, text: Tensor, x: Tensor) -> None:
    if text.shape[1] != text_len or x.shape[1] != length:
        raise ValueError(f"{name}: built for T={text_len}, L={length}; got text [B, {text.shape[1]}, D] "
                         f"and x [B, {x.shape[1]}, D] (the sequence map has fixed sizes)")


class MambaSeqLinIn(MambaBackbone):
    name = "mamba-seqlin-in"
    description = "Linear map over positions [text; image] -> image at the input, then an image-only Mamba stack"
    Config = Config

    def __init__(self, ctx: VariantContext, cfg: Config):
        super().__init__()
        self.text_len, self.length = ctx.text_len, ctx.seq_len
        self.seq = SeqLinear(ctx.text_len, ctx.seq_len, cfg.text_init_std)
        perms = scan_permutations(cfg.scan, ctx.grid)  # [K, L]
        self.register_buffer("perms", perms, persistent=False)
        self.layers = _stack(ctx, cfg, perms.shape[0])

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``h: [B, L, D]``."""
        _check(self.name, self.text_len, self.length, text, x)
        text = torch.where(text_mask.bool().unsqueeze(-1), text, text.new_zeros(()))
        u = self.seq(torch.cat([text, x], dim=1))  # [B, L, D]
        for layer in self.layers:
            u = layer(u, self.perms, None)
        return u


class MambaSeqLinOut(MambaBackbone):
    name = "mamba-seqlin-out"
    description = "Mamba stack over [text; image] (text prefix), then a linear map over positions to the image"
    Config = Config

    def __init__(self, ctx: VariantContext, cfg: Config):
        super().__init__()
        self.text_len, self.length = ctx.text_len, ctx.seq_len
        perms = scan_permutations(cfg.scan, ctx.grid)  # [K, L]
        self.register_buffer("orders", sequence_orders(perms, ctx.text_len, "prefix"), persistent=False)
        self.layers = _stack(ctx, cfg, perms.shape[0])
        self.seq = SeqLinear(ctx.text_len, ctx.seq_len, cfg.text_init_std)

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``h: [B, L, D]``."""
        _check(self.name, self.text_len, self.length, text, x)
        b = x.shape[0]
        text_mask = text_mask.bool()
        text = torch.where(text_mask.unsqueeze(-1), text, text.new_zeros(()))
        s = torch.cat([text, x], dim=1)  # [B, S, D]
        mask = torch.cat([text_mask, text_mask.new_ones(b, self.length)], dim=1)  # [B, S]
        orders = pads_first(self.orders, mask)  # [K, B, S]
        for layer in self.layers:
            s = layer(s, orders, mask)
        s = torch.where(mask.unsqueeze(-1), s, s.new_zeros(()))  # the stack's pad outputs are not 0
        return self.seq(s)


VARIANTS = [MambaSeqLinIn, MambaSeqLinOut]
