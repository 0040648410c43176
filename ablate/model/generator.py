"""The token generator around a variant backbone (everything the variants share): embeddings,
text projection, backbone, head. What the tokens mean (masked, next token) is the paradigm's
(:mod:`ablate.paradigm`).

Tokens: image codes in ``[0, K)`` plus one extra token ``K`` (``[MASK]``, or the start token).
Text: the text encoder's states, projected to width D. The backbone maps ``x: [B, L, D]`` to
``h: [B, L, D]``; a final LayerNorm and a linear head give logits over the K codes (never over
the extra token). Positions: a learned embedding each (``positions: learned``), or none here
when the attention blocks rotate by 2D coordinates (``rope2d``; var then keeps one per scale).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..registry import VariantContext


class Generator(nn.Module):
    """Embeddings, text projection, backbone, head.

    ``forward(tokens, text_feats, text_mask) -> (logits [B, L, K], aux: dict[str, Tensor])``.
    Built ``causal`` (ar, var) the backbone reads no later position (``blocks``: no later block);
    ``order``: the raster position each sequence position holds (ar's snake order).
    ``text_feats`` are what the text encoder's ``featurize`` produced for the batch (ids for a
    learned encoder, cached float states for a frozen one).
    """

    def __init__(self, backbone_cls: type, backbone_cfg: Any, text_encoder: nn.Module,
                 codebook_size: int, grid: tuple[int, int], width: int, depth: int, heads: int,
                 text_len: int, dropout: float = 0.0, causal: bool = False,
                 order: Optional[torch.Tensor] = None, blocks: tuple[int, ...] = (), positions: str = "learned"):
        super().__init__()
        self.codebook_size = codebook_size
        self.mask_id = codebook_size
        self.grid = grid
        self.seq_len = grid[0] * grid[1]
        self.tok_emb = nn.Embedding(codebook_size + 1, width)
        self.positions = positions
        # learned: one embedding per position; rope2d: none here (the attention blocks rotate), and
        # for var's scales a learned embedding per scale (VAR's level embedding)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len, width)) if positions == "learned" else None
        self.level_emb = None
        if positions == "rope2d" and blocks:
            self.level_emb = nn.Parameter(torch.zeros(len(blocks), width))
            self.register_buffer("level", torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(blocks)),
                                 persistent=False)
        # the sequence the backbone reads: position i holds raster position order[i] (its
        # embedding); identity for raster order
        order = torch.arange(self.seq_len) if order is None else order
        self.raster = bool(torch.equal(order, torch.arange(self.seq_len)))
        self.causal = causal
        self.register_buffer("order", order, persistent=False)
        self.text_encoder = text_encoder
        self.text_proj = nn.Sequential(nn.Linear(text_encoder.out_dim, width), nn.LayerNorm(width))
        self.emb_norm = nn.LayerNorm(width)
        self.emb_drop = nn.Dropout(dropout)
        coords = ()
        if positions == "rope2d":
            from .attention import image_coords

            coords = tuple(tuple(float(v) for v in rc) for rc in image_coords(grid, order, tuple(blocks)).tolist())
        ctx = VariantContext(width=width, depth=depth, heads=heads, grid=grid, text_len=text_len,
                             dropout=dropout, causal=causal, blocks=tuple(blocks), positions=positions, coords=coords)
        self.backbone = backbone_cls(ctx, backbone_cfg)
        self.out_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, codebook_size)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        for p in (self.pos_emb, self.level_emb):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def encode_text(self, text_feats: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Text features -> projected states ``[B, T, D]`` (padded positions zeroed)."""
        states = self.text_encoder(text_feats, text_mask)
        return self.text_proj(states.to(self.text_proj[0].weight.dtype)) * text_mask.unsqueeze(-1)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Backbone states ``[B, L, D]`` -> logits ``[B, L, K]`` (final norm and head)."""
        return self.head(self.out_norm(h))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, L]`` (codes or the extra token) -> the backbone's input ``x [B, L, D]``."""
        return self.emb_drop(self.emb_norm(self.tok_emb(tokens) + self.position_term()))

    def position_term(self, i: Optional[int] = None, n: Optional[int] = None) -> Any:
        """What each position adds to its token embedding: every position's ``[1, L, D]``,
        position ``i``'s ``[1, D]``, positions ``i .. i + n - 1``'s ``[1, n, D]``; or 0 with
        rotary positions only."""
        if self.pos_emb is not None:
            pos = self.pos_emb if self.raster else self.pos_emb[:, self.order]
        elif self.level_emb is not None:
            pos = self.level_emb[self.level].unsqueeze(0)
        else:
            return 0
        if i is None:
            return pos
        return pos[:, i] if n is None else pos[:, i:i + n]

    def decoder(self, text_feats: torch.Tensor, text_mask: torch.Tensor) -> Optional["Decoder"]:
        """Decoding one position at a time on the backbone's own state (a causal backbone with a
        ``decoder(text, text_mask, length)``: Mamba's recurrent state, attention's KV cache), or
        None where the backbone has none (the caller then runs the whole sequence per token)."""
        make = getattr(self.backbone, "decoder", None)
        if make is None or not self.causal:
            return None
        inner = make(self.encode_text(text_feats, text_mask), text_mask, self.seq_len)
        return None if inner is None else Decoder(self, inner)

    def forward(self, tokens: torch.Tensor, text_feats: torch.Tensor, text_mask: torch.Tensor,
                fill: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Logits ``[B, L, K]`` and the backbone's auxiliary outputs. ``fill(logits) -> tokens
        [B, L]`` (training, from the paradigm) is used only by a backbone with a ``critic``
        pass (mamba-critic): the filled-in sequence is embedded here (no gradient) and the
        critics' logits on it come back as ``aux["critic_logits"]`` (a list, one per critic),
        with ``aux["critic_fill"]`` and ``aux["critic_weight"]``; the paradigm scores them. The
        logits never depend on ``fill``."""
        x = self.embed(tokens)  # [B, L, D]
        text = self.encode_text(text_feats, text_mask)  # [B, T, D]
        out = self.backbone(x, text, text_mask)
        h, aux = (out if isinstance(out, tuple) else (out, {}))
        logits = self.readout(h)  # [B, L, K]
        critic = getattr(self.backbone, "critic", None)
        if fill is not None and critic is not None:
            with torch.no_grad():
                filled = fill(logits.detach())
                x_fill = self.embed(filled)
            aux = dict(aux, critic_logits=critic(x_fill, text, text_mask), critic_fill=filled,
                       critic_weight=float(self.backbone.critic_weight))
        return logits, aux


class Decoder:
    """``step(tokens [B]) -> logits [B, K]``: the next position's prediction, given the tokens
    of every earlier position (fed in sequence order) and the caption; ``step(tokens [B, n])
    -> [B, n, K]``: the next n positions at once (var: a scale, block-causal)."""

    def __init__(self, gen: Generator, inner: Any):
        self.gen, self.inner, self.i = gen, inner, 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        g = self.gen
        n = None if tokens.dim() == 1 else tokens.shape[1]
        x = g.emb_drop(g.emb_norm(g.tok_emb(tokens) + g.position_term(self.i, n)))  # [B, (n,) D]
        self.i += 1 if n is None else n
        return g.readout(self.inner.step(x))
