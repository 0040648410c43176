"""`transformer`: the Muse baseline block, repeated ``depth`` times.

Each block is pre-norm and has three residual branches::

    h = h + SelfAttn(LN(h))                   bidirectional over the image tokens (causal for ar)
    h = h + CrossAttn(LN(h), text, text_mask) queries from the image, keys/values from the text
    h = h + MLP(LN(h))                        Linear(D, mlp_ratio D) -> GELU -> Linear

No final LayerNorm: the generator applies its own before the head. Attention is torch's
``scaled_dot_product_attention``. A caption whose mask is all False (no real token) gets a zero
cross-attention output instead of the NaN a fully masked softmax would give.

Legend: B batch, L image tokens, T text tokens, D width, H heads.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ablate.model.attention import Attention, TransformerStack


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width as a multiple of D")
    qk_norm: bool = Field(False, description="LayerNorm on queries and keys per head")


class Transformer(TransformerStack):
    name = "transformer"
    description = "Muse transformer: self-attention, cross-attention to text, MLP"
    Config = Config


__all__ = ["Attention", "Config", "Transformer", "VARIANT"]  # Attention: the name plugins import

VARIANT = Transformer
