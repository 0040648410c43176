"""`mamba-xattn` and `mamba-xattn-interleave`: image-only Mamba stacks that read the caption
through cross-attention (image queries, text keys/values), two ways.

``mamba-xattn`` (seed 000's best row, "Mamba - repeat(Attention(text_input, image)) + xz"): the
cross-attention read enters *inside* every Mamba mixer, added to the two branches that in_proj
makes (the conv/scan branch x and the gate z)::

    u   = LN(h)                                                   [B, L, D]
    a_k = CrossAttn_k(u, text, text_mask)                         [B, L, D]  (k: see share_attention)
    h   = h + sum_k unscan_k(Mamba_k(scan_k(u), x_add=scan_k(X_k), z_add=scan_k(Z_k)))
          with [X_k | Z_k] = Lift_k(a_k)                          [B, L, 2E]

``mamba-xattn-interleave`` (seed 000's "Mamba layer + attention layer x 12"): a whole Mamba
layer, then a whole cross-attention layer, ``depth`` times::

    h = h + sum_k unscan_k(Mamba_k(scan_k(LN(h))))
    h = h + CrossAttn(LN(h), text, text_mask)
    h = h + MLP(LN(h))                                            only if mlp_ratio > 0

Scan directions. A direction k reorders the image tokens (``ablate.model.scan_order``); Mamba_k
runs over ``scan_k(u)``, so the hooks it receives must be in the same order: the read a_k is
computed in raster order and permuted with the same ``scan_k`` before the lift (the lift acts
per token, so lifting then permuting is the same thing; permuting the D-wide read is cheaper).
``MultiDirection`` passes its keyword arguments unchanged to every mixer, which would hand a
reversed scan raster-ordered hooks; hence the per-direction loop in :class:`XattnLayer`.

Choices where the seed is open (the ones that matter are Config fields):

- ``inject``: ``xz`` (default, the seed's "+ xz"), ``x`` or ``z`` alone;
- ``share_attention``: one cross-attention per direction (default: each Mamba mixer has its own,
  as each Mamba block had its own in the one-direction seed) or one per layer read by all;
- ``lift``: how the D-wide read becomes the E- or 2E-wide hook. ``linear`` (default): a Linear
  per direction, no bias (so an empty read adds nothing), initialised as in_proj is (torch's
  Linear default), i.e. the read enters the branches at in_proj's scale. ``repeat``: the
  parameter-free tiling of the read ``expand`` (x or z) or ``2 * expand`` (xz) times, the literal
  "repeat(Attention)" of the seed's row;
- queries are the layer's pre-norm ``u`` (the input the mixers see), keys/values the projected
  text as the transformer uses it (no extra norm); the interleaved attention layer has its own
  pre-norm, as the transformer's cross-attention has.

Padding and empty captions. Padded text is zeroed and masked out of the keys. A caption with no
real token (impossible with the null caption, which has one) attends to its zeroed pads and its
read is multiplied by 0, as in ``transformer``.

Init: mamba-ssm's ``Mamba`` per mixer; attention and MLP GPT-2 style (N(0, 0.02), zero biases).
The residual branches' last projections are scaled by 1 / sqrt(number of residual branches):
Mamba out_proj and, in the interleaved stack, attention ``out`` and the MLP's second Linear.
In ``mamba-xattn`` the attention's ``out`` feeds the lift, not the residual stream, so it keeps
std 0.02. No final LayerNorm: the generator applies its own.

Legend: B batch, L image tokens, T text tokens, D width, E inner width (expand * D), K scan
directions.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field
from torch import Tensor

from ablate.model.attention import Attention
from ablate.model.mamba import Mamba
from ablate.model.scan_order import MultiDirection, inverse, permute, scan_permutations
from ablate.registry import VariantContext
from variants._common import MambaBackbone, MambaOptions

ScanOrder = Literal["forward", "bidirectional", "cross4"]


class XattnConfig(MambaOptions):
    inject: Literal["xz", "x", "z"] = Field(
        "xz", description="Mamba branches that receive the cross-attention read: x (conv/scan), z (gate) or both")
    share_attention: bool = Field(
        False, description="one cross-attention per layer read by every direction (else one per direction)")
    lift: Literal["linear", "repeat"] = Field(
        "linear", description="D -> E/2E map of the read: a Linear per direction, or tiling (no parameters)")
    qk_norm: bool = Field(False, description="LayerNorm on queries and keys per head")


class InterleaveConfig(MambaOptions):
    mlp_ratio: float = Field(0.0, ge=0, description="MLP hidden width as a multiple of D after each "
                                                     "cross-attention layer; 0 = no MLP (the seed's layout)")
    qk_norm: bool = Field(False, description="LayerNorm on queries and keys per head")


def _prepare_text(text: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Zeroed pads, the key mask (an empty caption attends to its zeroed pads) and the
    per-sample gate ``[B, 1, 1]`` that is 0 for an empty caption."""
    text_mask = text_mask.bool()
    has_text = text_mask.any(dim=1)  # [B]
    text = torch.where(text_mask.unsqueeze(-1), text, text.new_zeros(()))
    key_mask = text_mask | ~has_text.unsqueeze(1)
    return text, key_mask, has_text.to(text.dtype).view(-1, 1, 1)


def _gpt2_init(module: nn.Module, n_residuals: int, residual_out: tuple[str, ...]) -> None:
    """N(0, 0.02) for the attention/MLP matrices in ``module`` (zero biases), the residual
    projections named ``residual_out`` at 0.02 / sqrt(n_residuals). Mamba mixers keep their own
    init and are skipped (their out_proj is scaled by the caller)."""
    for mname, sub in module.named_modules():
        if isinstance(sub, Mamba):
            continue
        if isinstance(sub, nn.Linear) and ".lift" not in f".{mname}":
            residual = mname.endswith(residual_out)
            nn.init.normal_(sub.weight, std=0.02 / math.sqrt(n_residuals) if residual else 0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


class XattnLayer(nn.Module):
    """Pre-norm residual layer of K Mamba mixers whose x/z branches get a cross-attention read."""

    def __init__(self, width: int, heads: int, cfg: XattnConfig, n_directions: int, dropout: float):
        super().__init__()
        self.inject, self.lift_mode = cfg.inject, cfg.lift
        self.norm = nn.LayerNorm(width)
        self.mixers = nn.ModuleList(
            Mamba(width, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand) for _ in range(n_directions))
        self.e = self.mixers[0].d_inner
        self.hook_width = (2 if cfg.inject == "xz" else 1) * self.e
        self.attn = nn.ModuleList(Attention(width, heads, cfg.qk_norm, dropout)
                                  for _ in range(1 if cfg.share_attention else n_directions))
        if cfg.lift == "linear":
            self.lift = nn.ModuleList(nn.Linear(width, self.hook_width, bias=False) for _ in range(n_directions))
        elif self.hook_width % width:
            raise ValueError(f"mamba-xattn: lift 'repeat' needs the hook width ({self.hook_width}) "
                             f"to be a multiple of D ({width})")
        self.drop = nn.Dropout(dropout)

    def hooks(self, k: int, read: Tensor) -> dict[str, Tensor]:
        """The Mamba hooks of direction ``k`` from its (already scan-ordered) read ``[B, L, D]``."""
        if self.lift_mode == "linear":
            y = self.lift[k](read)  # [B, L, hook_width]
        else:
            y = read.repeat(1, 1, self.hook_width // read.shape[-1])
        if self.inject == "xz":
            xa, za = y.split(self.e, dim=-1)
            return {"x_add": xa, "z_add": za}
        return {f"{self.inject}_add": y}

    def forward(self, h: Tensor, perms: Tensor, text: Tensor, key_mask: Tensor, gate: Tensor) -> Tensor:
        """``h: [B, L, D]`` raster order, ``perms: [K, L]``, ``text: [B, T, D]`` (pads zeroed),
        ``key_mask: [B, T]``, ``gate: [B, 1, 1]`` -> ``[B, L, D]``."""
        u = self.norm(h)
        reads = [attn(u, text, key_mask) * gate for attn in self.attn]  # [B, L, D] each, raster
        out = None
        for k, (mixer, p) in enumerate(zip(self.mixers, perms)):
            read = permute(reads[k % len(reads)], p)  # into direction k's order, like its input
            y = permute(mixer(permute(u, p), None, **self.hooks(k, read)), inverse(p))
            out = y if out is None else out + y
        return h + self.drop(out)


class InterleaveBlock(nn.Module):
    """Image Mamba layer, then cross-attention layer (then MLP if any), each pre-norm residual."""

    def __init__(self, width: int, heads: int, cfg: InterleaveConfig, n_directions: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mix = MultiDirection(
            lambda: Mamba(width, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand), n_directions)
        self.cross_attn = Attention(width, heads, cfg.qk_norm, dropout)
        hidden = int(round(cfg.mlp_ratio * width))
        self.norm3 = nn.LayerNorm(width) if hidden else None
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) if hidden else None
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, perms: Tensor, text: Tensor, key_mask: Tensor, gate: Tensor) -> Tensor:
        h = h + self.drop(self.mix(self.norm1(h), perms))
        h = h + self.drop(self.cross_attn(self.norm2(h), text, key_mask)) * gate
        if self.mlp is not None:
            h = h + self.drop(self.mlp(self.norm3(h)))
        return h


class _ImageMambaBase(MambaBackbone):

    def _setup(self, ctx: VariantContext, scan: str) -> int:
        if ctx.width % ctx.heads:
            raise ValueError(f"{self.name}: model.width ({ctx.width}) must be divisible by model.heads ({ctx.heads})")
        self.register_buffer("perms", scan_permutations(scan, ctx.grid), persistent=False)  # [K, L]
        return self.perms.shape[0]

    def _scale_mamba_out(self, n_residuals: int) -> None:
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, Mamba):
                    mod.out_proj.weight.div_(math.sqrt(n_residuals))

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``x: [B, L, D]``, ``text: [B, T, D]``, ``text_mask: [B, T]`` -> ``h: [B, L, D]``."""
        if x.shape[1] != self.perms.shape[1]:
            raise ValueError(f"{self.name}: built for L={self.perms.shape[1]} image tokens; got x {tuple(x.shape)}")
        text, key_mask, gate = _prepare_text(text, text_mask)
        h = x
        for block in self.blocks:
            h = block(h, self.perms, text, key_mask, gate)
        return h


class MambaXattn(_ImageMambaBase):
    name = "mamba-xattn"
    description = "image Mamba whose x/z branches get a per-block cross-attention read of the text"
    Config = XattnConfig

    def __init__(self, ctx: VariantContext, cfg: XattnConfig):
        super().__init__()
        k = self._setup(ctx, cfg.scan)
        self.blocks = nn.ModuleList(XattnLayer(ctx.width, ctx.heads, cfg, k, ctx.dropout) for _ in range(ctx.depth))
        _gpt2_init(self, 1, ())  # the attention's out feeds the lift, not the residual stream
        self._scale_mamba_out(ctx.depth * k)


class MambaXattnInterleave(_ImageMambaBase):
    name = "mamba-xattn-interleave"
    description = "image Mamba layer then cross-attention layer (optional MLP), repeated depth times"
    Config = InterleaveConfig

    def __init__(self, ctx: VariantContext, cfg: InterleaveConfig):
        super().__init__()
        k = self._setup(ctx, cfg.scan)
        self.blocks = nn.ModuleList(InterleaveBlock(ctx.width, ctx.heads, cfg, k, ctx.dropout)
                                    for _ in range(ctx.depth))
        n_res = ctx.depth * (k + 1 + (self.blocks[0].mlp is not None))
        _gpt2_init(self, n_res, ("cross_attn.out", "mlp.2"))
        self._scale_mamba_out(n_res)


VARIANTS = [MambaXattn, MambaXattnInterleave]
