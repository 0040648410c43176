"""The VQGAN recipe's pieces (Esser et al. 2021): PatchGAN discriminator, hinge loss, the adaptive
adversarial weight, the LPIPS perceptual distance, and an EMA of the tokenizer's weights.

Nothing here downloads anything: LPIPS is built from a local state-dict file in the layout of the
``lpips`` package (VGG16 trunk ``net.slice{1..5}.<i>`` + linear heads ``lin{0..4}.model.1``), its
channel widths read from the file, so the real weights give the real LPIPS and a narrow randomly
initialised file of the same layout gives a cheap stand-in for tests. :func:`lpips_state_from`
converts torchvision's ``vgg16().features`` weights plus ``lpips``' ``vgg.pth`` into that layout.

Legend: n images, H x W pixels; images enter every module here in [-1, 1].
"""
from __future__ import annotations

import copy
import functools
import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------- discriminator


class PatchGAN(nn.Module):
    """Esser et al.'s NLayerDiscriminator: ``layers`` stride-2 4x4 convs, one stride-1 conv, then a
    1-channel 4x4 conv: a logit per overlapping patch. GroupNorm instead of the original BatchNorm:
    with gradient accumulation over micro-batches of 3 (the seed's 512 px stage) batch statistics
    would make the loss depend on how a batch is split."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            c_out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, c_out // 4), c_out),
                     nn.LeakyReLU(0.2)]
            c = c_out
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        self.layers = layers

    def min_size(self) -> int:
        """Smallest square input that still leaves a 1x1 logit map."""
        return 2 ** self.layers * 3

    def forward(self, x: Tensor) -> Tensor:
        """x: [n, 3, H, W] in [-1, 1] -> patch logits [n, 1, H', W']."""
        return self.net(x)


def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """Discriminator hinge loss on patch logits: 0 once real > 1 and fake < -1 everywhere."""
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last: Tensor, max_weight: float = 1e4) -> Tensor:
    """||d rec_loss / d last|| / (||d g_loss / d last|| + 1e-4), clamped to [0, max_weight] and
    detached: the adversarial term pulls on the decoder's last layer as hard as reconstruction does.
    ``last`` must be a weight both losses reach (the decoder's output conv); the graphs are kept."""
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------------------- LPIPS

# torchvision vgg16().features indices of each LPIPS slice (convs; a ReLU follows each, pools open
# slices 2-5), and the ReLU whose output the slice returns
_SLICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """LPIPS distance with the lpips package's VGG16 layout; widths come from the state dict.

    Frozen and in eval mode; gradients flow to the inputs only. Images need a side of at least
    16 px (four 2x2 max-pools)."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.slices = nn.ModuleList()
        c_in = 3
        widths = []
        for s, convs in enumerate(_SLICES):
            seq = nn.Sequential()
            for j, idx in enumerate(convs):
                if s and j == 0:
                    seq.add_module(str(idx - 1), nn.MaxPool2d(2, 2))
                w = state.get(f"net.slice{s + 1}.{idx}.weight")
                if w is None:
                    raise KeyError(f"net.slice{s + 1}.{idx}.weight")
                seq.add_module(str(idx), nn.Conv2d(c_in, w.shape[0], 3, padding=1))
                seq.add_module(str(idx + 1), nn.ReLU())
                c_in = w.shape[0]
            self.slices.append(seq)
            widths.append(c_in)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        mine = {}
        for s, seq in enumerate(self.slices):
            for name, t in seq.state_dict().items():
                mine[f"slices.{s}.{name}"] = state[f"net.slice{s + 1}.{name}"]
        for k in range(len(widths)):
            mine[f"lins.{k}.weight"] = state[f"lin{k}.model.1.weight"]
        self.load_state_dict({**mine, "shift": self.shift, "scale": self.scale})
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always frozen: never let a parent's train() flip it

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y: [n, 3, H, W] in [-1, 1] -> distance [n] (0 for identical images)."""
        hx, hy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        out = x.new_zeros(x.shape[0])
        for seq, lin in zip(self.slices, self.lins):
            hx, hy = seq(hx), seq(hy)
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            out = out + lin((nx - ny).pow(2)).mean((1, 2, 3))
        return out


def load_state_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only``: no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer.lpips_weights: no file at {p}; give a local LPIPS state-dict "
                                "file (see ablate.tokenizer.vqgan.lpips_state_from) or remove the key")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # pragma: no cover - safetensors comes with transformers
            raise ImportError("tokenizer.lpips_weights: reading .safetensors needs `pip install "
                              "safetensors`; or save the state dict with torch.save") from err
        return load_file(str(p))
    state = torch.load(p, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_lpips(path: str | os.PathLike) -> LPIPS:
    """LPIPS from a local state-dict file; one line naming the file and the missing key if the
    layout is not the lpips package's VGG16 one."""
    state = load_state_file(path)
    try:
        return LPIPS(state)
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"tokenizer.lpips_weights {path}: not an LPIPS VGG16 state dict "
                         f"({type(err).__name__}: {str(err).splitlines()[0]}); expected keys "
                         "net.slice1.0.weight ... net.slice5.28.bias and lin0.model.1.weight ... "
                         "lin4.model.1.weight (lpips_state_from builds them)") from None


def lpips_state_from(vgg_features: dict[str, Tensor], lins: dict[str, Tensor]) -> dict[str, Tensor]:
    """Combine torchvision's ``vgg16(weights=...).features.state_dict()`` (keys ``0.weight``...,
    or ``features.0.weight``...) and the ``lpips`` package's ``weights/v0.1/vgg.pth`` (keys
    ``lin0.model.1.weight``...) into the one file :func:`load_lpips` reads."""
    out: dict[str, Tensor] = {}
    for s, convs in enumerate(_SLICES):
        for idx in convs:
            for part in ("weight", "bias"):
                src = vgg_features.get(f"{idx}.{part}", vgg_features.get(f"features.{idx}.{part}"))
                if src is None:
                    raise KeyError(f"vgg_features: no {idx}.{part} (expected torchvision vgg16().features)")
                out[f"net.slice{s + 1}.{idx}.{part}"] = src
    for k in range(len(_SLICES)):
        out[f"lin{k}.model.1.weight"] = lins[f"lin{k}.model.1.weight"]
    return out


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """Content hash of a weights file (cached per path, size and mtime): tokenizer keys name the
    LPIPS weights by content, so a moved file keeps its tokenizers and a changed one does not."""
    p = Path(path)
    if not p.is_file():
        load_state_file(p)  # raises the one-line error
    st = p.stat()
    return _digest(str(p.resolve()), st.st_size, st.st_mtime_ns)


# ------------------------------------------------------------------------------------ weights EMA


class WeightsEMA:
    """Exponential moving average of a module's floating-point state (parameters and buffers:
    the EMA quantizer's codebook is a buffer); other buffers (flags) are copied.

    The decay warms up as min(decay, (1 + t) / (10 + t)) so the first updates are not tied to
    the random initialisation. ``module`` is the averaged copy: encode and decode with it."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = model.state_dict()
        for name, t in self.module.state_dict().items():
            if t.is_floating_point():
                t.lerp_(src[name], 1.0 - d)
            else:
                t.copy_(src[name])
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
