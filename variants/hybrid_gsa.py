"""`hybrid-gsa`: seed 002's hybrid (after Zamba): a stack of Mamba layers over ``[text; image]``
with ONE global shared self-attention block (GSA: attention + MLP, weight-tied) applied every
``every`` Mamba layers::

    s = [text; image]                                             [B, S, D]
    for i in 0 .. depth-1:
        if i % every == 0:                                        GSA_j, j = i // every
            s = s + SelfAttn(LN(s), key_mask = [text_mask; 1])
            s = s + MLP(LN(s))
        s = s + sum_k unscan_k(Mamba_k(scan_k(LN(s))))            one Mamba per direction k
    h = s at the image positions

``share: true`` (default, the seed's GSA): every GSA_j is the same module, so its parameters are
counted (and updated) once however often it runs; ``share: false`` gives each application its own
block (the untied ablation, ceil(depth / every) blocks).

Choices where the seed is open:

- the Mamba layers read the text as sequence positions, ahead of the image in every scan
  direction (exactly ``mamba-prefix`` with ``text_position: prefix``); seed 002 conditions an
  autoregressive model on a text prefix, and the GSA attends over the same ``[text; image]``
  sequence, so the text stream is carried and updated by both kinds of block;
- placement: the GSA comes *before* layers 0, every, 2 every, ... (the seed: "the output from the
  GSA block ... processed through a Mamba block"), so it runs ceil(depth / every) times and at
  least once for any depth;
- the GSA reads the residual stream only; Zamba's concatenation of the stream with the original
  embeddings (a 2D-wide shared block) is not used. The seed's 2D RoPE is not used either (the
  generator adds its own position embeddings).

Padded text (``text_mask`` False) is zeroed; in the Mamba layers it is moved ahead of everything
and made inert (``ablate.model.scan_order.pads_first``), in the GSA it is masked out of the keys
(the image keys are always there, so no row is fully masked, even for an empty caption). Padded
positions still get query outputs, which no real position ever reads.

Next-token generation (``model.paradigm: ar``, ``scan: forward``): built causal, the GSA masks
as :func:`causal_mask` says (text rows read text only, image row i text and image tokens <= i);
decoding prefills the caption through every layer, then runs one image position per step on each
attention application's key/value cache and each Mamba layer's recurrent state.

Init: mamba-ssm's ``Mamba`` per mixer; attention/MLP GPT-2 style (N(0, 0.02), zero biases).
The residual projections (Mamba out_proj, attention ``out``, the MLP's second Linear) are scaled
by 1 / sqrt(n) with n = depth * K + 2 * ceil(depth / every), the residual branches the stream
receives. No final LayerNorm: the generator applies its own.

Legend: B batch, L image tokens, T text tokens, S = T + L, D width, K scan directions.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from pydantic import Field
from torch import Tensor

from ablate.model.attention import Attention, KVCache, rope_rows, rope_tables
from ablate.model.scan_order import pads_first, scan_permutations, sequence_orders
from ablate.registry import VariantContext
from variants._common import MambaBackbone, MambaLayer, MambaOptions, prefix_text


class Config(MambaOptions):
    every: int = Field(2, ge=1, description="the shared attention block runs before every `every`-th Mamba layer")
    share: bool = Field(True, description="one weight-tied attention block for all applications (false: untied)")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width of the attention block as a multiple of D")
    qk_norm: bool = Field(False, description="LayerNorm on queries and keys per head")


class AttentionBlock(nn.Module):
    """Global self-attention + MLP over ``[text; image]``, pre-norm residual."""

    def __init__(self, width: int, heads: int, cfg: Config, dropout: float):
        super().__init__()
        hidden = int(round(cfg.mlp_ratio * width))
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, cfg.qk_norm, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, s: Tensor, key_mask: Tensor, attn_mask: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        s = s + self.drop(self.attn(self.norm1(s), key_mask=key_mask, attn_mask=attn_mask, rope=rope))
        return s + self.drop(self.mlp(self.norm2(s)))

    def step(self, s: Tensor, cache: KVCache, key_mask: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Positions ``s [B, n, D]`` after those in ``cache`` (whose keys ``key_mask [B, all]`` masks)."""
        u = self.norm1(s)
        k, v = cache.add(*self.attn.keys(u, rope))
        s = s + self.attn.attend(self.attn.query(u, rope), k, v, key_mask)
        return s + self.mlp(self.norm2(s))


def causal_mask(key_mask: Tensor, t: int, image_mask: Tensor | None = None) -> Tensor:
    """``[B, 1, S, S]`` for ``[text; image]`` with a causal image: a text row attends the real
    text tokens (never an image token, which would carry later tokens back to earlier ones
    through the text stream); image row i the real text tokens and image tokens <= i (or, with
    ``image_mask [L, L]``, the image tokens it allows: block-causal for var); every row itself (a
    padded row then reads only itself, never NaN)."""
    S = key_mask.shape[1]
    i = torch.arange(S, device=key_mask.device).view(S, 1)
    j = torch.arange(S, device=key_mask.device).view(1, S)
    text_col = (j < t) & key_mask[:, None, :]  # [B, S(rows), S]
    image_col = (j >= t) & (i >= t) & (j <= i)
    if image_mask is not None:
        image_col = torch.zeros(S, S, dtype=torch.bool, device=key_mask.device)
        image_col[t:, t:] = image_mask
    return (text_col | image_col | (i == j)).unsqueeze(1)


class HybridGSA(MambaBackbone):
    name = "hybrid-gsa"
    description = "Mamba over [text; image] with one weight-shared self-attention+MLP block every N layers"
    family = "hybrid"
    Config = Config
    paradigms = ("masked", "ar", "var")
    rope = True  # the shared attention takes model.positions: rope2d (image positions; text unrotated)

    def __init__(self, ctx: VariantContext, cfg: Config):
        super().__init__()
        if ctx.width % ctx.heads:
            raise ValueError(f"model.width ({ctx.width}) must be divisible by model.heads ({ctx.heads})")
        self.text_len, self.every, self.share, self.causal = ctx.text_len, cfg.every, cfg.share, ctx.causal
        self.heads, self.scale_blocks = ctx.heads, ctx.blocks
        if ctx.blocks:
            self.register_buffer("block_mask", ctx.block_mask(), persistent=False)
        if ctx.positions == "rope2d":  # over [text; image]: the caption's rows are not rotated
            cos, sin = rope_tables(torch.tensor(ctx.coords), ctx.width // ctx.heads)
            self.register_buffer("rope_cos", torch.cat([torch.ones(ctx.text_len, cos.shape[1]), cos]),
                                 persistent=False)
            self.register_buffer("rope_sin", torch.cat([torch.zeros(ctx.text_len, sin.shape[1]), sin]),
                                 persistent=False)
        image_perms = scan_permutations(cfg.scan, ctx.grid)  # [K, L]
        self.register_buffer("orders", sequence_orders(image_perms, ctx.text_len, "prefix"),
                             persistent=False)  # [K, S]
        k = image_perms.shape[0]
        self.n_applications = math.ceil(ctx.depth / cfg.every)
        self.layers = nn.ModuleList(MambaLayer(ctx.width, cfg, k, ctx.dropout) for _ in range(ctx.depth))
        self.gsa = nn.ModuleList(AttentionBlock(ctx.width, ctx.heads, cfg, ctx.dropout)
                                 for _ in range(1 if cfg.share else self.n_applications))
        n_res = ctx.depth * k + 2 * self.n_applications
        for name, p in self.gsa.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("attn.out.weight", "mlp.2.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(n_res) if residual else 0.02)
            elif name.endswith(".bias") and "norm" not in name:
                nn.init.zeros_(p)
        with torch.no_grad():
            for layer in self.layers:
                for mixer in layer.mix.mixers:
                    mixer.out_proj.weight.div_(math.sqrt(n_res))

    def attention_block(self, i: int) -> AttentionBlock | None:
        """The block applied before Mamba layer ``i`` (None where there is none)."""
        if i % self.every:
            return None
        return self.gsa[0 if self.share else i // self.every]

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``h: [B, L, D]``."""
        b, length, _ = x.shape
        t = text.shape[1]
        text, text_mask = prefix_text("hybrid-gsa", self.text_len, self.orders.shape[1], x, text, text_mask)
        s = torch.cat([text, x], dim=1)  # [B, S, D]
        mask = torch.cat([text_mask, text_mask.new_ones(b, length)], dim=1)  # [B, S], also the key mask
        orders = pads_first(self.orders, mask)  # [K, B, S]
        attn_mask = causal_mask(mask, t, self.block_mask if self.scale_blocks else None) if self.causal else None
        rope = self.rope_at()
        for i, layer in enumerate(self.layers):
            gsa = self.attention_block(i)
            if gsa is not None:
                s = gsa(s, mask, attn_mask, rope)
            s = layer(s, orders, mask)
        return s[:, t:]

    def rope_at(self, i: int | None = None, n: int = 1) -> tuple[Tensor, Tensor] | None:
        """Rotary tables of every position of ``[text; image]``, or of positions ``i .. i + n - 1``."""
        return rope_rows(self, i, n)

    def decoder(self, text: Tensor, text_mask: Tensor, length: int) -> "GSADecoder | None":
        """Decoding one image position at a time (causal, forward scan): the caption prefilled
        through every layer, then each attention application's key/value cache and each Mamba
        layer's recurrent state."""
        if not self.causal or self.orders.shape[0] != 1:
            return None
        return GSADecoder(self, text, text_mask, length)


class GSADecoder:
    def __init__(self, model: HybridGSA, text: Tensor, text_mask: Tensor, length: int):
        self.model = model
        text_mask = text_mask.bool()
        b, t, d = text.shape
        s = torch.where(text_mask.unsqueeze(-1), text, text.new_zeros(()))
        order = pads_first(torch.arange(t, device=text.device)[None], text_mask)[0]  # [B, T]
        self.text_mask, self.caches, self.states = text_mask, {}, []
        for i, layer in enumerate(model.layers):
            gsa = model.attention_block(i)
            if gsa is not None:
                self.caches[i] = cache = KVCache(b, model.heads, t + length, d // model.heads, text)
                s = gsa.step(s, cache, causal_mask(text_mask, t))  # text rows: text only
            s, state = layer.prefill(s, order, text_mask)
            self.states.append(state)

    def step(self, x: Tensor) -> Tensor:
        """``x [B, D]`` -> ``[B, D]``; ``x [B, n, D]`` a var scale: the attention reads the whole
        scale at once (block-causal), the Mamba layers as one scan each."""
        single = x.dim() == 2
        h = x.unsqueeze(1) if single else x  # [B, n, D]
        n = h.shape[1]
        for i, layer in enumerate(self.model.layers):
            if i in self.caches:
                cache = self.caches[i]
                seen = torch.cat([self.text_mask, self.text_mask.new_ones(h.shape[0], cache.n + n - self.text_mask.shape[1])],
                                 dim=1)[:, None, None, :]
                h = self.model.attention_block(i).step(h, cache, seen, self.model.rope_at(cache.n, n))
            h = layer.step(h, self.states[i])
        return h[:, 0] if single else h


VARIANT = HybridGSA
