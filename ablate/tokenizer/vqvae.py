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

Legend: n images, C code_dim, K codebook_size, (h, w) token grid, H x W pixels.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate.config import TokenizerSpec, content_hash, drop_later_defaults
from ablate.utils import atomic_torch_save, cache_path, torch_load

# Bump when the architecture or training recipe changes: old caches then miss instead of loading
# weights into a module that no longer matches them.
TOKENIZER_VERSION = 1
ENCODE_BATCH = 512


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): cheap refinement at a fixed resolution."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _stage_channels(hidden: int, n_down: int) -> list[int]:
    """Channels after each stride-2 stage: halved towards full resolution, where convs are dearest."""
    return [max(16, hidden >> (n_down - 1 - i)) for i in range(n_down)]


class Encoder(nn.Module):
    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__()
        n_down = int(math.log2(spec.downsample))
        layers: list[nn.Module] = []
        c_in = 3
        if n_down == 0:
            layers += [nn.Conv2d(3, spec.hidden, 3, padding=1)]
            c_in = spec.hidden
        for i, c in enumerate(_stage_channels(spec.hidden, n_down)):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Conv2d(c_in, c, 4, stride=2, padding=1))
            c_in = c
        if c_in != spec.hidden:
            layers += [nn.ReLU(), nn.Conv2d(c_in, spec.hidden, 3, padding=1)]
        layers += [ResBlock(spec.hidden) for _ in range(spec.res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(spec.hidden, spec.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x: [n, 3, H, W] in [-1, 1] -> z: [n, C, h, w]."""
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__()
        n_down = int(math.log2(spec.downsample))
        chans = _stage_channels(spec.hidden, n_down)[::-1]  # token resolution -> full resolution
        layers: list[nn.Module] = [nn.Conv2d(spec.code_dim, spec.hidden, 3, padding=1)]
        layers += [ResBlock(spec.hidden) for _ in range(spec.res_blocks)]
        c_in = spec.hidden
        for i in range(n_down):
            c_out = chans[i + 1] if i + 1 < n_down else 16
            layers += [nn.ReLU(), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
            c_in = c_out
        # 1x1 to pixels: a 3x3 conv at full resolution cost as much as the rest of the decoder
        # for no visible gain; dropping the per-pixel nonlinearity altogether doubled the MSE.
        layers += [nn.ReLU(), nn.Conv2d(c_in, 3, 1 if n_down else 3, padding=0 if n_down else 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, q: Tensor) -> Tensor:
        """q: [n, C, h, w] -> pixels [n, 3, H, W], nominally in [0, 1] (unclamped)."""
        return self.net(q)


class Quantizer(nn.Module):
    """Nearest-neighbour codebook lookup with EMA or straight-through learning and dead-code restarts."""

    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__()
        self.K, self.C = spec.codebook_size, spec.code_dim
        self.kind = spec.quantizer
        self.decay = spec.ema_decay
        self.commitment = spec.commitment
        self.restart_after = spec.restart_after if spec.dead_code_restart else 0
        self.eps = 1e-5
        embed = torch.randn(self.K, self.C) / math.sqrt(self.C)
        if self.kind == "st":
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("cluster_size", torch.zeros(self.K))
            self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("initialised", torch.tensor(False))
        # Steps since each code was last chosen; training-only bookkeeping, not part of the state.
        self._idle = torch.zeros(self.K, dtype=torch.long)
        self.restarts = 0

    def codes(self, z: Tensor) -> Tensor:
        """z: [m, C] -> nearest code index [m] (squared L2), in row chunks so that the distance
        matrix stays small for large codebooks."""
        e = self.embed
        e2 = e.pow(2).sum(1)[None]  # [1, K]
        rows = max(1, 2**22 // self.K)
        return torch.cat([(e2 - 2 * c @ e.t()).argmin(1) for c in z.split(rows)]) if z.shape[0] else \
            torch.zeros(0, dtype=torch.long, device=z.device)

    def lookup(self, idx: Tensor) -> Tensor:
        """idx: [...] long -> code vectors [..., C]."""
        return F.embedding(idx, self.embed)

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
        self.embed.copy_(self.embed_sum / smoothed[:, None])

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
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)  # [n*h*w, C]
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
        self.grid = (H // ds, W // ds)
        self.codebook_size = spec.codebook_size
        self.encoder = Encoder(spec)
        self.quantizer = Quantizer(spec)
        self.decoder = Decoder(spec)

    @staticmethod
    def to_input(images: Tensor) -> Tensor:
        """uint8 [n, 3, H, W] -> float [-1, 1]."""
        return images.float().div(127.5).sub(1.0)

    def forward(self, x: Tensor, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: [n, 3, H, W] in [-1, 1] -> (reconstruction [n, 3, H, W], unclamped [0, 1] scale,
        codes [n, h, w], vq loss)."""
        q, idx, vq_loss = self.quantizer(self.encoder(x), gen)
        return self.decoder(q), idx, vq_loss

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
                flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                out.append(self.quantizer.codes(flat).reshape(chunk.shape[0], *self.grid).to(images.device))
        return torch.cat(out) if out else torch.zeros(0, *self.grid, dtype=torch.long, device=images.device)

    def decode(self, codes: Tensor) -> Tensor:
        """long codes [n, h, w] -> uint8 images [n, 3, H, W], on the device of ``codes``."""
        if codes.dim() != 3 or tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"VQVAE.decode expects codes [n, {self.grid[0]}, {self.grid[1]}], "
                             f"got {tuple(codes.shape)}")
        out = []
        with self._inference() as dev:
            for chunk in codes.split(ENCODE_BATCH):
                q = self.quantizer.lookup(chunk.to(dev).long()).permute(0, 3, 1, 2)
                x = self.decoder(q).clamp(0.0, 1.0)
                out.append(x.mul(255).round_().to(torch.uint8).to(codes.device))
        H, W = self.image_size
        return torch.cat(out) if out else torch.zeros(0, 3, H, W, dtype=torch.uint8, device=codes.device)


# --------------------------------------------------------------------------------------- training

def _lr_at(step: int, spec: TokenizerSpec) -> float:
    """Linear warmup, then cosine decay to 5% of ``lr`` (the last steps polish the reconstructions)."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    t = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _rng_scope(device: torch.device) -> contextlib.AbstractContextManager:
    """Seed torch for weight init without disturbing the caller's global random state."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW, fused where this torch supports it: with ~20 small tensors the per-tensor update
    loop cost a tenth of every step on CPU."""
    kw = dict(lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError):  # older torch: fused only on CUDA
        return torch.optim.AdamW(model.parameters(), **kw)


def train_vqvae(spec: TokenizerSpec, train_images: Tensor, device: torch.device | str = "cpu",
                log: Callable[[str], None] = print) -> VQVAE:
    """Train a VQ-VAE on uint8 images [n, 3, H, W] for ``spec.steps`` steps; deterministic given
    ``spec.seed`` (on a fixed device and thread count). Returns the model in eval mode."""
    device = torch.device(device)
    H, W = train_images.shape[2:]
    with _rng_scope(device):
        torch.manual_seed(spec.seed)
        model = VQVAE(spec, (H, W)).to(device)
    gen = torch.Generator().manual_seed(spec.seed + 1)  # batches and code restarts
    opt = _adamw(model, spec.lr)
    data = train_images.to(device)
    n = data.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    model.train()
    every = max(1, spec.steps // 10)
    for step in range(spec.steps):
        if pos + spec.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + spec.batch_size]
        pos += spec.batch_size
        target = data[idx.to(device)].float().div(255.0)  # [b, 3, H, W] in [0, 1]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        recon, codes, vq_loss = model(target * 2 - 1, gen)
        mse = F.mse_loss(recon, target)
        loss = mse + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % every == 0 or step == 0:
            used = codes.unique().numel() / spec.codebook_size
            log(f"tokenizer step {step + 1}/{spec.steps}: mse {mse.item():.5f} "
                f"batch code usage {used:.2f} restarts {model.quantizer.restarts}")
    return model.eval()


@torch.no_grad()
def evaluate_vqvae(model: VQVAE, images: Tensor) -> dict[str, float]:
    """Reconstruction and code statistics on uint8 images [n, 3, H, W] (through encode -> decode,
    i.e. exactly what the generator sees and emits)."""
    codes = model.encode(images)
    recon = model.decode(codes)
    mse = (recon.float() - images.float()).div(255.0).pow(2).mean().item()
    hist = torch.bincount(codes.flatten().cpu(), minlength=model.codebook_size).double()
    p = hist / hist.sum()
    nz = p[p > 0]
    return {
        "tok_recon_mse": mse,
        "tok_codebook_usage": float((hist > 0).double().mean()),
        "tok_perplexity": float(torch.exp(-(nz * nz.log()).sum())),
    }


# ----------------------------------------------------------------------------------------- caches

def tokenizer_key(spec: TokenizerSpec, data_key: str, image_size: tuple[int, int]) -> str:
    """Identity of a trained tokenizer: data, image size, every spec field and the code version."""
    return content_hash({"data": data_key, "image_size": list(image_size),
                         "tokenizer": drop_later_defaults(spec, spec.model_dump(mode="json")),
                         "version": TOKENIZER_VERSION})


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
    (exp of the entropy of code usage) and ``tok_train_s`` (seconds the training took, also on a
    cache hit). ``data_key`` must change whenever the images do: it is the only thing the cache
    knows about them.
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
                log(f"tokenizer {key}: training {spec.steps} steps on {train_images.shape[0]} images")
                t0 = time.perf_counter()
                model = train_vqvae(spec, train_images, device, log)
                train_s = time.perf_counter() - t0
                metrics = {**evaluate_vqvae(model, val_images), "tok_train_s": train_s}
                atomic_torch_save({"version": TOKENIZER_VERSION, "spec": spec.model_dump_json(),
                                   "image_size": list(image_size), "metrics": metrics,
                                   "state": {k: v.cpu() for k, v in model.state_dict().items()}}, file)
                hit = (model, metrics)
                log(f"tokenizer {key}: val mse {metrics['tok_recon_mse']:.5f}, code usage "
                    f"{metrics['tok_codebook_usage']:.2f}, perplexity {metrics['tok_perplexity']:.1f}, "
                    f"{train_s:.1f}s")
    model, metrics = hit
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
