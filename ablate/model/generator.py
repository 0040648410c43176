"""The masked token generator around a variant backbone (everything the variants share).

Tokens: image codes in ``[0, K)`` plus ``[MASK] = K``. Text: the text encoder's states,
projected to width D. The backbone maps ``x: [B, L, D]`` to ``h: [B, L, D]``; a final LayerNorm
and a linear head give logits over the K codes (never over ``[MASK]``).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import VariantContext


class Generator(nn.Module):
    """Muse/MaskGIT generator: embeddings, text projection, backbone, head.

    ``forward(tokens, text_feats, text_mask) -> (logits [B, L, K], aux: dict[str, Tensor])``.
    ``text_feats`` are what the text encoder's ``featurize`` produced for the batch (ids for a
    learned encoder, cached float states for a frozen one).
    """

    def __init__(self, backbone_cls: type, backbone_cfg: Any, text_encoder: nn.Module,
                 codebook_size: int, grid: tuple[int, int], width: int, depth: int, heads: int,
                 text_len: int, dropout: float = 0.0):
        super().__init__()
        self.codebook_size = codebook_size
        self.mask_id = codebook_size
        self.grid = grid
        self.seq_len = grid[0] * grid[1]
        self.tok_emb = nn.Embedding(codebook_size + 1, width)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len, width))
        self.text_encoder = text_encoder
        self.text_proj = nn.Sequential(nn.Linear(text_encoder.out_dim, width), nn.LayerNorm(width))
        self.emb_norm = nn.LayerNorm(width)
        self.emb_drop = nn.Dropout(dropout)
        ctx = VariantContext(width=width, depth=depth, heads=heads, grid=grid, text_len=text_len,
                             dropout=dropout)
        self.backbone = backbone_cls(ctx, backbone_cfg)
        self.out_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, codebook_size)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def encode_text(self, text_feats: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Text features -> projected states ``[B, T, D]`` (padded positions zeroed)."""
        states = self.text_encoder(text_feats, text_mask)
        return self.text_proj(states.float()) * text_mask.unsqueeze(-1)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Backbone states ``[B, L, D]`` -> logits ``[B, L, K]`` (final norm and head)."""
        return self.head(self.out_norm(h))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, L]`` (codes or ``[MASK]``) -> the backbone's input ``x [B, L, D]``."""
        return self.emb_drop(self.emb_norm(self.tok_emb(tokens) + self.pos_emb))

    def forward(self, tokens: torch.Tensor, text_feats: torch.Tensor, text_mask: torch.Tensor,
                targets: Optional[torch.Tensor] = None, masked: Optional[torch.Tensor] = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``targets [B, L]`` (the true codes, training only) reach a backbone only if it sets
        ``wants_targets``; it then also gets ``readout`` to score states, ``masked [B, L]`` bool
        (where ``tokens`` is ``[MASK]``: the positions the generator's loss counts; derived from
        ``tokens`` when not given) and ``embed`` to build inputs of its own (mamba-critic embeds
        a filled-in sequence), and must use them for auxiliary losses only (a contract test
        checks that the logits do not depend on ``targets``)."""
        x = self.embed(tokens)  # [B, L, D]
        text = self.encode_text(text_feats, text_mask)  # [B, T, D]
        if getattr(self.backbone, "wants_targets", False):
            if targets is not None and masked is None:
                masked = tokens == self.mask_id
            out = self.backbone(x, text, text_mask, targets=targets, readout=self.readout,
                                masked=masked, embed=self.embed)
        else:
            out = self.backbone(x, text, text_mask)
        h, aux = (out if isinstance(out, tuple) else (out, {}))
        return self.readout(h), aux  # [B, L, K]


def aux_losses(aux: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The auxiliary losses among a backbone's outputs: entries named ``loss/<name>``."""
    return {k: v for k, v in aux.items() if k.startswith("loss/")}


def mask_ratio(u: torch.Tensor) -> torch.Tensor:
    """Muse's cosine schedule: share of tokens masked, ``r = cos(pi/2 * u)`` for ``u ~ U(0, 1)``."""
    return torch.cos(0.5 * math.pi * u)


def _rows(x: torch.Tensor, share: tuple[int, int]) -> torch.Tensor:
    """Rows ``s::S`` of ``x`` for ``share = (s, S)``: share s's part of a global draw."""
    s, n = share
    return x if n == 1 else x[s::n]


def random_mask(codes: torch.Tensor, mask_id: int, generator: Optional[torch.Generator] = None,
                share: tuple[int, int] = (0, 1), return_total: bool = False) -> tuple[torch.Tensor, ...]:
    """Mask each row of ``codes: [B, L]`` at a cosine-scheduled ratio (at least one token).

    Returns ``(inputs [B, L] with mask_id at masked places, masked [B, L] bool)``, and with
    ``return_total`` the number of masked tokens in the whole global batch. ``share = (s, S)``:
    ``codes`` are rows ``s::S`` of a global batch of ``S * B`` rows (a rank's or a micro-batch's
    part); the random numbers are drawn for the global batch and this share's rows kept, so S
    shares are masked exactly as the one global batch would be.
    """
    b, length = codes.shape
    u = torch.rand(b * share[1], generator=generator, device="cpu")
    n_all = torch.clamp((mask_ratio(u) * length).ceil().long(), 1, length)  # [S*B]
    scores = _rows(torch.rand(b * share[1], length, generator=generator, device="cpu"), share).to(codes.device)
    n_mask = _rows(n_all, share).to(codes.device)  # [B]
    # the n_mask smallest scores of each row are masked: rank < n_mask
    ranks = scores.argsort(dim=1).argsort(dim=1)
    masked = ranks < n_mask.unsqueeze(1)
    inputs = torch.where(masked, torch.full_like(codes, mask_id), codes)
    return (inputs, masked, int(n_all.sum())) if return_total else (inputs, masked)


def masked_loss(logits: torch.Tensor, codes: torch.Tensor, masked: torch.Tensor,
                label_smoothing: float = 0.0, total: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy on masked positions only. ``logits: [B, L, K]``, ``codes, masked: [B, L]``.
    The mean over them, or with ``total`` their sum / ``total`` (a share's part of the global
    batch's mean: the shares' parts add up to it exactly)."""
    if total is None:
        return F.cross_entropy(logits[masked], codes[masked], label_smoothing=label_smoothing)
    return F.cross_entropy(logits[masked], codes[masked], label_smoothing=label_smoothing, reduction="sum") / total


def drop_text(feats: torch.Tensor, mask: torch.Tensor, null_feats: torch.Tensor, null_mask: torch.Tensor,
              p: float, generator: Optional[torch.Generator] = None,
              share: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each caption by the null caption with probability ``p`` (classifier-free guidance);
    ``share`` as in :func:`random_mask`.

    ``feats: [B, T(, Dt)]``, ``mask: [B, T]``; ``null_feats``/``null_mask`` have batch size 1.
    """
    if p <= 0:
        return feats, mask
    drop = _rows(torch.rand(feats.shape[0] * share[1], generator=generator, device="cpu"), share)
    drop = drop.to(feats.device) < p  # [B]
    shape = (-1,) + (1,) * (feats.dim() - 1)
    feats = torch.where(drop.view(shape), null_feats.to(feats.dtype).expand_as(feats), feats)
    mask = torch.where(drop.view(-1, 1), null_mask.expand_as(mask), mask)
    return feats, mask
