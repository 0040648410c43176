"""Training a VQ tokenizer: one fully convolutional model through a schedule of resolutions, the
VQGAN losses where switched on, EMA weights, per-stage codebook health, and a checkpoint that
records the stage so a killed job resumes inside it and ends exactly where an uninterrupted run
would.

``tokenizer.stages`` (the seed's recipe: 64 px at batch 128, 128 px at 32 x 4 accumulated, ...)
trains the same weights at each resolution in turn on the training images resized by area
averaging; without stages there is one stage at the data's resolution with ``steps`` and
``batch_size``, and the defaults reproduce the original MSE-only VQ-VAE bit for bit. One learning
rate schedule (warmup, cosine to 5%) spans all stages. Batches and code restarts draw from one
seeded generator whose state, with the data order, the optimizers, the EMA weights and the
quantizer's idle counters, is part of the checkpoint.

Per optimizer step and micro-batch: generator loss = l2 * MSE + l1 * L1 (+ perceptual * LPIPS)
+ VQ loss (+ adaptive weight * disc_weight * hinge generator loss once ``disc_start`` steps are
done); then, from ``disc_start`` on, the discriminator's hinge loss on real vs reconstructed
images: generator and discriminator both train at every step, as the seed's script did.

Legend: n images, b batch, s stage side in pixels, K codebook_size.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate.config import TokenizerSpec
from ablate.tokenizer.vqgan import PatchGAN, WeightsEMA, adaptive_weight, hinge_d_loss, load_lpips
from ablate.tokenizer.health import code_stats
from ablate.tokenizer.vqvae import TOKENIZER_VERSION, VQVAE
from ablate.utils import atomic_torch_save, torch_load

CHECKPOINT_EVERY = 250  # optimizer steps between training checkpoints (and at every stage's end)
CHECKPOINT_S = 120.0  # ... or this many seconds, whichever comes first


@dataclass(frozen=True)
class Stage:
    """One resolution of the schedule; ``start`` is the global step it begins at."""

    index: int
    image_size: tuple[int, int]
    batch_size: int
    grad_accum: int
    steps: int
    start: int

    @property
    def end(self) -> int:
        return self.start + self.steps


def schedule(spec: TokenizerSpec, image_size: tuple[int, int]) -> list[Stage]:
    """The stages of ``spec`` for training images of ``image_size`` (H, W)."""
    if not spec.stages:
        return [Stage(0, image_size, spec.batch_size, 1, spec.steps, 0)]
    if image_size[0] != image_size[1]:
        raise ValueError(f"tokenizer.stages resize to squares; the images are {image_size[0]}x{image_size[1]}")
    out, start = [], 0
    for i, st in enumerate(spec.stages):
        if st.image_size > image_size[0]:
            raise ValueError(f"tokenizer.stages[{i}].image_size ({st.image_size}) exceeds the images' "
                             f"{image_size[0]} px: stages only downsample")
        out.append(Stage(i, (st.image_size, st.image_size), st.batch_size, st.grad_accum, st.steps, start))
        start += st.steps
    return out


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 [n, 3, H, W] -> uint8 [n, 3, *size] by area averaging (exact box filter for integer
    factors); the same tensor when the size already matches."""
    if tuple(images.shape[2:]) == tuple(size):
        return images
    out = [F.interpolate(c.float(), size=size, mode="area").round_().clamp_(0, 255).to(torch.uint8)
           for c in images.split(1024)]
    return torch.cat(out) if out else images.new_zeros(0, 3, *size)


@torch.no_grad()
def reconstruct(model: VQVAE, images: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 [n, 3, s, s] at any size the model's downsample divides -> (codes [n, h, w],
    uint8 reconstructions [n, 3, s, s]); the model is fully convolutional, ``encode`` and
    ``decode`` insist on the final size."""
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        codes, recon = [], []
        for chunk in images.split(256):
            z = model.encoder(model.to_input(chunk.to(dev)))
            idx = model.codes_of(z)  # [n, h, w * codebooks], or [n, 1, L] for multiscale
            x = model.decoder(model.latents_of(idx)).clamp(0.0, 1.0)
            codes.append(idx.cpu())
            recon.append(x.mul(255).round_().to(torch.uint8).cpu())
        return torch.cat(codes), torch.cat(recon)
    finally:
        model.train(was)


def lr_at(step: int, spec: TokenizerSpec) -> float:
    """Linear warmup, then cosine decay to 5% of ``lr`` over all stages (the last steps polish)."""
    total = spec.total_steps
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    t = (step - spec.warmup_steps) / max(1, total - spec.warmup_steps)
    return spec.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _rng_scope(device: torch.device) -> contextlib.AbstractContextManager:
    """Seed torch for weight init without disturbing the caller's global random state."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _adamw(params: list[nn.Parameter], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """AdamW, fused where this torch supports it: with ~20 small tensors the per-tensor update
    loop cost a tenth of every step on CPU."""
    kw = dict(lr=lr, betas=betas, weight_decay=1e-4)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError):  # older torch: fused only on CUDA
        return torch.optim.AdamW(params, **kw)


@dataclass
class Trained:
    """What :func:`fit` returns. ``model``: the weights that encode and decode (the EMA ones with
    ``ema_weights``), eval mode; ``raw``: the raw weights' state dict when they differ (EMA on),
    else None; ``stages``: per-stage health (restarts, and on ``val_images`` resized to the
    stage: recon MSE, codebook usage, perplexity); ``train_s``: seconds over all attempts."""

    model: VQVAE
    raw: Optional[dict[str, Tensor]]
    stages: list[dict[str, float]] = field(default_factory=list)
    restarts: int = 0
    train_s: float = 0.0


class _Run:
    """The whole training state; :meth:`state` / :meth:`load` are the checkpoint."""

    def __init__(self, spec: TokenizerSpec, image_size: tuple[int, int], device: torch.device, n: int,
                 min_side: int) -> None:
        self.spec, self.device = spec, device
        with _rng_scope(device):
            torch.manual_seed(spec.seed)
            self.model = VQVAE(spec, image_size).to(device)
            self.disc = PatchGAN(spec.disc_channels, spec.disc_layers).to(device) if spec.disc_weight > 0 \
                else None
        if self.disc is not None and min_side < self.disc.min_size():
            raise ValueError(f"tokenizer.disc_layers ({spec.disc_layers}) needs images of at least "
                             f"{self.disc.min_size()} px, the smallest stage has {min_side}: lower "
                             "tokenizer.disc_layers or start at a larger tokenizer.stages image_size")
        self.lpips = load_lpips(spec.lpips_weights).to(device) if spec.lpips_weights else None
        if self.lpips is not None and min_side < 16:
            raise ValueError(f"tokenizer.lpips_weights: LPIPS needs images of at least 16 px, the "
                             f"smallest stage has {min_side}")
        self.ema = WeightsEMA(self.model, spec.ema_weights) if spec.ema_weights > 0 else None
        self.gen = torch.Generator().manual_seed(spec.seed + 1)  # batches and code restarts
        self.opt = _adamw(list(self.model.parameters()), spec.lr, (0.9, 0.99))
        self.opt_d = _adamw(list(self.disc.parameters()), spec.lr, (0.5, 0.9)) if self.disc else None
        self.perm, self.pos = torch.randperm(n, generator=self.gen), 0
        self.step = 0
        self.reports: list[dict[str, float]] = []
        self.stage_restarts = 0  # quantizer.restarts when the current stage began
        self.elapsed = 0.0

    @property
    def encoder_model(self) -> VQVAE:
        return self.ema.module if self.ema is not None else self.model

    def state(self) -> dict:
        q = self.model.quantizer
        return {"version": TOKENIZER_VERSION, "spec": self.spec.model_dump_json(), "step": self.step,
                "model": self.model.state_dict(), "idle": q._idle.clone(), "restarts": q.restarts,
                "opt": self.opt.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "disc": self.disc.state_dict() if self.disc else None,
                "opt_d": self.opt_d.state_dict() if self.opt_d else None,
                "gen": self.gen.get_state(), "perm": self.perm, "pos": self.pos, "reports": self.reports,
                "stage_restarts": self.stage_restarts, "elapsed": self.elapsed}

    def load(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.model.quantizer._idle = st["idle"].clone()
        self.model.quantizer.restarts = int(st["restarts"])
        self.opt.load_state_dict(st["opt"])
        if self.ema is not None:
            self.ema.load_state_dict(st["ema"])
        if self.disc is not None:
            self.disc.load_state_dict(st["disc"])
            self.opt_d.load_state_dict(st["opt_d"])
        self.gen.set_state(st["gen"])
        self.perm, self.pos, self.step = st["perm"], int(st["pos"]), int(st["step"])
        self.reports = [dict(r) for r in st["reports"]]
        self.stage_restarts, self.elapsed = int(st["stage_restarts"]), float(st["elapsed"])

    def batch(self, data: Tensor, size: int) -> Tensor:
        """The next ``size`` images of the shuffled order, reshuffled when it runs out."""
        n = data.shape[0]
        if self.pos + size > n:
            self.perm, self.pos = torch.randperm(n, generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + size]
        self.pos += size
        return data[idx.to(data.device)]

    def micro_step(self, images: Tensor, accum: int, disc_on: bool) -> dict[str, float]:
        """Forward and backward of one micro-batch (uint8 [b, 3, s, s]); gradients accumulate."""
        spec, model = self.spec, self.model
        target = images.float().div(255.0)  # [b, 3, s, s] in [0, 1]
        x = target * 2 - 1
        recon, codes, vq_loss = model(x, self.gen)
        mse = F.mse_loss(recon, target)
        rec = spec.l2_weight * mse
        if spec.l1_weight > 0:
            rec = rec + spec.l1_weight * (recon - target).abs().mean()
        if self.lpips is not None and spec.perceptual_weight > 0:
            rec = rec + spec.perceptual_weight * self.lpips(recon * 2 - 1, x).mean()
        loss = rec + vq_loss
        out = {"mse": mse.item(), "usage": codes.unique().numel() / spec.codebook_size}
        if disc_on:
            self.disc.requires_grad_(False)  # the generator's loss must not train the discriminator
            g_loss = -self.disc(recon * 2 - 1).mean()
            weight = adaptive_weight(rec, g_loss, model.decoder.last) * spec.disc_weight
            loss = loss + weight * g_loss
            out.update(g_weight=float(weight))
        (loss / accum if accum > 1 else loss).backward()
        if disc_on:
            self.disc.requires_grad_(True)
            d_loss = hinge_d_loss(self.disc(x), self.disc(recon.detach() * 2 - 1))
            (d_loss / accum if accum > 1 else d_loss).backward()
            out.update(d_loss=d_loss.item())
        return out

    def report(self, stage: Stage, val: Optional[Tensor]) -> dict[str, float]:
        """Codebook health at the end of ``stage``, measured with the encoding weights."""
        q = self.model.quantizer
        r = {"stage": stage.index, "image_size": stage.image_size[0], "steps": stage.steps,
             "restarts": q.restarts - self.stage_restarts}
        if val is not None and len(val):
            codes, recon = reconstruct(self.encoder_model, resize(val, stage.image_size))
            r["recon_mse"] = (recon.float() - resize(val, stage.image_size).float()).div(255.0).pow(2).mean().item()
            r.update(code_stats(codes, self.spec.codebook_size))
        return r


def fit(spec: TokenizerSpec, train_images: Tensor, device: torch.device | str = "cpu",
        log: Callable[[str], None] = print, val_images: Optional[Tensor] = None,
        state_file: Optional[Path] = None, checkpoint_every: int = CHECKPOINT_EVERY,
        checkpoint_s: float = CHECKPOINT_S, after_step: Callable[[int], None] = lambda step: None) -> Trained:
    """Train a tokenizer on uint8 images [n, 3, H, W] through ``spec``'s stages; deterministic
    given ``spec.seed`` (on a fixed device and thread count), also across a resume.

    ``state_file``: the training checkpoint, written atomically every ``checkpoint_every`` steps
    or ``checkpoint_s`` seconds and at every stage's end, and resumed from when present (a file
    from another spec is ignored). The caller deletes it once the result is stored. ``after_step``
    is called with the global step after each optimizer step and any checkpoint (tests kill the
    run there)."""
    device = torch.device(device)
    image_size = (int(train_images.shape[2]), int(train_images.shape[3]))
    stages = schedule(spec, image_size)
    run = _Run(spec, image_size, device, train_images.shape[0], min(min(s.image_size) for s in stages))
    if state_file is not None and Path(state_file).exists():
        try:
            st = torch_load(state_file)
            if st.get("spec") != spec.model_dump_json() or st.get("version") != TOKENIZER_VERSION:
                raise ValueError("written for another tokenizer spec or version")
            run.load(st)
            cur = next((s for s in stages if s.start <= run.step < s.end), stages[-1])
            log(f"tokenizer: resuming at step {run.step}/{spec.total_steps} (stage {cur.index}, "
                f"{cur.image_size[0]}x{cur.image_size[1]}, step {run.step - cur.start} of {cur.steps})")
        except (OSError, RuntimeError, KeyError, ValueError, EOFError) as err:
            log(f"tokenizer checkpoint {state_file} unusable ({type(err).__name__}: {err}); starting over")
            run = _Run(spec, image_size, device, train_images.shape[0], min(min(s.image_size) for s in stages))

    def save() -> None:  # records the stage to continue and the step inside it
        cur = next(s for s in stages if s.start <= run.step < s.end)
        atomic_torch_save({**run.state(), "stage": cur.index, "stage_step": run.step - cur.start}, state_file)

    total, every = spec.total_steps, max(1, spec.total_steps // 10)
    t0, saved_at, saved_t = time.perf_counter() - run.elapsed, run.step, time.perf_counter()
    run.model.train()
    for stage in stages:
        if run.step >= stage.end:
            continue
        data = resize(train_images, stage.image_size).to(device)
        if run.step == stage.start:
            run.stage_restarts = run.model.quantizer.restarts
        while run.step < stage.end:
            step = run.step
            for g in run.opt.param_groups + (run.opt_d.param_groups if run.opt_d else []):
                g["lr"] = lr_at(step, spec)
            disc_on = run.disc is not None and step >= spec.disc_start
            run.opt.zero_grad(set_to_none=True)
            if run.opt_d is not None:
                run.opt_d.zero_grad(set_to_none=True)
            for _ in range(stage.grad_accum):
                info = run.micro_step(run.batch(data, stage.batch_size), stage.grad_accum, disc_on)
            run.opt.step()
            if disc_on:
                run.opt_d.step()
            if run.ema is not None:
                run.ema.update(run.model)
            run.step += 1
            if run.step % every == 0 or step == 0:
                where = f" stage {stage.index} ({stage.image_size[0]} px)" if len(stages) > 1 else ""
                gan = f" d_loss {info['d_loss']:.3f} g_weight {info['g_weight']:.3g}" if disc_on else ""
                log(f"tokenizer step {run.step}/{total}{where}: mse {info['mse']:.5f} "
                    f"batch code usage {info['usage']:.2f} restarts {run.model.quantizer.restarts}{gan}")
            if run.step == stage.end:
                run.reports.append(run.report(stage, val_images))
                if len(stages) > 1:
                    r = run.reports[-1]
                    log(f"tokenizer stage {stage.index} ({stage.image_size[0]} px) done: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in r.items() if k not in ("stage", "image_size")))
            now = time.perf_counter()
            if state_file is not None and run.step < total and (
                    run.step == stage.end or run.step - saved_at >= checkpoint_every or now - saved_t >= checkpoint_s):
                run.elapsed = now - t0
                save()
                saved_at, saved_t = run.step, now
            after_step(run.step)
    model = run.encoder_model.eval().requires_grad_(True)
    raw = {k: v.detach().clone() for k, v in run.model.state_dict().items()} if run.ema is not None else None
    return Trained(model, raw, run.reports, run.model.quantizer.restarts, time.perf_counter() - t0)
