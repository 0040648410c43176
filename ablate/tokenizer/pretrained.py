"""A frozen pretrained tokenizer: a local ``diffusers`` ``VQModel`` directory (aMUSEd's
``vqvae`` subfolder is the seeds' choice: 8192 codes, f=16, so 16x16 tokens at 256 px).

The codebook size, downsampling factor and token grid are read from the model's config; nothing
trains. Weights load from ``diffusion_pytorch_model.safetensors`` when present, otherwise from
the ``.bin`` file with ``torch.load(weights_only=True)``: a model directory may come from anyone,
and nothing in it is ever unpickled. Nothing is downloaded.

Same face as :class:`~ablate.tokenizer.VQVAE`: ``encode(uint8 [n, 3, H, W]) -> long [n, h, w]``,
``decode(long [n, h, w]) -> uint8 [n, 3, H, W]``, ``grid``, ``codebook_size``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ablate.config import ConfigError, content_hash
from ablate.utils import expand_path

__all__ = ["PretrainedVQ", "check_pretrained", "load_pretrained", "pretrained_key"]

ENCODE_BATCH = 32
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not path.is_dir() or not file.is_file():
        raise ConfigError(f"tokenizer.path: {str(path)!r} is not a diffusers model directory "
                          "(config.json and diffusion_pytorch_model.safetensors expected)")
    try:
        cfg = json.loads(file.read_text())
    except ValueError:
        raise ConfigError(f"tokenizer.path: {str(file)!r} is not JSON") from None
    if cfg.get("_class_name") != "VQModel":
        raise ConfigError(f"tokenizer.path: {str(path)!r} holds a {cfg.get('_class_name')!r}, not a "
                          "diffusers VQModel (for aMUSEd give its vqvae/ subfolder)")
    return cfg


def check_pretrained(path: str, image_size: int) -> None:
    """Without loading weights: ``path`` holds a VQModel whose downsampling divides
    ``image_size`` (ConfigError naming the field otherwise)."""
    cfg = _config(Path(expand_path(path, "tokenizer.path")))
    down = 2 ** (len(cfg.get("block_out_channels") or [0]) - 1)
    if image_size % down:
        raise ConfigError(f"data.image_size ({image_size}) is not divisible by the pretrained "
                          f"tokenizer's downsampling factor {down} (tokenizer.path {path})")


def pretrained_key(path: str) -> str:
    """A key of the model's identity: its config and the size and time of its weight files."""
    root = Path(expand_path(path, "tokenizer.path")).resolve()
    cfg = _config(root)
    files = []
    for name in _WEIGHTS:
        f = root / name
        if f.is_file():
            st = f.stat()
            files.append([name, st.st_size, st.st_mtime_ns])
    return content_hash({"config": cfg, "weights": files})


class PretrainedVQ:
    """A frozen diffusers VQModel; inputs and outputs as uint8 images and long codes."""

    def __init__(self, model: Any, image_size: int, device: torch.device):
        self.model, self.device = model.to(device).eval().requires_grad_(False), device
        cfg = model.config
        self.codebook_size = int(cfg.num_vq_embeddings)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        if image_size % self.downsample:
            raise ConfigError(f"data.image_size ({image_size}) is not divisible by the pretrained "
                              f"tokenizer's downsampling factor {self.downsample}")
        side = image_size // self.downsample
        self.grid = (side, side)
        self.dim = int(cfg.vq_embed_dim or cfg.latent_channels)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """uint8 ``[n, 3, H, W]`` -> long codes ``[n, h, w]`` (CPU)."""
        out = []
        for i in range(0, images.shape[0], ENCODE_BATCH):
            x = images[i:i + ENCODE_BATCH].to(self.device).float() / 127.5 - 1.0
            h = self.model.encode(x).latents  # [b, C, h, w]
            _, _, (_, _, idx) = self.model.quantize(h)
            out.append(idx.reshape(x.shape[0], *h.shape[-2:]).cpu())
        return torch.cat(out).long()

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """long codes ``[n, h, w]`` -> uint8 ``[n, 3, H, W]`` (on the codes' device)."""
        out = []
        for i in range(0, codes.shape[0], ENCODE_BATCH):
            c = codes[i:i + ENCODE_BATCH].to(self.device)
            b, h, w = c.shape
            q = self.model.quantize.get_codebook_entry(c.reshape(-1), (b, h, w, self.dim))  # [b, C, h, w]
            x = self.model.decode(q, force_not_quantize=True).sample
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
        return torch.cat(out).to(codes.device)


def load_pretrained(path: str, image_size: int, device: torch.device | str = "cpu") -> PretrainedVQ:
    """Load the VQModel at ``path`` offline (ConfigError naming ``tokenizer.path`` if it is not one)."""
    try:
        from diffusers import VQModel
    except ImportError:
        raise ConfigError("tokenizer.kind=diffusers needs the diffusers package: "
                          "pip install -e '.[scale]'") from None
    root = Path(expand_path(path, "tokenizer.path")).resolve()
    cfg = _config(root)
    try:
        model = VQModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"tokenizer.path: the VQModel config in {str(root)!r} is invalid: {err}") from None
    if (root / _WEIGHTS[0]).is_file():
        from safetensors.torch import load_file

        state = load_file(str(root / _WEIGHTS[0]))
    elif (root / _WEIGHTS[1]).is_file():
        state = torch.load(root / _WEIGHTS[1], map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"tokenizer.path: {str(root)!r} has no weights ({' or '.join(_WEIGHTS)})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"tokenizer.path: weights in {str(root)!r} do not match its config "
                          f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    return PretrainedVQ(model, image_size, torch.device(device))
