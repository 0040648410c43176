"""`mamba-parallel`: two Mamba streams side by side, one over the image tokens and one over the
caption; per layer their outputs are combined and projected into the image residual stream::

    u_0 = text (pads zeroed),  h_0 = x
    per layer i (text_layers: all):
    y_i = sum_k unscan_k(ImgMamba_ik(scan_k(LN(h_i))))                 [B, L, D]
    v_i = sum_j unscan_j(TxtMamba_ij(scan_j(LN_u(u_i)), text_mask))   [B, T, D], pads zeroed
    u_{i+1} = u_i + v_i                                                the text stream's residual
    q_i = masked_mean(v_i)                                             [B, D]
    h_{i+1} = h_i + P_i(combine(y_i, q_i))

    combine: sum    -> y + q            P_i: Linear(D, D),  init I
             mul    -> y * (1 + q)      P_i: Linear(D, D),  init I
             concat -> [y; q]           P_i: Linear(2D, D), init [I | I]

(``q`` is broadcast over the L image tokens.) With ``text_layers: one`` there is a single text
Mamba layer, run once before the stack, and its ``q_0`` is used by every layer (the notes'
"keep Mamba B text only ... only one layer").

Choices where the notes are open:

- The text Mamba's [B, T, D] output meets the [B, L, D] image output through its masked mean
  over the real tokens: the lengths differ and a mean ignores pads and their placement.
- ``q`` is the text *branch* output ``v_i`` (a Mamba output like ``y_i``, on the same scale),
  not the text stream ``u`` (which carries the raw caption).
- ``mul`` is ``y (1 + q)`` rather than ``y q``: a gate around 1, so a silent text branch leaves
  the image Mamba's output as is (``y q`` would zero every layer at init, where q is small).
  Likewise ``P`` starts at the identity ([I | I] for concat, = sum at init), so every combine
  reduces to the plain image Mamba stack when ``q = 0``, e.g. for the empty caption.
- Text scans (``text_scan``): ``forward`` (the default: causal over the caption; the mean still
  reads the last tokens, which have seen all of it) or ``bidirectional`` (forward + reversed, one
  Mamba each, summed; every text token sees the whole caption before pooling). The text Mambas'
  inner width is ``text_expand * D`` (the notes suggest trying smaller parallel Mambas).
  Parameters at the defaults: about 1.4x ``transformer`` at D = 96 (three Mambas per layer).
  Padded positions are moved to the front of each direction's order per sample and are inert
  (zero conv input, dt = 0), as in mamba-prefix; their outputs and stream entries are re-zeroed.
  So pad values and pad placement change nothing.
- Init: mamba-ssm's ``Mamba`` for every mixer; image out_proj divided by sqrt(depth K), text
  out_proj by sqrt(depth K_t) (K_t text directions; K_t per layer, or one layer read ``depth``
  times). ``P`` as above with zero bias.

No final LayerNorm: the generator applies its own.

Legend: B batch, L image tokens, T text tokens, D width, K image scan directions, K_t text scan
directions.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field
from torch import Tensor

from ablate.model.mamba import Mamba
from ablate.model.scan_order import MultiDirection, pads_first, scan_permutations
from ablate.registry import VariantContext
from variants._common import MambaBackbone, MambaOptions, masked_mean


class Config(MambaOptions):
    combine: Literal["sum", "mul", "concat"] = Field(
        "sum", description="merge of image output y and pooled text output q: y + q, y * (1 + q), or [y; q]")
    text_layers: Literal["all", "one"] = Field(
        "all", description="a text Mamba layer in every block (own residual stream), or one shared by all")
    text_scan: Literal["forward", "bidirectional"] = Field(
        "forward", description="text Mamba directions over the caption (causal, or + reversed)")
    text_expand: int = Field(2, ge=1, description="E_t = text_expand * D, inner width of the text Mambas")


def _mixer(width: int, cfg: Config, n_directions: int, expand: int) -> MultiDirection:
    return MultiDirection(
        lambda: Mamba(width, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=expand), n_directions)


class TextLayer(nn.Module):
    """The text branch ``v = sum_j unscan_j(Mamba_j(scan_j(LN(u)), mask))``, pads zeroed."""

    def __init__(self, width: int, cfg: Config, n_directions: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mix = _mixer(width, cfg, n_directions, cfg.text_expand)
        self.drop = nn.Dropout(dropout)

    def forward(self, u: Tensor, orders: Tensor, mask: Tensor) -> Tensor:
        v = self.drop(self.mix(self.norm(u), orders, mask))
        return torch.where(mask.unsqueeze(-1), v, v.new_zeros(()))


class ImageLayer(nn.Module):
    """``h + P(combine(sum_k unscan_k(Mamba_k(scan_k(LN(h)))), q))``."""

    def __init__(self, width: int, cfg: Config, n_directions: int, dropout: float):
        super().__init__()
        self.combine = cfg.combine
        self.norm = nn.LayerNorm(width)
        self.mix = _mixer(width, cfg, n_directions, cfg.expand)
        n_in = 2 * width if cfg.combine == "concat" else width
        self.proj = nn.Linear(n_in, width)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(width).repeat(1, n_in // width))  # I, or [I | I]
            self.proj.bias.zero_()
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, q: Tensor, perms: Tensor) -> Tensor:
        y = self.mix(self.norm(h), perms)  # [B, L, D]
        q = q.unsqueeze(1)  # [B, 1, D]
        if self.combine == "sum":
            z = y + q
        elif self.combine == "mul":
            z = y * (1 + q)
        else:
            z = torch.cat([y, q.expand_as(y)], dim=-1)
        return h + self.drop(self.proj(z))


class MambaParallel(MambaBackbone):
    name = "mamba-parallel"
    description = "Parallel image and text Mambas per layer; outputs (text pooled) combined and projected"
    Config = Config

    def __init__(self, ctx: VariantContext, cfg: Config):
        super().__init__()
        perms = scan_permutations(cfg.scan, ctx.grid)  # [K, L]
        self.register_buffer("perms", perms, persistent=False)
        t = torch.arange(ctx.text_len)
        text_orders = torch.stack([t] if cfg.text_scan == "forward" else [t, t.flip(0)])  # [K_t, T]
        self.register_buffer("text_orders", text_orders, persistent=False)
        k, kt = perms.shape[0], text_orders.shape[0]
        n_text = ctx.depth if cfg.text_layers == "all" else 1
        self.layers = nn.ModuleList(ImageLayer(ctx.width, cfg, k, ctx.dropout) for _ in range(ctx.depth))
        self.text_layers = nn.ModuleList(TextLayer(ctx.width, cfg, kt, ctx.dropout) for _ in range(n_text))
        with torch.no_grad():
            for layers, n in ((self.layers, k), (self.text_layers, kt)):
                for layer in layers:
                    for mixer in layer.mix.mixers:
                        mixer.out_proj.weight.div_(math.sqrt(ctx.depth * n))

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``h: [B, L, D]``."""
        t = text.shape[1]
        if t != self.text_orders.shape[1]:
            raise ValueError(f"mamba-parallel: built for T={self.text_orders.shape[1]}; got text [B, {t}, D]")
        mask = text_mask.bool()
        u = torch.where(mask.unsqueeze(-1), text, text.new_zeros(()))  # garbage-proof
        orders = pads_first(self.text_orders, mask)  # [K_t, B, T]
        h, q = x, None
        for i, layer in enumerate(self.layers):
            if i < len(self.text_layers):
                v = self.text_layers[i](u, orders, mask)
                u = u + v
                q = masked_mean(v, mask)
            h = layer(h, q, self.perms)
        return h


VARIANT = MambaParallel
