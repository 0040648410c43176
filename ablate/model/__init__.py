"""The generator shared by all variants: embeddings, masking, loss, MaskGIT sampler."""
from .generator import Generator, aux_losses, drop_text, mask_ratio, masked_loss, random_mask
from .sampler import guidance_at, sample_tokens

__all__ = ["Generator", "aux_losses", "drop_text", "mask_ratio", "masked_loss", "random_mask", "guidance_at",
           "sample_tokens"]
