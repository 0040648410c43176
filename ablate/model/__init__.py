"""The generator (embeddings + backbone + head) and the blocks variants share."""
from .generator import Generator

__all__ = ["Generator"]
