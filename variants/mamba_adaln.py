"""`mamba-adaln`: the conditioning of AiM (Li et al. 2024, "Scalable Autoregressive Image
Generation with Mamba"), the strongest pure-Mamba image generator: the caption as a prefix of
the sequence *and* adaLN-group modulation of every layer from the pooled caption::

    c      = masked mean of the caption states                    [B, D]
    (shift_g, scale_g, gate_g) = W_g SiLU(c) + b_g                 one projection per layer group g
    s      = [text; image]                                        caption as prefix, as mamba-prefix
    s      = s + (1 + gate_g) * sum_k unscan_k(Mamba_k(scan_k(LN(s) * (1 + scale_g) + shift_g)))
    h      = LN(s) * (1 + scale_f) + shift_f  at the image positions     the final adaLN

adaLN-group: the ``depth`` layers are split into ``groups`` contiguous groups that share one
modulation projection (``groups = depth``: every layer its own, DiT's adaLN; 1: one for all,
adaLN-single), the parameter/quality trade-off AiM studies. Every projection starts at zero
(shift = scale = gate = 0), so at init the stack is exactly ``mamba-prefix`` and the final adaLN a
plain LayerNorm; the caption's pooled state then learns to steer each group.

The generator applies its own LayerNorm after the backbone; a per-sample, per-channel scale and
shift of the normalised state are not undone by it (LayerNorm removes one mean and one scale per
position, not per channel), so the final adaLN's conditioning survives.

Causal with ``scan: forward`` (the pooled caption depends on the caption only): it serves ``ar``
with recurrent decoding (the caption prefilled, then one image position per step, O(1) each).
Padded caption positions are zeroed, moved first and inert, as in ``mamba-prefix``; the pooled
caption ignores them; an empty caption pools to zero (no modulation from it).

Legend: B batch, L image tokens, T text tokens, S = T + L, D width, K scan directions.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from pydantic import Field
from torch import Tensor

from ablate.model.mamba import Mamba, MambaState, prefill, step
from ablate.model.scan_order import MultiDirection, inverse, pads_first, permute, scan_permutations, sequence_orders
from ablate.registry import VariantContext
from variants._common import MambaBackbone, MambaOptions, masked_mean, prefix_text


class Config(MambaOptions):
    groups: int = Field(4, ge=1, description="layer groups that share one adaLN projection (capped at depth)")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x [B, S, D] * (1 + scale) + shift`` with ``shift, scale [B, D]``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class AdaLayer(nn.Module):
    """Pre-norm residual Mamba layer (one mixer per direction) with its norm and branch modulated."""

    def __init__(self, width: int, cfg: Config, k: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mix = MultiDirection(lambda: Mamba(width, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand), k)
        self.drop = nn.Dropout(dropout)

    def forward(self, s: Tensor, orders: Tensor, mask: Tensor, mod: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        shift, scale, gate = mod
        y = self.mix(modulate(self.norm(s), shift, scale), orders, mask)
        return s + self.drop(y) * (1 + gate.unsqueeze(1))

    def prefill(self, s: Tensor, order: Tensor, mask: Tensor, mod: tuple[Tensor, Tensor, Tensor]
                ) -> tuple[Tensor, MambaState]:
        shift, scale, gate = mod
        (mixer,) = self.mix.mixers
        y, state = prefill(mixer, permute(modulate(self.norm(s), shift, scale), order), permute(mask, order))
        return s + permute(y, inverse(order)) * (1 + gate.unsqueeze(1)), state

    def step(self, s: Tensor, state: MambaState, mod: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """The next position ``s [B, D]``, or the next n ``s [B, n, D]``."""
        shift, scale, gate = (t.unsqueeze(1) if s.dim() == 3 else t for t in mod)
        (mixer,) = self.mix.mixers
        u = self.norm(s) * (1 + scale) + shift
        return s + step(mixer, u, state) * (1 + gate)


class MambaAdaLN(MambaBackbone):
    name = "mamba-adaln"
    description = "AiM: Mamba over [text; image] with adaLN-group modulation from the pooled caption"
    Config = Config
    paradigms = ("masked", "ar", "var")  # var: a forward scan, coarse to fine, is causal, hence block-causal

    def __init__(self, ctx: VariantContext, cfg: Config):
        super().__init__()
        self.text_len, d = ctx.text_len, ctx.width
        image_perms = scan_permutations(cfg.scan, ctx.grid)  # [K, L]
        self.register_buffer("orders", sequence_orders(image_perms, ctx.text_len, "prefix"),
                             persistent=False)  # [K, S]
        k = image_perms.shape[0]
        self.layers = nn.ModuleList(AdaLayer(d, cfg, k, ctx.dropout) for _ in range(ctx.depth))
        self.n_groups = min(cfg.groups, ctx.depth)
        self.group_of = [i * self.n_groups // ctx.depth for i in range(ctx.depth)]
        self.ada = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(self.n_groups))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False)
        self.final_ada = nn.Linear(d, 2 * d)
        with torch.no_grad():
            for lin in [*self.ada, self.final_ada]:
                lin.weight.zero_()
                lin.bias.zero_()
            for layer in self.layers:
                for mixer in layer.mix.mixers:
                    mixer.out_proj.weight.div_(math.sqrt(ctx.depth * k))

    def modulations(self, text: Tensor, text_mask: Tensor) -> tuple[list[tuple[Tensor, Tensor, Tensor]],
                                                                     tuple[Tensor, Tensor]]:
        """Per layer ``(shift, scale, gate)`` ``[B, D]`` each, and the final ``(shift, scale)``."""
        c = nn.functional.silu(masked_mean(text, text_mask))  # [B, D]
        groups = [tuple(lin(c).chunk(3, dim=-1)) for lin in self.ada]
        final = tuple(self.final_ada(c).chunk(2, dim=-1))
        return [groups[g] for g in self.group_of], final

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``h: [B, L, D]``."""
        b, length, _ = x.shape
        t = text.shape[1]
        text, text_mask = prefix_text("mamba-adaln", self.text_len, self.orders.shape[1], x, text, text_mask)
        mods, (f_shift, f_scale) = self.modulations(text, text_mask)
        s = torch.cat([text, x], dim=1)  # [B, S, D]
        mask = torch.cat([text_mask, text_mask.new_ones(b, length)], dim=1)  # [B, S]
        orders = pads_first(self.orders, mask)  # [K, B, S]
        for layer, mod in zip(self.layers, mods):
            s = layer(s, orders, mask, mod)
        return modulate(self.final_norm(s[:, t:]), f_shift, f_scale)

    def decoder(self, text: Tensor, text_mask: Tensor, length: int) -> "AdaDecoder | None":
        return AdaDecoder(self, text, text_mask) if self.orders.shape[0] == 1 else None


class AdaDecoder:
    """The caption prefilled through every layer, then one image position per step."""

    def __init__(self, model: MambaAdaLN, text: Tensor, text_mask: Tensor):
        text_mask = text_mask.bool()
        s = torch.where(text_mask.unsqueeze(-1), text, text.new_zeros(()))
        self.model = model
        self.mods, self.final = model.modulations(s, text_mask)
        order = pads_first(torch.arange(text.shape[1], device=text.device)[None], text_mask)[0]  # [B, T]
        self.states = []
        for layer, mod in zip(model.layers, self.mods):
            s, state = layer.prefill(s, order, text_mask, mod)
            self.states.append(state)

    def step(self, x: Tensor) -> Tensor:
        """``x [B, D]`` -> ``[B, D]``; ``x [B, n, D]`` (a var scale) as one scan per layer."""
        for layer, state, mod in zip(self.model.layers, self.states, self.mods):
            x = layer.step(x, state, mod)
        shift, scale = (t.unsqueeze(1) if x.dim() == 3 else t for t in self.final)
        return self.model.final_norm(x) * (1 + scale) + shift


VARIANT = MambaAdaLN
