"""`mamba-prefix`: text conditioning by sequence position. The caption's states join the image
tokens in one sequence, and a stack of ``depth`` residual pre-norm Mamba layers runs over it::

    s = [text; image]                       (text_position: prefix | middle | suffix)
    s = s + sum_k unscan_k(Mamba_k(scan_k(LN(s))))     one Mamba per scan direction k
    h = s at the image positions

Placement and scan directions. A direction k reorders the image tokens (raster, reversed
raster, columns, ...; see ``ablate.model.scan_order``) and the text is then placed at the same
point of *that direction's* reading: ``prefix`` = before its first image token, ``middle`` =
after its first L // 2 image tokens, ``suffix`` = after its last. So with ``prefix`` every
direction, reversed ones included, reads the caption first; with ``middle`` each image token
reads the caption in some directions only (forward scan: the second half of the raster only);
``suffix`` is a negative control: every direction reads the caption after all image tokens, so
no image token ever sees it (the result is an unconditional model that pays for the text).
The caption keeps its own word order in every direction.

Padded text (``text_mask`` False). The padded states are zeroed and each direction's sequence
is reordered per sample so that padded positions come first, followed by the real tokens in the
order above. Inside every Mamba layer they are inert (zero conv input, dt = 0: the state is
neither decayed nor written). A run of inert positions at the start of a sequence is exactly
equivalent to its absence (state and conv history are zero there anyway), so the output depends
neither on the padded values nor on how many pads there are.

Init: mamba-ssm's ``Mamba`` for each mixer; out_proj weights divided by sqrt(depth * K) as
mamba-ssm's MixerModel does per residual branch (K directions add K branches per layer).
No final LayerNorm: the generator applies its own.

Legend: B batch, L image tokens, T text tokens, S = T + L, D width, K scan directions.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field
from torch import Tensor

from ablate.model.scan_order import pads_first, scan_permutations, sequence_orders
from ablate.registry import VariantContext
from variants._common import MambaBackbone, MambaLayer, MambaOptions, prefix_text


class Config(MambaOptions):
    text_position: Literal["prefix", "middle", "suffix"] = Field(
        "prefix", description="where each scan direction reads the caption")


Layer = MambaLayer  # the name the tests import
__all__ = ["Config", "Layer", "MambaPrefix", "VARIANT", "pads_first", "sequence_orders"]


class MambaPrefix(MambaBackbone):
    name = "mamba-prefix"
    description = "Mamba over [text; image]: caption states as extra sequence positions"
    Config = Config
    paradigms = ("masked", "ar", "var")  # var: a forward scan, coarse to fine, is causal, hence block-causal

    def __init__(self, ctx: VariantContext, cfg: Config):
        super().__init__()
        self.text_len, self.text_position = ctx.text_len, cfg.text_position
        image_perms = scan_permutations(cfg.scan, ctx.grid)  # [K, L]
        self.register_buffer("orders", sequence_orders(image_perms, ctx.text_len, cfg.text_position),
                             persistent=False)  # [K, S]
        k = image_perms.shape[0]
        self.layers = nn.ModuleList(Layer(ctx.width, cfg, k, ctx.dropout) for _ in range(ctx.depth))
        with torch.no_grad():
            for layer in self.layers:
                for mixer in layer.mix.mixers:
                    mixer.out_proj.weight.div_(math.sqrt(ctx.depth * k))

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``h: [B, L, D]``."""
        b, length, _ = x.shape
        t = text.shape[1]
        text, text_mask = prefix_text("mamba-prefix", self.text_len, self.orders.shape[1], x, text, text_mask)
        s = torch.cat([text, x], dim=1)  # [B, S, D]
        mask = torch.cat([text_mask, text_mask.new_ones(b, length)], dim=1)  # [B, S]
        orders = pads_first(self.orders, mask)  # [K, B, S]
        for layer in self.layers:
            s = layer(s, orders, mask)
        return s[:, t:]

    def decoder(self, text: Tensor, text_mask: Tensor, length: int) -> "PrefixDecoder | None":
        """Recurrent decoding (forward scan, caption as prefix): every layer's state after the
        caption, then one image position per step, O(1) each. None for the other placements."""
        if self.text_position != "prefix" or self.orders.shape[0] != 1:
            return None
        return PrefixDecoder(self, text, text_mask)


class PrefixDecoder:
    def __init__(self, model: MambaPrefix, text: Tensor, text_mask: Tensor):
        text_mask = text_mask.bool()
        s = torch.where(text_mask.unsqueeze(-1), text, text.new_zeros(()))
        order = pads_first(torch.arange(text.shape[1], device=text.device)[None], text_mask)[0]  # [B, T]
        self.layers, self.states = model.layers, []
        for layer in model.layers:
            s, state = layer.prefill(s, order, text_mask)
            self.states.append(state)

    def step(self, x: Tensor) -> Tensor:
        """``x [B, D]`` -> ``[B, D]``; ``x [B, n, D]`` (a var scale) as one scan per layer."""
        for layer, state in zip(self.layers, self.states):
            x = layer.step(x, state)
        return x


VARIANT = MambaPrefix
