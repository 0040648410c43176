"""`mamba-critic`: Mamba layers, each followed by a token critic that gates the next layer's input.

A stack of ``depth`` residual pre-norm Mamba layers (one Mamba per scan direction k) over the
image tokens; after layer l a small transformer-style critic, which reads the caption, gives
each token a logit that it is the true token (trained as below) and scales the state::

    h_l  = s_{l-1} + sum_k unscan_k(Mamba_k(scan_k(LN(s_{l-1}))))      (text: see below)
    c    = h_l + CrossAttn(LN(h_l), text, text_mask)                   the critic's own stream
    c    = c + MLP(LN(c))                                              Linear(D, r D) GELU Linear
    z_l  = w . LN(c) + b                                               [B, L], one logit per token
    s_l  = h_l * 2 sigmoid(z_l)     (gate: sigmoid)   or   s_l = h_l   (gate: none)
    h    = h_depth                  (the last layer's state is not gated: no next layer reads it)

Gate. ``2 sigmoid(z)`` is 1 at ``z = 0`` and the critic's last projection starts small
(N(0, 0.02), bias 0), so at init every gate is ~1 and the stack starts as the plain Mamba stack;
the gate can then damp (towards 0) or boost (up to 2x) a token's whole residual state, i.e.
how much of it the next layers' branches add to or overwrite. The gate is what lets the critic
change the prediction; its parameters get gradient both through it and through the critic loss.
A token the critic distrusts (an earlier sampling step's poor choice, kept as context) can so
be damped before the next layers read it.
(The generator's out_norm would largely undo a positive per-token scale of the final state,
one more reason the last gate is left out.)

Critic loss (computed by the masked paradigm from this variant's :meth:`MambaCritic.critic`
pass; the variant itself never sees the true codes): Token-Critic's premise (Lezama et al. 2022, "Improved
masked image generation with Token-Critic"). The critic judges a *token in context*: given a
sequence in which some tokens were generated, is the token at i the true one? Training and
sampling ask it exactly that question:

    fill = where(masked, sample(softmax(readout(h))), targets)       no gradient; the generator's
                                                                     own sample where the input was
                                                                     [MASK], the true code elsewhere
    z'_l = critic logits of the stack run on embed(fill)             the critic pass
    loss = critic_weight * mean_l  mean_{i masked} BCE(z'_l[i], fill[i] == targets[i])

and the sampler (``sample.remask: critic``) fills every masked position with its sampled token,
runs the model on the filled-in sequence and ranks the new tokens by the last critic's logit
there. Only masked positions count: elsewhere the token is the true code by construction, a
label the critic would learn from the token alone. The generator fills in (with the paradigm's
``fill``), embeds the filled-in sequence with its own token embedding and calls ``critic``;
``h`` never depends on any of it.

Why not judge the head's argmax on the masked input (this variant's first design): the sampler
must rank tokens that were *sampled* (temperature, guidance), not the argmax, and a critic
that reads the masked input cannot see the token it is asked about; it can only guess how
hard the position is. On the filled-in sequence it sees the token and its context, the same
sequence at training and at sampling.

Cost: the critic pass runs the Mamba layers without gradient (one extra no-grad forward of the
stack per training step; the fill-in reuses the training pass's own logits), and the critics
with gradient on its detached states (gates from detached logits). So the critic loss trains
the critics (and the caption states they read), not the Mamba layers; the layers learn from the
generator's loss, which also reaches every critic but the last through the gates. Measured at
the conditioning-cpu size (width 96, depth 4, 16 tokens, batch 64, one thread), a training step
takes ~1.4x the first design's (paired medians, forward and backward).

``aux["confidence"]`` = ``z_depth`` ``[B, L]``, the last critic's logit on the given input, is
always returned (the sampler's ``remask: critic`` reads it on the filled-in sequence).

Text (Config ``text``). ``hooks`` (default): image-only Mamba layers; the masked-mean caption
goes through one Linear(D, 2N) per layer and direction into the Mamba block's ``B_add`` /
``C_add`` (mamba-text-B/C's mechanism, N(0, 0.02) weights, biases zero). ``prefix``: the
caption's states lead the sequence of every direction, as in mamba-prefix (padded positions
first and inert, so neither pad values nor pad count matter); the critic scores and gates the
image positions only. Either way every critic cross-attends to the caption, so the gates carry
text into the stack as well. ``hooks`` is the default for cost: its scans have L rather than
T + L positions; measured at the quickstart size (width 96, depth 4, 4x4 grid, T = 10, one
thread, paired medians) a training step takes ~2.5x the transformer's with hooks and ~3.7x
with prefix (mamba-prefix alone: ~3.0x), against a budget of ~4x.

Init: mamba-ssm's ``Mamba`` for each mixer, out_proj weights divided by sqrt(depth * K) (K
residual branches per layer). Critic: GPT-2 style, N(0, 0.02) weights, zero biases, the two
residual projections (attention out, MLP second layer) at 0.02 / sqrt(2). No final LayerNorm:
the generator applies its own.

Legend: B batch, L image tokens, T text tokens, S = T + L, D width, K scan directions, N state
size, r ``critic_mlp_ratio``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Literal, Optional

import torch
import torch.nn as nn
from pydantic import Field
from torch import Tensor

from ablate.model.mamba import Mamba
from ablate.model.scan_order import MultiDirection, inverse, permute, scan_permutations
from ablate.registry import VariantContext
from variants._common import MambaBackbone, MambaOptions

from .mamba_prefix import pads_first, sequence_orders
from .transformer import Attention


class Config(MambaOptions):
    text: Literal["prefix", "hooks"] = Field(
        "hooks", description="how the Mamba layers read the caption: its masked mean through "
                             "B_add/C_add hooks, or as leading sequence positions (mamba-prefix)")
    gate: Literal["sigmoid", "none"] = Field(
        "sigmoid", description="next layer's input: h_l * 2 sigmoid(critic logit) (1 at init), or h_l "
                               "unchanged (the critic then only learns, it does not steer)")
    critic_weight: float = Field(0.1, ge=0, description="weight of the mean-over-layers critic BCE loss")
    critic_mlp_ratio: float = Field(2.0, gt=0, description="critic MLP hidden width as a multiple of D")


class Critic(nn.Module):
    """``h [B, L, D]`` and the caption -> one logit per token ``[B, L]``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(round(mlp_ratio * width))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross_attn = Attention(width, heads, False, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.out = nn.Linear(width, 1)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name in ("cross_attn.out.weight", "mlp.2.weight")
                nn.init.normal_(p, std=0.02 / math.sqrt(2) if residual else 0.02)
            elif name.endswith(".bias") and "norm" not in name:
                nn.init.zeros_(p)

    def forward(self, h: Tensor, text: Tensor, key_mask: Tensor, has_text: Tensor) -> Tensor:
        """``text`` pads zeroed; ``key_mask [B, T]`` never all False; ``has_text [B, 1, 1]``."""
        c = h + self.cross_attn(self.norm1(h), text, key_mask) * has_text
        c = c + self.mlp(self.norm2(c))
        return self.out(self.norm3(c)).squeeze(-1)


class Layer(nn.Module):
    """``s + sum_k unscan_k(Mamba_k(scan_k(LN(s)); B_add, C_add))`` (hooks only for ``text: hooks``)."""

    def __init__(self, width: int, cfg: Config, n_directions: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mix = MultiDirection(
            lambda: Mamba(width, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand), n_directions)
        if cfg.text == "hooks":
            self.proj = nn.ModuleList(nn.Linear(width, 2 * cfg.d_state) for _ in range(n_directions))
            for p in self.proj:
                nn.init.normal_(p.weight, std=0.02)
                nn.init.zeros_(p.bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, s: Tensor, orders: Tensor, mask: Optional[Tensor],
                pooled: Optional[Tensor]) -> Tensor:
        """``orders [K, S]`` or ``[K, B, S]``; ``mask [B, S]`` or None; ``pooled [B, D]`` (hooks)."""
        u = self.norm(s)
        if pooled is None:
            return s + self.drop(self.mix(u, orders, mask))
        out = None
        for mixer, proj, p in zip(self.mix.mixers, self.proj, orders):
            b_add, c_add = proj(pooled).chunk(2, dim=-1)  # [B, N] each
            y = permute(mixer(permute(u, p), None, B_add=b_add, C_add=c_add), inverse(p))
            out = y if out is None else out + y
        return s + self.drop(out)


class MambaCritic(MambaBackbone):
    name = "mamba-critic"
    description = "Mamba layers each followed by a text-aware token critic whose logit gates the next layer"
    Config = Config

    def __init__(self, ctx: VariantContext, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.text_len = ctx.text_len
        image_perms = scan_permutations(cfg.scan, ctx.grid)  # [K, L]
        if cfg.text == "prefix":
            orders = sequence_orders(image_perms, ctx.text_len, "prefix")  # [K, S]
        else:
            orders = image_perms
        self.register_buffer("orders", orders, persistent=False)
        k = image_perms.shape[0]
        self.layers = nn.ModuleList(Layer(ctx.width, cfg, k, ctx.dropout) for _ in range(ctx.depth))
        self.critics = nn.ModuleList(Critic(ctx.width, ctx.heads, cfg.critic_mlp_ratio, ctx.dropout)
                                     for _ in range(ctx.depth))
        with torch.no_grad():
            for layer in self.layers:
                for mixer in layer.mix.mixers:
                    mixer.out_proj.weight.div_(math.sqrt(ctx.depth * k))

    def run(self, x: Tensor, text: Tensor, text_mask: Tensor,
            critics_only: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The stack without losses: ``(h [B, L, D], states, logits)`` with ``states[l]`` the
        pre-gate image states ``h_l [B, L, D]`` and ``logits[l]`` the critic's ``z_l [B, L]``.

        ``critics_only``: the critic pass; the layers run without gradient and the gates read
        detached logits, so only the critics (and ``text``, which they read) get gradient."""
        b, length, _ = x.shape
        t = text.shape[1]
        text_mask = text_mask.bool()
        text = torch.where(text_mask.unsqueeze(-1), text, text.new_zeros(()))  # garbage-proof
        has_text = text_mask.any(dim=1)  # [B]
        key_mask = text_mask | ~has_text.unsqueeze(1)  # an empty caption attends to zeroed pads ...
        has_text = has_text.to(x.dtype).view(-1, 1, 1)  # ... whose read is then multiplied by 0
        if self.cfg.text == "prefix":
            if t != self.text_len or self.orders.shape[1] != t + length:
                raise ValueError(f"mamba-critic: built for T={self.text_len}, S={self.orders.shape[1]}; "
                                 f"got text [B, {t}, D] and x [B, {length}, D]")
            s = torch.cat([text, x], dim=1)  # [B, S, D]
            mask = torch.cat([text_mask, text_mask.new_ones(b, length)], dim=1)  # [B, S]
            orders, pooled, off = pads_first(self.orders, mask), None, t  # [K, B, S]
        else:
            if self.orders.shape[1] != length:
                raise ValueError(f"mamba-critic: built for L={self.orders.shape[1]}, got x [B, {length}, D]")
            w = text_mask.to(text.dtype)
            pooled = torch.einsum("bt,btd->bd", w / w.sum(1, keepdim=True).clamp_min(1), text)  # [B, D]
            s, mask, orders, off = x, None, self.orders, 0
        if critics_only:
            s = s.detach()
            pooled = None if pooled is None else pooled.detach()
        states, logits = [], []
        last = len(self.layers) - 1
        for i, (layer, critic) in enumerate(zip(self.layers, self.critics)):
            with torch.no_grad() if critics_only else contextlib.nullcontext():
                s = layer(s, orders, mask, pooled)
            h = s[:, off:]  # [B, L, D]
            z = critic(h, text, key_mask, has_text)  # [B, L]
            states.append(h)
            logits.append(z)
            if self.cfg.gate == "sigmoid" and i < last:
                g = 2 * torch.sigmoid(z.detach() if critics_only else z).unsqueeze(-1)  # [B, L, 1], 1 at z = 0
                s = torch.cat([s[:, :off], h * g], dim=1) if off else h * g
        return s[:, off:], states, logits

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``(h [B, L, D], aux)``
        with ``aux["confidence"] [B, L]``, the last critic's logit on the given input."""
        h, _, logits = self.run(x, text, text_mask)
        return h, {"confidence": logits[-1]}

    def critic(self, x: Tensor, text: Tensor, text_mask: Tensor) -> list[Tensor]:
        """The critic pass: every critic's logits ``[B, L]`` on the input ``x`` (the embedded
        filled-in sequence), with gradient to the critics and the caption only (the layers run
        without it). The masked paradigm turns them into the critic loss."""
        return self.run(x, text, text_mask, critics_only=True)[2]

    @property
    def critic_weight(self) -> float:
        return self.cfg.critic_weight


VARIANT = MambaCritic
