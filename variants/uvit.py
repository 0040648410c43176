"""`uvit`: the U-ViT / aMUSEd-style transformer, Muse blocks with long skip connections.

The ``depth`` blocks are :class:`ablate.model.attention.MuseBlock` (pre-norm self-attention over the
image tokens, cross-attention to the text, MLP), split into ``n = (depth - 1) // 2`` *in*
blocks, ``depth - 2n`` *mid* blocks (1 for odd depth, 2 for even) and ``n`` *out* blocks. The in blocks save their outputs; out block
``j`` reads them back in reverse order (the last saved first), merging the saved state into the
residual stream *before* the block::

    h_0 = x
    o_i = h_{i+1} = Block_i(h_i)                          in blocks, i < n (o_i saved)
    h   = Block_mid(h)                                    one or two mid blocks
    h   = Block_{depth-n+j}(merge(h, o_{n-1-j}))          out blocks, j = 0 .. n-1
    merge = W_j [h; o] + b_j     (skip: concat, W_j in R^{D x 2D}, U-ViT's choice)
          | h + o                (skip: add, no parameters)

Choices where the notes are open:

- Init of the concat projection: ``W_j = [I | N(0, 0.02)]``, ``b_j = 0``, so at init an out block
  continues the residual stream unchanged plus a small read of the skip. (U-ViT initialises it
  like any linear, N(0, 0.02) over both halves, which shrinks the residual stream by a factor of
  about ``0.02 sqrt(2D)`` at every out block; the identity keeps the GPT-2 scaling of the blocks
  meaningful.)
- Even depth: U-ViT's layout (in, one mid, out) needs an odd depth (e.g. 13). With
  ``depth // 2`` skip pairs an even depth would have no mid block and the first out block would
  merge its own input with itself, a skip that bridges nothing. So an even depth gets two mid
  blocks and one skip pair fewer: every long skip bridges at least one block, and the block
  count (the budget compared across variants) is ``depth`` as for every other variant.
- Blocks: GPT-2 init as ``transformer`` (N(0, 0.02) weights, zero biases, each block's three
  residual output projections divided by sqrt(3 depth)). Text padding and the empty caption as
  ``transformer`` (key mask; zero cross-attention output when no token is real).
- Parameters: ``transformer`` + ``n (2 D^2 + D)`` with concat; exactly ``transformer`` with add.

No final LayerNorm: the generator applies its own.

Legend: B batch, L image tokens, T text tokens, D width, n = (depth - 1) // 2 skip pairs.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ablate.registry import VariantContext
from ablate.model.attention import Apply, TransformerStack


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width as a multiple of D")
    qk_norm: bool = Field(False, description="LayerNorm on queries and keys per head")
    skip: Literal["concat", "add"] = Field(
        "concat", description="long-skip merge: concat then Linear(2D, D) (U-ViT), or plain addition")


class UViT(TransformerStack):
    name = "uvit"
    description = "U-ViT: Muse transformer blocks with long in->out skip connections (concat+linear or add)"
    Config = Config
    paradigms = ("masked", "ar", "var")  # the skips are position-wise: causal attention keeps it causal

    def _add_modules(self, ctx: VariantContext, cfg: Config) -> None:
        d = ctx.width
        self.n_skips = (ctx.depth - 1) // 2  # at least one mid block: every skip bridges a block
        self.concat = cfg.skip == "concat"
        self.skips = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(self.n_skips if self.concat else 0))

    def _init(self, n_residuals: int) -> None:
        """The blocks as ``transformer``; ``[I | N(0, 0.02)]`` for the skips."""
        super()._init(n_residuals)
        with torch.no_grad():
            for lin in self.skips:
                d = lin.out_features
                lin.weight[:, :d].copy_(torch.eye(d))
                nn.init.normal_(lin.weight[:, d:], std=0.02)
                lin.bias.zero_()

    def run(self, h: Tensor, apply: Apply) -> Tensor:
        """The blocks with the long skips: out block ``depth - n + j`` first merges the output of
        in block ``n - 1 - j`` (position-wise, so decoding one token at a time chains alike)."""
        depth, n = len(self.blocks), self.n_skips
        saved: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            if i >= depth - n:  # out block j = i - (depth - n) reads the mirror in block's output
                j, o = i - (depth - n), saved.pop()
                h = self.skips[j](torch.cat([h, o], dim=-1)) if self.concat else h + o
            h = apply(i, block, h)
            if i < n:
                saved.append(h)
        return h


VARIANT = UViT
