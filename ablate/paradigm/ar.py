"""``ar``: next-token prediction (seed 004's GPT over VQ tokens; AiM's Mamba AR). The image's
codes are read in a fixed order (``model.order``: raster, or snake: every other row right to
left); the generator reads ``[start, c_0, ..., c_{L-2}]`` and predicts ``c_0 .. c_{L-1}`` with a
causal backbone (position i sees inputs <= i only, so its prediction depends on the start token
and the codes before i, and on the caption). Training: teacher forcing, cross-entropy at every
position. Classifier-free guidance as in seed 003, by caption dropout in training and
``(1 + t) l_c - t l_u`` at every token (constant ``t = sample.guidance``: MaskGIT's schedule
ramps over its decoding steps, which an AR model does not have), then ``sample.temperature``,
``sample.top_k`` and ``sample.top_p``.

Decoding (``sample.decode``): ``cached`` runs the backbone one token at a time on its own state
(the Mamba layers' conv and SSM states, attention's key/value cache: O(1) work per token for
Mamba), where the backbone has a decoder (:meth:`ablate.model.Generator.decoder`); ``full`` runs
the whole sequence again for every token (O(L) per token), the reference the cached path is
tested against, and the path of backbones without a decoder.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..config import SampleSpec
from .base import Batch, EveryPosition, cfg_mix, gumbel

ORDERS = ("raster", "snake")


def generation_order(order: str, grid: tuple[int, int]) -> Tensor:
    """``[L]``: position i of the sequence is raster position ``order[i]``."""
    h, w = grid
    idx = torch.arange(h * w).view(h, w)
    if order == "snake":
        idx = idx.clone()
        idx[1::2] = idx[1::2].flip(1)
    elif order != "raster":
        raise ValueError(f"model.order: one of {', '.join(ORDERS)}; got {order!r}")
    return idx.reshape(-1)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``logits [..., K]`` with every token outside the top ``top_k`` (0: no limit) and outside
    the smallest set whose probability reaches ``top_p`` set to -inf (the most likely token
    always stays)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = logits.sort(dim=-1, descending=True)
        p = torch.softmax(srt, dim=-1)
        drop = (p.cumsum(-1) - p) >= top_p  # the mass before this token already reaches p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def pick(logits: Tensor, spec: SampleSpec, generator: Optional[torch.Generator]) -> Tensor:
    """One token per row of ``logits [B, K]``: temperature, top-k, top-p, then a Gumbel-max draw."""
    logits = filter_logits(logits.float() / spec.temperature, spec.top_k, spec.top_p)
    return (logits + gumbel(logits.shape, generator, logits.device)).argmax(-1)


class AR(EveryPosition):
    name = "ar"
    causality = "causal"

    def __init__(self, codebook_size: int, order: Tensor):
        super().__init__(codebook_size)
        self.order = order

    def make_batch(self, codes: Tensor, g: Optional[torch.Generator], share: tuple[int, int] = (0, 1)) -> Batch:
        seq = codes[:, self.order.to(codes.device)]  # [B, L] in generation order
        start = torch.full_like(seq[:, :1], self.special)
        inputs = torch.cat([start, seq[:, :-1]], dim=1)
        return Batch(inputs, seq, torch.ones_like(seq, dtype=torch.bool), seq.numel() * share[1])

    @torch.no_grad()
    def sample(self, net: Any, feats: Tensor, mask: Tensor, null_feats: Tensor, null_mask: Tensor,
               spec: SampleSpec, generator: Optional[torch.Generator] = None) -> Tensor:
        b, length = feats.shape[0], len(self.order)
        t = spec.guidance
        if t:  # conditional and null caption as one batch of 2B
            feats = torch.cat([feats, null_feats.to(feats.dtype).expand(b, *feats.shape[1:])])
            mask = torch.cat([mask, null_mask.expand(b, -1)])
        rows = feats.shape[0]
        decoder = net.decoder(feats, mask) if spec.decode == "cached" else None
        inputs = torch.full((rows, length), self.special, dtype=torch.long, device=feats.device)
        seq = torch.empty(b, length, dtype=torch.long, device=feats.device)
        for i in range(length):
            if decoder is not None:
                logits = decoder.step(inputs[:, i])  # [rows, K]
            else:
                logits = net(inputs, feats, mask)[0][:, i]
            if t:
                logits = cfg_mix(logits[:b].float(), logits[b:].float(), t)
            seq[:, i] = pick(logits, spec, generator)
            if i + 1 < length:
                inputs[:, i + 1] = seq[:, i].repeat(rows // b)
        out = torch.empty_like(seq)
        out[:, self.order.to(seq.device)] = seq
        return out
