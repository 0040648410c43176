"""`mamba-text-A` / `-B` / `-C` / `-D`: the caption sets one SSM parameter of image-only Mamba layers.

The image tokens alone run through ``depth`` residual pre-norm Mamba layers (one Mamba per scan
direction k). The caption never enters the sequence; a pooled summary of it shifts one of the
selective SSM's parameters, per sample, in every layer and direction::

    u     = LN(s)                                       s: [B, L, D], the residual stream
    p     = pool_l(text)                                [B, D]  (pool: token -> [B, L, D])
    a_lk  = W_lk p + b_lk                               one small projection per layer and direction
    s     = s + sum_k unscan_k(Mamba_k(scan_k(u); hook = a_lk))
    h     = s

The hook (``ablate.model.mamba.Mamba``'s text hooks; each is the identity at zero) per variant:

- ``A``: ``A_log_add``: ``A = -exp(A_log + a)``, i.e. the decay rates are multiplied by the
  positive per-sample factor ``exp(a)``; the continuous A stays negative, so every state still
  decays. ``a_form: channel`` gives one factor per inner channel (``[B, E]``); ``separable`` one
  per channel and one per state, ``a[e, n] = a_E[e] + a_N[n]`` (``[B, E, N]`` from E + N
  outputs; a full ``E x N`` projection would cost D E N parameters per direction, over the
  parameter budget at the default sizes, and is not offered). On CUDA the ``channel`` form maps
  onto mamba-ssm's kernel (the block passes it as ``A_scale``); ``separable`` makes A a full
  ``[B, E, N]``, which the kernel cannot take, so those scans run on the torch path;
- ``B``: ``B_add``: the input matrix ``B_t = x_proj(x_t)_B + a`` (``[B, N]``), i.e. every token
  writes into the state along a caption-chosen direction as well as its own;
- ``C``: ``C_add``: the readout ``C_t = x_proj(x_t)_C + a``: the caption chooses what each
  token reads out of the state;
- ``D``: ``D_add``: the skip ``y_t += (D + a) * x_t`` (``[B, E]``), a caption-set gain on the
  skip path.

Pooling (Config ``pool``): ``mean`` = the masked mean of the real caption tokens (no
parameters); ``attention`` = one learned query per layer attends over the caption (keys
``W_k text``, values the text states, scaled dot product, padded keys masked); for B and C only,
``token`` = each image token queries the caption with its own ``W_q u_t`` (same keys and
values), which makes the hook per token (``[B, N, L]``, reordered with the direction).
The text states arrive LayerNorm-ed by the generator, so no extra norm is applied before pooling.

Padded text (``text_mask`` False) is zeroed with ``torch.where`` first and then never read: the
mean divides by the number of real tokens, attention masks padded keys. A caption with no real
token pools to zero (a zero hook).

Init: mamba-ssm's ``Mamba`` for each mixer; out_proj weights divided by sqrt(depth * K) as
mamba-ssm's MixerModel does per residual branch (K directions add K branches per layer). The
text projections are small-normal (``init_std``, biases zero) rather than zero: a zero weight
would still pass gradient to itself but none to the attention pooling behind it; at the default
0.02 the initial hook is ~0.02 sqrt(D) per entry, a small perturbation of the plain Mamba
(e.g. A's decay scaled by exp(+-0.2) at D = 96). Attention-pooling weights are N(0, 0.02).
No final LayerNorm: the generator applies its own.

Cost: the image-only stack scans L positions where mamba-prefix scans T + L, and the hooks add
one [B, D] x [D, E or N] product per layer and direction, so these variants are cheaper than
mamba-prefix; A and D make the scan's A / D per sample ([B, E, N] / [B, E]).

Legend: B batch, L image tokens, T text tokens, D width, E inner width (expand * D), N state
size, K scan directions.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import Tensor

from ablate.model.labels import label
from ablate.model.mamba import Mamba
from ablate.model.scan_order import MultiDirection, inverse, permute, scan_permutations
from ablate.registry import VariantContext
from variants._common import MambaBackbone, MambaOptions

_POOL_DESC = ("how the caption is summarised for the hook: mean of the real tokens, or one learned "
              "query per layer attending over them")


class Config(MambaOptions):
    """Hyperparameters shared by the four variants (D takes exactly these)."""

    model_config = ConfigDict(extra="forbid")

    pool: Literal["mean", "attention"] = Field("mean", description=_POOL_DESC)
    init_std: float = Field(0.02, gt=0, description="std of the text projections' normal init "
                                                    "(biases start at zero)")


class ConfigA(Config):
    a_form: Literal["channel", "separable"] = Field(
        "channel", description="A's per-sample scale: one per inner channel ([B, E]), or a per-channel "
                               "plus a per-state log-scale ([B, E, N] from E + N outputs)")


class ConfigBC(Config):
    pool: Literal["mean", "attention", "token"] = Field(
        "mean", description=_POOL_DESC + "; token: each image token queries the caption itself, "
                            "a per-token hook [B, N, L]")


class Pool(nn.Module):
    """The caption summary a layer's hooks read: ``[B, D]``, or ``[B, L, D]`` for ``token``."""

    def __init__(self, width: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "attention":
            self.query = nn.Parameter(torch.randn(width) * 0.02)
        if kind in ("attention", "token"):
            self.key = nn.Linear(width, width, bias=False)
            nn.init.normal_(self.key.weight, std=0.02)
        if kind == "token":
            self.q = nn.Linear(width, width, bias=False)
            nn.init.normal_(self.q.weight, std=0.02)

    def forward(self, u: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``u: [B, L, D]`` the layer's normed input (queries for ``token``); ``text: [B, T, D]``
        with pads zeroed; ``text_mask: [B, T]`` bool."""
        if self.kind == "mean":
            w = text_mask.to(text.dtype)
            w = w / w.sum(1, keepdim=True).clamp_min(1)  # an empty caption pools to zero
            return torch.einsum("bt,btd->bd", w, text)
        # a caption with no real token attends to its zeroed pads, so it pools to zero as well
        key_mask = text_mask | ~text_mask.any(1, keepdim=True)  # [B, T]
        k = self.key(text)  # [B, T, D]
        q = self.query.view(1, 1, 1, -1).expand(u.shape[0], 1, 1, -1) if self.kind == "attention" \
            else self.q(u).unsqueeze(1)  # [B, 1, 1 | L, D]
        with label("attn.cross"), label("attn.sdpa"):
            out = F.scaled_dot_product_attention(q, k.unsqueeze(1), text.unsqueeze(1),
                                                 attn_mask=key_mask[:, None, None, :])
        out = out.squeeze(1)  # [B, 1 | L, D]
        return out.squeeze(1) if self.kind == "attention" else out


class Layer(nn.Module):
    """``s + sum_k unscan_k(Mamba_k(scan_k(LN(s)); hook_k(pool(text))))``."""

    def __init__(self, width: int, cfg: Config, hook: str, n_directions: int, dropout: float):
        super().__init__()
        self.hook = hook
        self.norm = nn.LayerNorm(width)
        self.mix = MultiDirection(
            lambda: Mamba(width, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand), n_directions)
        mixer = self.mix.mixers[0]
        self.E, self.N = mixer.d_inner, mixer.d_state
        self.a_form = getattr(cfg, "a_form", "channel")
        size = {"A": self.E + (self.N if self.a_form == "separable" else 0),
                "B": self.N, "C": self.N, "D": self.E}[hook]
        self.pool = Pool(width, cfg.pool)
        self.proj = nn.ModuleList(nn.Linear(width, size) for _ in range(n_directions))
        for p in self.proj:
            nn.init.normal_(p.weight, std=cfg.init_std)
            nn.init.zeros_(p.bias)
        self.drop = nn.Dropout(dropout)

    def hook_kwargs(self, a: Tensor, perm: Tensor) -> dict[str, Tensor]:
        """One direction's projection output ``a`` (``[B, size]`` or ``[B, L, size]`` in raster
        order) -> the Mamba hook keyword, in that direction's reading order."""
        if self.hook == "A":
            if self.a_form == "separable":
                a = a[:, :self.E, None] + a[:, None, self.E:]  # [B, E, N]
            return {"A_log_add": a}
        if self.hook == "D":
            return {"D_add": a}
        if a.dim() == 3:  # per token: [B, L, N] raster -> [B, N, L] in this direction's order
            a = permute(a, perm).transpose(1, 2)
        return {f"{self.hook}_add": a}

    def forward(self, s: Tensor, perms: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        u = self.norm(s)
        pooled = self.pool(u, text, text_mask)
        out = None
        for mixer, proj, p in zip(self.mix.mixers, self.proj, perms):
            y = mixer(permute(u, p), None, **self.hook_kwargs(proj(pooled), p))
            y = permute(y, inverse(p))
            out = y if out is None else out + y
        return s + self.drop(out)


class _MambaText(MambaBackbone):
    """Shared implementation; subclasses set ``hook`` (``"A" | "B" | "C" | "D"``)."""

    hook: str = ""

    def __init__(self, ctx: VariantContext, cfg: Config):
        super().__init__()
        image_perms = scan_permutations(cfg.scan, ctx.grid)  # [K, L]
        self.register_buffer("perms", image_perms, persistent=False)
        k = image_perms.shape[0]
        self.layers = nn.ModuleList(Layer(ctx.width, cfg, self.hook, k, ctx.dropout)
                                    for _ in range(ctx.depth))
        with torch.no_grad():
            for layer in self.layers:
                for mixer in layer.mix.mixers:
                    mixer.out_proj.weight.div_(math.sqrt(ctx.depth * k))

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``h: [B, L, D]``."""
        if x.shape[1] != self.perms.shape[1]:
            raise ValueError(f"{self.name}: built for L={self.perms.shape[1]} image tokens, "
                             f"got x [B, {x.shape[1]}, D]")
        text_mask = text_mask.bool()
        text = torch.where(text_mask.unsqueeze(-1), text, text.new_zeros(()))  # garbage-proof
        s = x
        for layer in self.layers:
            s = layer(s, self.perms, text, text_mask)
        return s


class MambaTextA(_MambaText):
    name = "mamba-text-A"
    description = "image-only Mamba; pooled caption scales the SSM decay A per sample (A_log_add)"
    hook = "A"
    Config = ConfigA


class MambaTextB(_MambaText):
    name = "mamba-text-B"
    description = "image-only Mamba; pooled caption shifts the SSM input matrix B (B_add)"
    hook = "B"
    Config = ConfigBC


class MambaTextC(_MambaText):
    name = "mamba-text-C"
    description = "image-only Mamba; pooled caption shifts the SSM readout matrix C (C_add)"
    hook = "C"
    Config = ConfigBC


class MambaTextD(_MambaText):
    name = "mamba-text-D"
    description = "image-only Mamba; pooled caption shifts the SSM skip D per sample (D_add)"
    hook = "D"
    Config = Config


VARIANTS = [MambaTextA, MambaTextB, MambaTextC, MambaTextD]
