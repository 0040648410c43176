"""Conv VQ-VAE: uint8 images <-> a grid of discrete codes, trained once per (data, spec) and cached.

The encoder halves the resolution ``log2(downsample)`` times with stride-2 convs, refines at the
token resolution with residual blocks and projects to ``code_dim``; the quantizer snaps every
vector to its nearest codebook entry; the decoder mirrors the encoder and predicts [0, 1] pixels
linearly, clamped when decoding (a sigmoid output saturated on the dark backgrounds that dominate
``shapes`` and stopped learning). Two quantizers: ``ema`` (codebook = running mean of the encoder
vectors assigned to each code, Laplace-smoothed counts) and ``st`` (codebook learned by gradient
with codebook + commitment losses). Codes unused for ``restart_after`` steps are re-initialised
from encoder outputs of the batch, which keeps codebook usage high on data as repetitive as
``shapes``.

Training (:mod:`ablate.tokenizer.stages`) runs one fully convolutional model through
``tokenizer.stages`` of rising resolution, with the VQGAN recipe's pieces
(:mod:`ablate.tokenizer.vqgan`) where switched on; the defaults are the plain MSE VQ-VAE, bit
for bit. A tokenizer whose encoder died (ReLU, no gradient: measured on the 16-token shapes
tokenizer at seed 0, 9 of 512 codes) is refused with :class:`~ablate.tokenizer.health.CodebookCollapse`; ``act: silu``
trains it (91% of the codes); the cosine lookup does not (12 codes: a dead encoder maps every
patch to one vector, whatever the metric).

Legend: n images, C code_dim, K codebook_size, (h, w) token grid, H x W pixels.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate.config import TokenizerSpec, content_hash, drop_later_defaults
from ablate.tokenizer.health import check_collapse, code_stats, stage_metrics
from ablate.utils import atomic_torch_save, cache_path, torch_load

if TYPE_CHECKING:
    from ablate.tokenizer.stages import Trained

# Bump when the architecture or training recipe changes: old caches then miss instead of loading
# weights into a module that no longer matches them.
TOKENIZER_VERSION = 1
ENCODE_BATCH = 512


def _act(spec: TokenizerSpec) -> type[nn.Module]:
    """``tokenizer.act``: ReLU (the original) or SiLU, which has no dead region."""
    return nn.SiLU if spec.act == "silu" else nn.ReLU


class ResBlock(nn.Module):
    """x + conv1x1(act(conv3x3(act(x)))): cheap refinement at a fixed resolution."""

    def __init__(self, c: int, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 1)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x))))


def _stage_channels(hidden: int, n_down: int) -> list[int]:
    """Channels after each stride-2 stage: halved towards full resolution, where convs are dearest."""
    return [max(16, hidden >> (n_down - 1 - i)) for i in range(n_down)]


class Encoder(nn.Module):
    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__()
        n_down = int(math.log2(spec.downsample))
        act = _act(spec)
        layers: list[nn.Module] = []
        c_in = 3
        if n_down == 0:
            layers += [nn.Conv2d(3, spec.hidden, 3, padding=1)]
            c_in = spec.hidden
        for i, c in enumerate(_stage_channels(spec.hidden, n_down)):
            if i:
                layers.append(act())
            layers.append(nn.Conv2d(c_in, c, 4, stride=2, padding=1))
            c_in = c
        if c_in != spec.hidden:
            layers += [act(), nn.Conv2d(c_in, spec.hidden, 3, padding=1)]
        layers += [ResBlock(spec.hidden, act) for _ in range(spec.res_blocks)]
        layers += [act(), nn.Conv2d(spec.hidden, spec.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x: [n, 3, H, W] in [-1, 1] -> z: [n, C, h, w]."""
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__()
        n_down = int(math.log2(spec.downsample))
        chans = _stage_channels(spec.hidden, n_down)[::-1]  # token resolution -> full resolution
        act = _act(spec)
        layers: list[nn.Module] = [nn.Conv2d(spec.code_dim, spec.hidden, 3, padding=1)]
        layers += [ResBlock(spec.hidden, act) for _ in range(spec.res_blocks)]
        c_in = spec.hidden
        for i in range(n_down):
            c_out = chans[i + 1] if i + 1 < n_down else 16
            layers += [act(), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
            c_in = c_out
        # 1x1 to pixels: a 3x3 conv at full resolution cost as much as the rest of the decoder
        # for no visible gain; dropping the per-pixel nonlinearity altogether doubled the MSE.
        layers += [act(), nn.Conv2d(c_in, 3, 1 if n_down else 3, padding=0 if n_down else 1)]
        self.net = nn.Sequential(*layers)

    @property
    def last(self) -> Tensor:
        """The output conv's weight: where the VQGAN adaptive weight compares gradient norms."""
        return self.net[-1].weight

    def forward(self, q: Tensor) -> Tensor:
        """q: [n, C, h, w] -> pixels [n, 3, H, W], nominally in [0, 1] (unclamped)."""
        return self.net(q)


class Quantizer(nn.Module):
    """Nearest-neighbour codebook lookup with EMA or straight-through learning and dead-code restarts.

    ``lookup: cosine`` (ViT-VQGAN) l2-normalises encoder outputs and codes before the lookup, so
    the lookup is by angle, every code lies on the unit sphere where the data is, and the decoder
    sees unit vectors; ``code_dim`` is then the factorised (low) lookup dimension."""

    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__()
        self.K, self.C = spec.codebook_size, spec.code_dim
        self.kind = spec.quantizer
        self.decay = spec.ema_decay
        self.commitment = spec.commitment
        self.restart_after = spec.restart_after if spec.dead_code_restart else 0
        self.cosine = spec.lookup == "cosine"
        self.eps = 1e-5
        embed = torch.randn(self.K, self.C) / math.sqrt(self.C)
        embed = self._space(embed)
        if self.kind == "st":
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("cluster_size", torch.zeros(self.K))
            self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("initialised", torch.tensor(False))
        # Steps since each code was last chosen: training bookkeeping outside the state dict (cached
        # weights of before load as they are); the training checkpoint saves it.
        self._idle = torch.zeros(self.K, dtype=torch.long)
        self.restarts = 0

    def _space(self, x: Tensor) -> Tensor:
        """The lookup space: unit vectors with ``lookup: cosine``, else ``x`` itself."""
        return F.normalize(x, dim=-1) if self.cosine else x

    def codes(self, z: Tensor) -> Tensor:
        """z: [m, C] -> nearest code index [m] (squared L2 in the lookup space), in row chunks so
        that the distance matrix stays small for large codebooks."""
        e = self._space(self.embed)
        z = self._space(z)
        e2 = e.pow(2).sum(1)[None]  # [1, K]
        rows = max(1, 2**22 // self.K)
        return torch.cat([(e2 - 2 * c @ e.t()).argmin(1) for c in z.split(rows)]) if z.shape[0] else \
            torch.zeros(0, dtype=torch.long, device=z.device)

    def lookup(self, idx: Tensor) -> Tensor:
        """idx: [...] long -> code vectors [..., C] (unit vectors with ``lookup: cosine``)."""
        return F.embedding(idx, self._space(self.embed))

    @torch.no_grad()
    def _init_from(self, z: Tensor, gen: torch.Generator) -> None:
        """Codebook = random encoder outputs of the first batch: every code starts in the data."""
        pick = torch.randint(0, z.shape[0], (self.K,), generator=gen).to(z.device)
        self.embed.data.copy_(z[pick])
        if self.kind == "ema":
            self.cluster_size.fill_(1.0)
            self.embed_sum.copy_(z[pick])
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, z: Tensor, idx: Tensor, counts: Tensor) -> None:
        sums = torch.zeros_like(self.embed).index_add_(0, idx, z)  # [K, C]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        # Laplace smoothing keeps a code that lost all its vectors from dividing by zero.
        smoothed = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n
        self.embed.copy_(self._space(self.embed_sum / smoothed[:, None]))

    @torch.no_grad()
    def _restart_dead(self, z: Tensor, err: Tensor, counts: Tensor, gen: torch.Generator) -> None:
        """Move codes idle for ``restart_after`` steps onto encoder outputs of this batch [m, C],
        drawn with probability proportional to their quantisation error ``err`` [m]: on images
        that are mostly background, uniform draws would mostly clone background codes."""
        self._idle = torch.where(counts.cpu() > 0, torch.zeros_like(self._idle), self._idle + 1)
        dead = (self._idle >= self.restart_after).nonzero().flatten()
        if dead.numel() == 0:
            return
        w = err.double().cpu().clamp_min(0)
        w = w if float(w.sum()) > 0 else torch.ones_like(w)
        pick = torch.multinomial(w, dead.numel(), replacement=True, generator=gen).to(z.device)
        new = z[pick] + 1e-3 * z.std() * torch.randn(dead.numel(), self.C, generator=gen).to(z.device)
        new = self._space(new)
        dead_d = dead.to(z.device)
        self.embed.data[dead_d] = new
        if self.kind == "ema":
            self.cluster_size[dead_d] = 1.0
            self.embed_sum[dead_d] = new
        self._idle[dead] = 0
        self.restarts += int(dead.numel())

    def forward(self, z: Tensor, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """z: [n, C, h, w] -> (q straight-through [n, C, h, w], codes [n, h, w], vq loss scalar).

        In training mode it also updates the codebook (EMA) and restarts dead codes, both drawing
        randomness from ``gen`` so a run is reproducible.
        """
        n, C, h, w = z.shape
        flat = self._space(z.permute(0, 2, 3, 1).reshape(-1, C))  # [n*h*w, C]
        if self.training and gen is not None and not bool(self.initialised):
            self._init_from(flat.detach(), gen)
        idx = self.codes(flat.detach())
        q = self.lookup(idx)  # [n*h*w, C]
        loss = self.commitment * F.mse_loss(flat, q.detach())
        if self.training:
            counts = torch.bincount(idx, minlength=self.K).to(flat.dtype)  # [K]
            if self.kind == "ema":
                self._ema_update(flat.detach(), idx, counts)
            else:
                loss = loss + F.mse_loss(q, flat.detach())
            if self.restart_after and gen is not None:
                err = (flat.detach() - q.detach()).pow(2).sum(1)
                self._restart_dead(flat.detach(), err, counts, gen)
        q = flat + (q - flat).detach()  # straight-through: decoder gradient flows to the encoder
        return q.reshape(n, h, w, C).permute(0, 3, 1, 2), idx.reshape(n, h, w), loss


class GroupQuantizer(nn.Module):
    """``c = tokenizer.codebooks`` codebooks (seed 004, van den Oord et al.): the ``C`` channels
    of every location are split into ``c`` groups of ``C / c``, each snapped to its own codebook
    of ``K`` codes. A location's ``c`` codes sit side by side in the token grid, which is then
    ``(h, w * c)``: position-major, the codebooks of one location consecutive in raster order."""

    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__()
        self.c, self.K = spec.codebooks, spec.codebook_size
        part = spec.model_copy(update={"code_dim": spec.code_dim // spec.codebooks, "codebooks": 1})
        self.groups = nn.ModuleList(Quantizer(part) for _ in range(self.c))

    @property
    def restarts(self) -> int:
        return sum(q.restarts for q in self.groups)

    @restarts.setter
    def restarts(self, value: int) -> None:  # a checkpoint's total: kept on the first group
        for i, q in enumerate(self.groups):
            q.restarts = int(value) if i == 0 else 0

    @property
    def _idle(self) -> Tensor:
        return torch.stack([q._idle for q in self.groups])

    @_idle.setter
    def _idle(self, value: Tensor) -> None:
        for q, v in zip(self.groups, value.view(self.c, -1)):
            q._idle = v.clone()

    def codes(self, z: Tensor) -> Tensor:
        """z: [m, C] -> codes [m, c]."""
        return torch.stack([q.codes(part) for q, part in zip(self.groups, z.chunk(self.c, dim=1))], dim=1)

    def lookup(self, idx: Tensor) -> Tensor:
        """idx: [..., w * c] (a location's codes consecutive) -> vectors [..., w, C]."""
        idx = idx.unflatten(-1, (-1, self.c))
        return torch.cat([q.lookup(idx[..., j]) for j, q in enumerate(self.groups)], dim=-1)

    def forward(self, z: Tensor, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """z: [n, C, h, w] -> (q [n, C, h, w], codes [n, h, w * c], vq loss: the groups' mean)."""
        outs = [q(part, gen) for q, part in zip(self.groups, z.chunk(self.c, dim=1))]
        q = torch.cat([o[0] for o in outs], dim=1)
        idx = torch.stack([o[1] for o in outs], dim=-1).flatten(-2)  # [n, h, w * c]
        return q, idx, torch.stack([o[2] for o in outs]).mean()


class MultiScaleQuantizer(nn.Module):
    """VAR's multi-scale residual quantizer (Tian et al. 2024): one shared codebook, and the
    encoder's map ``z [n, C, h, h]`` quantized as a sum over ``scales`` s_1 < ... < s_K = h::

        f = 0
        for s in scales:
            r_s  = area-downsample(z - f, s x s)          what the coarser scales left
            c_s  = nearest codes of r_s                   s^2 tokens
            f   += phi(bicubic-upsample(e[c_s], h x h))   phi(u) = u / 2 + conv3x3(u) / 2
        decoder(f)

    Codes are the scales' maps flattened in raster order and concatenated, coarse to fine:
    ``sum s^2`` tokens (``[n, 1, L]``: a one-row "grid"). Training: the codebook learns by EMA
    (or straight-through) on every scale's residuals, the encoder commits to ``f`` and ``phi``
    learns to make ``f`` match ``z``; the decoder reads ``f`` straight-through to the encoder."""

    def __init__(self, spec: TokenizerSpec, side: int) -> None:
        super().__init__()
        self.q = Quantizer(spec)
        self.scales, self.side, self.K = list(spec.scales), side, spec.codebook_size
        self.commitment = spec.commitment
        self.phi = nn.Conv2d(spec.code_dim, spec.code_dim, 3, padding=1)
        self.L = sum(s * s for s in self.scales)

    @property
    def restarts(self) -> int:
        return self.q.restarts

    @restarts.setter
    def restarts(self, value: int) -> None:
        self.q.restarts = int(value)

    @property
    def _idle(self) -> Tensor:
        return self.q._idle

    @_idle.setter
    def _idle(self, value: Tensor) -> None:
        self.q._idle = value

    def _add(self, e: Tensor) -> Tensor:
        """A scale's code vectors ``[n, C, s, s]`` -> its share of ``f`` ``[n, C, h, h]``."""
        if e.shape[-1] != self.side:
            e = F.interpolate(e, size=(self.side, self.side), mode="bicubic", align_corners=False)
        return 0.5 * e + 0.5 * self.phi(e)

    def _residual(self, z: Tensor, f: Tensor, s: int) -> Tensor:
        r = z - f
        return r if s == self.side else F.interpolate(r, size=(s, s), mode="area")

    def codes_map(self, z: Tensor) -> Tensor:
        """z: [n, C, h, h] -> codes [n, 1, L] (no training updates)."""
        f, out = torch.zeros_like(z), []
        for s in self.scales:
            r = self._residual(z, f, s)
            idx = self.q.codes(r.permute(0, 2, 3, 1).reshape(-1, r.shape[1])).view(z.shape[0], s, s)
            out.append(idx.flatten(1))
            f = f + self._add(self.q.lookup(idx).permute(0, 3, 1, 2))
        return torch.cat(out, dim=1).unsqueeze(1)

    def latents(self, codes: Tensor) -> Tensor:
        """codes [n, 1, L] or [n, L] -> f [n, C, h, h]."""
        codes = codes.reshape(codes.shape[0], -1)
        f, at = None, 0
        for s in self.scales:
            idx = codes[:, at:at + s * s].view(-1, s, s)
            at += s * s
            add = self._add(self.q.lookup(idx).permute(0, 3, 1, 2))
            f = add if f is None else f + add
        return f

    def forward(self, z: Tensor, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """z: [n, C, h, h] -> (f straight-through [n, C, h, h], codes [n, 1, L], loss)."""
        f, out = torch.zeros_like(z), []
        for s in self.scales:
            r = self._residual(z.detach(), f.detach(), s)
            _, idx, q_loss = self.q(r, gen)  # the codebook learns on this scale's residuals
            out.append(idx.flatten(1))
            f = f + self._add(self.q.lookup(idx).permute(0, 3, 1, 2))
        loss = self.commitment * F.mse_loss(z, f.detach()) + F.mse_loss(f, z.detach())
        if self.q.kind == "st":  # the straight-through codebook's own loss, per scale
            loss = loss + q_loss
        return z + (f - z).detach(), torch.cat(out, dim=1).unsqueeze(1), loss


class VQVAE(nn.Module):
    """Image tokenizer. ``encode``/``decode`` work in uint8 pixels and long codes, in batches,
    without gradients and in eval mode (the module's mode is restored afterwards)."""

    def __init__(self, spec: TokenizerSpec, image_size: tuple[int, int]) -> None:
        super().__init__()
        H, W = image_size
        ds = spec.downsample
        if H % ds or W % ds:
            raise ValueError(f"tokenizer.downsample ({ds}) must divide the image size {H}x{W}")
        self.spec = spec
        self.image_size = (H, W)
        self.grid = (H // ds, W // ds * spec.codebooks)  # a location's codebooks side by side
        self.codebook_size = spec.codebook_size
        self.encoder = Encoder(spec)
        if spec.kind == "multiscale":
            if H != W or spec.scales[-1] != H // ds:
                raise ValueError(f"tokenizer.scales: a multiscale tokenizer needs square images whose grid side "
                                 f"({H // ds}x{W // ds}) is its last scale; got scales {spec.scales}")
            self.quantizer = MultiScaleQuantizer(spec, H // ds)
            self.grid = (1, self.quantizer.L)  # the scales' codes, coarse to fine, in one row
        else:
            self.quantizer = Quantizer(spec) if spec.codebooks == 1 else GroupQuantizer(spec)
        self.decoder = Decoder(spec)

    @staticmethod
    def to_input(images: Tensor) -> Tensor:
        """uint8 [n, 3, H, W] -> float [-1, 1]."""
        return images.float().div(127.5).sub(1.0)

    def forward(self, x: Tensor, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: [n, 3, H, W] in [-1, 1] -> (reconstruction [n, 3, H, W], unclamped [0, 1] scale,
        codes [n, h, w * codebooks], vq loss)."""
        q, idx, vq_loss = self.quantizer(self.encoder(x), gen)
        return self.decoder(q), idx, vq_loss

    def codes_of(self, z: Tensor) -> Tensor:
        """The encoder's map ``z [n, C, h, w]`` -> codes ``[n, *grid-like]`` (no training updates)."""
        if isinstance(self.quantizer, MultiScaleQuantizer):
            return self.quantizer.codes_map(z)
        n, C, h, _ = z.shape
        return self.quantizer.codes(z.permute(0, 2, 3, 1).reshape(-1, C)).reshape(n, h, -1)

    def latents_of(self, codes: Tensor) -> Tensor:
        """Codes -> the decoder's input ``[n, C, h, w]``."""
        if isinstance(self.quantizer, MultiScaleQuantizer):
            return self.quantizer.latents(codes)
        return self.quantizer.lookup(codes.long()).permute(0, 3, 1, 2)

    @contextlib.contextmanager
    def _inference(self) -> Iterator[torch.device]:
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield next(self.parameters()).device
        finally:
            self.train(was)

    def encode(self, images: Tensor) -> Tensor:
        """uint8 [n, 3, H, W] -> long codes [n, h, w], on the device of ``images``."""
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[2:]) != self.image_size:
            H, W = self.image_size
            raise ValueError(f"VQVAE.encode expects uint8 [n, 3, {H}, {W}], "
                             f"got {images.dtype} {tuple(images.shape)}")
        out = []
        with self._inference() as dev:
            for chunk in images.split(ENCODE_BATCH):
                z = self.encoder(self.to_input(chunk.to(dev)))
                out.append(self.codes_of(z).reshape(chunk.shape[0], *self.grid).to(images.device))
        return torch.cat(out) if out else torch.zeros(0, *self.grid, dtype=torch.long, device=images.device)

    def decode(self, codes: Tensor) -> Tensor:
        """long codes [n, h, w] -> uint8 images [n, 3, H, W], on the device of ``codes``."""
        if codes.dim() != 3 or tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"VQVAE.decode expects codes [n, {self.grid[0]}, {self.grid[1]}], "
                             f"got {tuple(codes.shape)}")
        out = []
        with self._inference() as dev:
            for chunk in codes.split(ENCODE_BATCH):
                x = self.decoder(self.latents_of(chunk.to(dev))).clamp(0.0, 1.0)
                out.append(x.mul(255).round_().to(torch.uint8).to(codes.device))
        H, W = self.image_size
        return torch.cat(out) if out else torch.zeros(0, 3, H, W, dtype=torch.uint8, device=codes.device)


# --------------------------------------------------------------------------------------- training

def train_tokenizer(spec: TokenizerSpec, train_images: Tensor, device: torch.device | str = "cpu",
                    log: Callable[[str], None] = print, **kw: Any) -> "Trained":
    """:func:`ablate.tokenizer.stages.fit` (stages, VQGAN losses, EMA weights, checkpoints): the
    trained tokenizer with its raw weights and per-stage health. ``kw`` goes to ``fit``."""
    from ablate.tokenizer.stages import fit  # stages imports this module

    return fit(spec, train_images, device, log, **kw)


def train_vqvae(spec: TokenizerSpec, train_images: Tensor, device: torch.device | str = "cpu",
                log: Callable[[str], None] = print) -> VQVAE:
    """Train a tokenizer on uint8 images [n, 3, H, W]; deterministic given ``spec.seed`` (on a
    fixed device and thread count). Returns the model that encodes (the EMA weights with
    ``tokenizer.ema_weights``) in eval mode."""
    return train_tokenizer(spec, train_images, device, log).model


@torch.no_grad()
def evaluate_vqvae(model: VQVAE, images: Tensor) -> dict[str, float]:
    """Reconstruction and code statistics on uint8 images [n, 3, H, W] (through encode -> decode,
    i.e. exactly what the generator sees and emits)."""
    codes = model.encode(images)
    recon = model.decode(codes)
    mse = (recon.float() - images.float()).div(255.0).pow(2).mean().item()
    return {"tok_recon_mse": mse, **{f"tok_{k}": v for k, v in code_stats(codes, model.codebook_size).items()}}


# ----------------------------------------------------------------------------------------- caches

def tokenizer_key(spec: TokenizerSpec, data_key: str, image_size: tuple[int, int]) -> str:
    """Identity of a trained tokenizer: data, image size, every spec field (those added later only
    when set, so older keys stand), the LPIPS weights by content, and the code version."""
    tok = drop_later_defaults(spec, spec.model_dump(mode="json"))
    if spec.lpips_weights:
        from ablate.tokenizer.vqgan import file_digest

        tok["lpips_weights"] = file_digest(spec.lpips_weights)
    return content_hash({"data": data_key, "image_size": list(image_size),
                         "tokenizer": tok, "version": TOKENIZER_VERSION})


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so two jobs needing the same tokenizer train it once (POSIX; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent jobs may both train; atomic writes keep the cache whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_cached(file: Path, spec: TokenizerSpec, image_size: tuple[int, int], device: torch.device,
                 log: Callable[[str], None]) -> tuple[VQVAE, dict[str, float]] | None:
    """The cached tokenizer: ``state`` holds the weights that encode (EMA ones when the spec
    averages weights; ``raw_state`` then holds the raw ones, kept for inspection only)."""
    if not file.exists():
        return None
    try:
        blob = torch_load(file)
        model = VQVAE(spec, image_size)
        model.load_state_dict(blob["state"])
        metrics = {k: float(v) for k, v in blob["metrics"].items()}
    except (OSError, RuntimeError, KeyError, ValueError, EOFError) as err:  # rebuilt, not fatal
        log(f"tokenizer cache {file} unreadable ({type(err).__name__}: {err}); retraining")
        return None
    return model.to(device).eval(), metrics


def get_tokenizer(spec: TokenizerSpec, data_key: str, train_images: Tensor, val_images: Tensor,
                  cache_root: Path, device: torch.device | str = "cpu",
                  log: Callable[[str], None] = print) -> tuple[VQVAE, dict[str, float], str]:
    """The tokenizer for (``data_key``, ``spec``): loaded from
    ``<cache_root>/cache/tokenizer/<tok_key>/vqvae.pt`` or trained once and written there atomically.

    Returns (model in eval mode on ``device``, metrics, tok_key). Metrics are measured on
    ``val_images`` right after training and stored with the weights: ``tok_recon_mse`` (mean squared
    error on [0, 1] pixels), ``tok_codebook_usage`` (share of the K codes used), ``tok_perplexity``
    (exp of the entropy of code usage), ``tok_restarts`` (dead-code restarts), ``tok_train_s``
    (seconds the training took, also on a cache hit), and with several stages
    ``tok_stage<i>_{recon_mse,codebook_usage,perplexity,restarts}``. ``data_key`` must change
    whenever the images do: it is the only thing the cache knows about them.

    Training checkpoints go to ``train_state.pt`` beside the cache file, so a killed job resumes
    inside its stage. Raises :class:`~ablate.tokenizer.health.CodebookCollapse` for a collapsed tokenizer (see
    :func:`check_collapse`), also when it comes from the cache (it is kept there: the error
    repeats until a setting changes).
    """
    device = torch.device(device)
    image_size = (int(train_images.shape[2]), int(train_images.shape[3]))
    key = tokenizer_key(spec, data_key, image_size)
    file = cache_path(cache_root, "tokenizer", key, "vqvae.pt")
    hit = _load_cached(file, spec, image_size, device, log)
    if hit is None:
        with _file_lock(file.parent / ".lock"):
            hit = _load_cached(file, spec, image_size, device, log)  # another job may have finished it
            if hit is None:
                log(f"tokenizer {key}: training {spec.total_steps} steps on {train_images.shape[0]} images")
                state_file = file.parent / "train_state.pt"
                res = train_tokenizer(spec, train_images, device, log, val_images=val_images,
                                      state_file=state_file)
                model = res.model
                metrics = {**evaluate_vqvae(model, val_images), "tok_restarts": float(res.restarts),
                           **stage_metrics(res.stages), "tok_train_s": res.train_s}
                blob = {"version": TOKENIZER_VERSION, "spec": spec.model_dump_json(),
                        "image_size": list(image_size), "metrics": metrics, "stages": res.stages,
                        "state": {k: v.cpu() for k, v in model.state_dict().items()}}
                if res.raw is not None:
                    blob["raw_state"] = {k: v.cpu() for k, v in res.raw.items()}
                atomic_torch_save(blob, file)
                state_file.unlink(missing_ok=True)
                hit = (model, metrics)
                log(f"tokenizer {key}: val mse {metrics['tok_recon_mse']:.5f}, code usage "
                    f"{metrics['tok_codebook_usage']:.2f}, perplexity {metrics['tok_perplexity']:.1f}, "
                    f"{res.train_s:.1f}s")
    model, metrics = hit
    check_collapse(spec, metrics, int(val_images.shape[0]) * model.grid[0] * model.grid[1], key, log)
    return model, metrics, key


def _fingerprint(images: Tensor) -> str:
    return hashlib.blake2b(images.detach().cpu().contiguous().numpy().tobytes(), digest_size=6).hexdigest()


def tokenize_cached(vq: VQVAE, tok_key: str, split: str, images: Tensor, cache_root: Path) -> Tensor:
    """Codes of uint8 ``images`` [n, 3, H, W] -> long [n, h, w] (CPU), cached per
    (tok_key, split, n, content fingerprint) so a changed image set never reads stale codes."""
    name = f"codes_{split}_{images.shape[0]}_{_fingerprint(images)}.pt"
    file = cache_path(cache_root, "tokenizer", tok_key, name)
    if file.exists():
        return torch_load(file).long()
    codes = vq.encode(images.cpu()).cpu()
    small = torch.int16 if vq.codebook_size <= 2**15 else torch.int32
    atomic_torch_save(codes.to(small), file)
    return codes
