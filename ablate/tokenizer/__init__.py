"""Image tokenizer: a conv VQ-VAE trained once per (dataset, spec), cached with its token codes."""
from __future__ import annotations

from ablate.tokenizer.vqvae import (
    TOKENIZER_VERSION,
    VQVAE,
    evaluate_vqvae,
    get_tokenizer,
    tokenize_cached,
    tokenizer_key,
    train_vqvae,
)

__all__ = ["TOKENIZER_VERSION", "VQVAE", "evaluate_vqvae", "get_tokenizer", "tokenize_cached",
           "tokenizer_key", "train_vqvae"]
