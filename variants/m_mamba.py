"""`m-mamba`: seed 001's Multimodal-Mamba block. Each scan direction reads its own sequence
``[text; image in direction k's order]`` with its own Mamba; the image outputs of all directions
are summed back in raster order, and the text outputs of all directions go through a learned
*text merge* that updates the text stream carried to the next block::

    u_t, u_x = LN(t), LN(x)                                    [B, T, D], [B, L, D]
    y_k      = Mamba_k([u_t; scan_k(u_x)])                     one Mamba per direction k
    x        = x + sum_k unscan_k(y_k at the image positions)
    t        = t + Merge(y_1 at the text positions, ..., y_K at the text positions)

text_merge ``concat`` (default): ``Merge = Linear(K D -> D)`` of the K text outputs side by side,
so the block learns how much each direction's reading of the caption counts; ``mean``:
``Merge = Linear(D -> D)`` of their average. Both are initialised to the plain average (the
weight is ``[I/K, ..., I/K]`` resp. ``I``, zero bias): at init the text update is the mean of the
directions' text outputs, and training moves away from it.

Where the seed is specific we follow it: four cross-scan directions by default (VMamba's rows,
columns and both reversed: ``scan: cross4``), the text ahead of the image in every direction
(the figure's "Text | Image Dir-k" rows; so every image token reads the caption in every
direction, and the caption's own outputs see no image token), a separate Mamba per direction,
and a "Text Merge" whose result is the next block's text. ``scan`` is honoured (``forward`` and
``bidirectional`` give K = 1 or 2). The seed's "gate mechanism to selectively focus on certain
words" is Mamba's own input-dependent selection; nothing extra is added for it.

How this differs from ``mamba-prefix`` (prefix, any scan): there the text positions are part of
one residual stream too, but their update is the plain *sum* of the directions' text outputs;
here it is a learned merge. The last block's text update would reach no output (only image
tokens are returned), so the last block has no merge (it would be a dead parameter).

Padded text (``text_mask`` False) is zeroed and, in every direction, moved ahead of everything
(``ablate.model.scan_order.pads_first``), where the Mamba ``mask`` makes it inert: the output
depends neither on the padded values nor on how many pads there are. The text stream is
re-zeroed at padded positions after every merge.

Init: mamba-ssm's ``Mamba`` per mixer; out_proj weights divided by sqrt(depth * K) as in
``mamba-prefix``. No final LayerNorm: the generator applies its own.

Legend: B batch, L image tokens, T text tokens, S = T + L, D width, K scan directions.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field
from torch import Tensor

from ablate.model.mamba import Mamba
from ablate.model.scan_order import inverse, pads_first, permute, scan_permutations, sequence_orders
from ablate.registry import VariantContext
from variants._common import MambaBackbone, MambaOptions, prefix_text


class Config(MambaOptions):
    text_merge: Literal["concat", "mean"] = Field(
        "concat", description="merge of the directions' text outputs: Linear(K D -> D) of them side by side, "
                              "or Linear(D -> D) of their mean")
    scan: Literal["forward", "bidirectional", "cross4"] = Field(
        "cross4", description="image scan directions, one Mamba each (seed 001: cross4; forward: causal ablation)")


class Block(nn.Module):
    """One M-Mamba block; ``merge=False`` for the last block (its text update is unused)."""

    def __init__(self, width: int, cfg: Config, n_directions: int, dropout: float, merge: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mixers = nn.ModuleList(
            Mamba(width, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand) for _ in range(n_directions))
        self.merge_mode = cfg.text_merge
        self.merge = None
        if merge:
            k_in = n_directions if cfg.text_merge == "concat" else 1
            self.merge = nn.Linear(k_in * width, width)
            with torch.no_grad():  # = the mean over directions
                self.merge.weight.copy_(torch.eye(width).repeat(1, k_in) / k_in)
                self.merge.bias.zero_()
        self.drop = nn.Dropout(dropout)

    def forward(self, t: Tensor, x: Tensor, orders: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``t: [B, T, D]``, ``x: [B, L, D]`` raster, ``orders: [K, B, S]`` over ``[text; image]``,
        ``mask: [B, S]`` -> the updated ``(t, x)`` (``t`` unchanged without a merge)."""
        n_text = t.shape[1]
        u = self.norm(torch.cat([t, x], dim=1))  # [B, S, D]
        img, texts = None, []
        for mixer, p in zip(self.mixers, orders):
            y = permute(mixer(permute(u, p), permute(mask, p)), inverse(p))  # back to [text; raster]
            img = y[:, n_text:] if img is None else img + y[:, n_text:]
            texts.append(y[:, :n_text])
        x = x + self.drop(img)
        if self.merge is not None:
            if self.merge_mode == "concat":
                upd = self.merge(torch.cat(texts, dim=-1))  # [B, T, K D] -> [B, T, D]
            else:
                upd = self.merge(torch.stack(texts).mean(0))
            t = t + self.drop(upd)
            t = torch.where(mask[:, :n_text].unsqueeze(-1), t, t.new_zeros(()))
        return t, x


class MMamba(MambaBackbone):
    name = "m-mamba"
    description = "M-Mamba: per-direction Mamba over [text; image], image outputs summed, text outputs merged"
    Config = Config

    def __init__(self, ctx: VariantContext, cfg: Config):
        super().__init__()
        self.text_len = ctx.text_len
        image_perms = scan_permutations(cfg.scan, ctx.grid)  # [K, L]
        self.register_buffer("orders", sequence_orders(image_perms, ctx.text_len, "prefix"),
                             persistent=False)  # [K, S]
        k = image_perms.shape[0]
        self.blocks = nn.ModuleList(Block(ctx.width, cfg, k, ctx.dropout, merge=i < ctx.depth - 1)
                                    for i in range(ctx.depth))
        with torch.no_grad():
            for block in self.blocks:
                for mixer in block.mixers:
                    mixer.out_proj.weight.div_(math.sqrt(ctx.depth * k))

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``h: [B, L, D]``."""
        b, length, _ = x.shape
        text, text_mask = prefix_text("m-mamba", self.text_len, self.orders.shape[1], x, text, text_mask)
        mask = torch.cat([text_mask, text_mask.new_ones(b, length)], dim=1)  # [B, S]
        orders = pads_first(self.orders, mask)  # [K, B, S]
        h = x
        for block in self.blocks:
            text, h = block(text, h, orders, mask)
        return h


VARIANT = MMamba
