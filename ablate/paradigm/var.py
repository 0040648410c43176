"""``var``: next-scale prediction (VAR, Tian et al. 2024; seed 002's VMambAR). The tokens are a
multiscale tokenizer's maps, coarse to fine (``tokenizer.kind: multiscale``, scales s_1 < ... <
s_K): scale k's s_k^2 tokens are predicted all at once, from the caption and every coarser scale.

Inputs. Position p of scale k reads the token of scale k-1 nearest to it (its parent: row
``floor(i s_{k-1} / s_k)``, column likewise); scale 1 reads the start token. So every input of
scale k carries information of coarser scales only, and a backbone may let scale k's positions
read each other and all coarser ones: block-causal attention (blocks = scales), or a forward
scan in coarse-to-fine order (causal, which is stricter). Discrete parents stand in for VAR's
interpolated continuous features; the coarser scales' tokens themselves are all visible anyway.

Training: teacher forcing, cross-entropy at every position. Sampling: scale by scale, every token
of a scale drawn at once with classifier-free guidance (``t`` rising over the scales as
``sample.guidance_schedule`` says), ``sample.temperature``, ``top_k``, ``top_p``. With
``sample.decode: cached`` each scale runs only its own positions on the backbone's state (the
attention's key/value cache: each position once in all; Mamba layers step through the scale's
positions in scan order); ``full`` runs the whole sequence once per scale (the reference).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..config import SampleSpec
from .ar import pick
from .base import Batch, EveryPosition, cfg_mix, guidance_at, guided_logits


def parents(scales: Sequence[int]) -> Tensor:
    """``[L]``: for each position of the concatenated scales, the index of its parent (the nearest
    token of the next coarser scale), -1 for the first scale's."""
    out, offset, prev = [], 0, None
    for s in scales:
        if prev is None:
            out.append(torch.full((s * s,), -1, dtype=torch.long))
        else:
            ps, poff = prev
            idx = torch.arange(s)
            src = (idx * ps) // s  # nearest coarser row / column
            out.append(poff + (src[:, None] * ps + src[None, :]).reshape(-1))
        prev = (s, offset)
        offset += s * s
    return torch.cat(out)


class VAR(EveryPosition):
    name = "var"
    causality = "block"

    def __init__(self, codebook_size: int, scales: Sequence[int]):
        super().__init__(codebook_size)
        self.scales = list(scales)
        self.blocks = tuple(s * s for s in self.scales)
        self.parent = parents(self.scales)

    def inputs_from(self, codes: Tensor) -> Tensor:
        """Codes ``[B, L]`` -> each position's input: its parent's code (start token on scale 1)."""
        par = self.parent.to(codes.device)
        return torch.where(par < 0, torch.full_like(codes, self.special), codes[:, par.clamp_min(0)])

    def make_batch(self, codes: Tensor, g: Optional[torch.Generator], share: tuple[int, int] = (0, 1)) -> Batch:
        codes = codes.reshape(codes.shape[0], -1)
        return Batch(self.inputs_from(codes), codes, torch.ones_like(codes, dtype=torch.bool),
                     codes.numel() * share[1])

    @torch.no_grad()
    def sample(self, net: Any, feats: Tensor, mask: Tensor, null_feats: Tensor, null_mask: Tensor,
               spec: SampleSpec, generator: Optional[torch.Generator] = None) -> Tensor:
        b, length = feats.shape[0], sum(self.blocks)
        codes = torch.zeros(b, length, dtype=torch.long, device=feats.device)
        decoder = None
        if spec.decode == "cached" and spec.guidance:  # conditional and null caption as one batch of 2B
            decoder = net.decoder(torch.cat([feats, null_feats.to(feats.dtype).expand(b, *feats.shape[1:])]),
                                  torch.cat([mask, null_mask.expand(b, -1)]))
        elif spec.decode == "cached":
            decoder = net.decoder(feats, mask)
        at = 0
        for k, n in enumerate(self.blocks):
            inputs = self.inputs_from(codes)  # scale k's inputs are its parents, drawn at step k - 1
            t = guidance_at(spec, k, len(self.blocks))
            if decoder is not None:  # this scale's positions only, on the caches of the coarser ones
                logits = decoder.step(inputs[:, at:at + n].repeat(2 if spec.guidance else 1, 1))
                logits = cfg_mix(logits[:b].float(), logits[b:].float(), t) if spec.guidance else logits
            else:
                logits = guided_logits(net, inputs, feats, mask, null_feats, null_mask, t)[:, at:at + n]
            codes[:, at:at + n] = pick(logits, spec, generator)
            at += n
        return codes
