"""Text encoders (learned | minilm | hf:<name-or-path>) and their on-disk state cache."""
from __future__ import annotations

from ablate.text.encoders import (
    NULL,
    PAD,
    UNK,
    FrozenTextEncoder,
    LearnedTextEncoder,
    TextEncoder,
    build_text_encoder,
    build_vocab,
    words_of,
)

__all__ = ["NULL", "PAD", "UNK", "FrozenTextEncoder", "LearnedTextEncoder", "TextEncoder",
           "build_text_encoder", "build_vocab", "words_of"]
