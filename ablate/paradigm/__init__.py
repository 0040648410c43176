"""Generation paradigms: how a generator turns tokens into images (see :mod:`.base`):
``masked`` (Muse/MaskGIT), ``ar`` (next token) and ``var`` (next scale). The paradigm is one axis of the grid
(``model.paradigm``)."""
from __future__ import annotations

from typing import Optional

import torch

from .base import Batch, Paradigm, aux_losses, drop_text, guidance_at, guided_logits
from .ar import AR, generation_order
from .masked import Masked, mask_ratio, masked_loss, random_mask, sample_tokens
from .var import VAR

PARADIGMS: dict[str, type[Paradigm]] = {p.name: p for p in (Masked, AR, VAR)}

__all__ = ["AR", "PARADIGMS", "VAR", "Batch", "Masked", "generation_order", "Paradigm", "aux_losses", "drop_text", "guidance_at", "guided_logits",
           "get", "mask_ratio", "masked_loss", "random_mask", "sample_tokens"]


def get(name: str, codebook_size: int, order: Optional[torch.Tensor] = None,
        scales: Optional[list[int]] = None) -> Paradigm:
    """The paradigm ``name`` for ``codebook_size`` codes; ``order``: the generation order (ar);
    ``scales``: the multiscale tokenizer's (var)."""
    if name == "var":
        if not scales:
            raise ValueError("paradigm var: needs the tokenizer's scales")
        return VAR(codebook_size, scales)
    if name == "ar":
        if order is None:
            raise ValueError("paradigm ar: needs the generation order")
        return AR(codebook_size, order)
    return PARADIGMS[name](codebook_size)
