"""`mamba-skip-E`: an image-only Mamba stack whose layers each add the caption through an extra
skip connection, the pooled text projected by an input-dependent matrix ``E(x_t)``::

    p    = masked_mean(text)                                   [B, D], pads excluded
    per layer:
    n_t  = LN(h)_t
    h_t  = h_t + sum_k unscan_k(Mamba_k(scan_k(LN(h))))_t + g * E(n_t) LN_p(p)

    e_form gated:   E(n) = diag(sigmoid(W_g n + b_g)) W_t                  W_g, W_t [D, D]
    e_form lowrank: E(n) = U diag(W_x n + b_x) V                            U [D, r], W_x, V [r, D]

with ``g`` = 1 if the caption has a real token, else 0. ``E`` is the notes' "matrix E that can be
input-dependent": a D x D matrix per image token, built from that token's normalised state and
applied to the caption summary; the gated form is a token-dependent channel gate on one text
projection (rank D, the dependence is diagonal), the low-rank form lets the token choose how to
mix r text directions (rank r, ``rank`` in the Config).

Choices where the notes are open:

- The caption enters as its masked mean ``p`` (the notes add "the text tokens" to a Mamba output
  whose length is L, not T, so some reduction over the T positions is needed; the mean is the
  simplest that ignores pads and their placement). Each layer has its own ``LN_p`` on ``p``.
- The skip reads the same pre-norm ``LN(h)`` as the Mamba mixers (a parallel branch) and is
  added to the residual stream next to them, i.e. to the block output.
- Empty caption (no real token): ``g = 0``, the skip contributes nothing, as ``transformer``'s
  cross-attention does.
- Init: mamba-ssm's ``Mamba`` per mixer; a layer has K + 1 residual branches (K directions and the
  skip), so every out_proj and the skip's output matrix (``W_t`` resp. ``U``, torch's default
  Linear init) are divided by sqrt(depth (K + 1)). ``W_g`` ~ N(0, 0.02) and ``b_g = 0`` (gates
  start near 1/2); ``W_x``, ``V``: torch's default Linear init, ``b_x = 0``. The text
  projections have no bias, so ``E`` acts on the caption alone.

No final LayerNorm: the generator applies its own. Scan directions reorder the image tokens
only; the text never enters a scan, so ``scan: forward`` still conditions every token.

Legend: B batch, L image tokens, T text tokens, D width, K scan directions, r rank. (The
matrix E(x_t) is not the Mamba inner width E = expand * D of the Config.)
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field
from torch import Tensor

from ablate.model.mamba import Mamba
from ablate.model.scan_order import MultiDirection, scan_permutations
from ablate.registry import VariantContext
from variants._common import MambaBackbone, MambaOptions, masked_mean


class Config(MambaOptions):
    e_form: Literal["gated", "lowrank"] = Field(
        "gated", description="E(x_t): gated = diag(sigmoid(W_g x_t)) W_t; lowrank = U diag(W_x x_t) V")
    rank: int = Field(16, ge=1, description="r, inner rank of E for e_form lowrank (unused by gated)")


class SkipE(nn.Module):
    """The text skip ``E(n_t) p``: ``n [B, L, D]``, ``p [B, D]`` -> ``[B, L, D]``."""

    def __init__(self, width: int, form: str, rank: int):
        super().__init__()
        self.form = form
        if form == "gated":
            self.gate = nn.Linear(width, width)  # W_g, b_g
            self.value = nn.Linear(width, width, bias=False)  # W_t: the branch's output matrix
            nn.init.normal_(self.gate.weight, std=0.02)
            nn.init.zeros_(self.gate.bias)
        else:
            self.coef = nn.Linear(width, rank)  # W_x, b_x: the token-dependent diagonal
            self.text_in = nn.Linear(width, rank, bias=False)  # V
            self.value = nn.Linear(rank, width, bias=False)  # U: the branch's output matrix
            nn.init.zeros_(self.coef.bias)

    def forward(self, n: Tensor, p: Tensor) -> Tensor:
        if self.form == "gated":
            return torch.sigmoid(self.gate(n)) * self.value(p).unsqueeze(1)
        return self.value(self.coef(n) * self.text_in(p).unsqueeze(1))


class Layer(nn.Module):
    """``h + sum_k unscan_k(Mamba_k(scan_k(LN(h)))) + g E(LN(h)) LN_p(p)``."""

    def __init__(self, width: int, cfg: Config, n_directions: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.text_norm = nn.LayerNorm(width)
        self.mix = MultiDirection(
            lambda: Mamba(width, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand), n_directions)
        self.skip = SkipE(width, cfg.e_form, cfg.rank)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, p: Tensor, gate: Tensor, perms: Tensor) -> Tensor:
        n = self.norm(h)
        return h + self.drop(self.mix(n, perms) + self.skip(n, self.text_norm(p)) * gate)


class MambaSkipE(MambaBackbone):
    name = "mamba-skip-E"
    description = "Image-only Mamba; each layer adds the pooled caption through a token-dependent matrix E(x_t)"
    Config = Config

    def __init__(self, ctx: VariantContext, cfg: Config):
        super().__init__()
        perms = scan_permutations(cfg.scan, ctx.grid)  # [K, L]
        self.register_buffer("perms", perms, persistent=False)
        k = perms.shape[0]
        self.layers = nn.ModuleList(Layer(ctx.width, cfg, k, ctx.dropout) for _ in range(ctx.depth))
        scale = math.sqrt(ctx.depth * (k + 1))
        with torch.no_grad():
            for layer in self.layers:
                for mixer in layer.mix.mixers:
                    mixer.out_proj.weight.div_(scale)
                layer.skip.value.weight.div_(scale)

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``h: [B, L, D]``."""
        text_mask = text_mask.bool()
        p = masked_mean(text, text_mask)  # [B, D]
        gate = text_mask.any(dim=1).to(x.dtype).view(-1, 1, 1)
        h = x
        for layer in self.layers:
            h = layer(h, p, gate, self.perms)
        return h


VARIANT = MambaSkipE
