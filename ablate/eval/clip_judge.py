"""The domain CLIP judge: a small contrastive image-text model trained on a dataset's real pairs.

It scores alignment on any data with captions, labelled or not, the way CLIP score does on
natural images: ``clip_domain`` is 100 x the mean cosine between a generated image's embedding
and its caption's (not floored at 0, unlike CLIP score: the chance level of a small model sits
near 0 and may be negative, and a floor would hide it). Its image tower's penultimate features
are the feature space of ``fid_domain`` / ``kid_domain`` on data without an attribute judge.

- Image tower: pixel-unshuffle, three conv blocks pooled to a 4x4 map (position is part of what
  captions say: "in the top left"), a hidden layer (the features, 256-d), a projection.
- Text tower: the ``learned`` text encoder's tokenisation (its words and vocabulary rules) and
  module, two pre-norm layers over word embeddings, masked mean pool, a projection.
- InfoNCE in both directions with a learned temperature (equal captions in a batch, common on
  shapes, are handled by the loss as it is: see :func:`clip_loss`).
- It learns from the true captions only (never the shuffled ones of a control), with the
  attribute judge's label-preserving augmentation (blur, noise, gain) so that the soft images
  of a VQ decoder are embedded like their real counterparts. On shapes it learns from
  ``judge_train`` (every attribute combination, held-out ones included) like the attribute
  judge; elsewhere from the train split.

Cached per (data image key, settings) like the attribute judge: a run and its control share it.
Legend: n images, F features, E embedding width, T words.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ablate.config import ConfigError, EvalSpec, TextSpec, content_hash
from ablate.eval.judge import _augment, _conv, _file_lock
from ablate.eval.standard import derangement
from ablate.text.encoders import PAD, LearnedTextEncoder, build_vocab
from ablate.utils import atomic_torch_save, atomic_write_bytes, cache_path, torch_load

CLIP_VERSION = 1
MIN_PAIRS = 300  # fewer real pairs than this cannot train a contrastive judge worth reading
NUM_FEATURES = 256
EMBED = 128
TEXT_WIDTH = 96
MAX_WORDS = 32
VOCAB = 8192
_CHUNK = 512


def input_size(image_size: int) -> int:
    """The judge's square input: the data's size clamped to 16..64 and rounded to a multiple of 8
    (digits' 8 px are upscaled; 256 px web images are read at 64 px)."""
    return int(min(64, max(16, 8 * round(image_size / 8))))


class DomainClip(nn.Module):
    """Image and caption embeddings in one space. :meth:`features`, :meth:`image_embed`,
    :meth:`text_embed` and :meth:`cosine` take uint8 images [n, 3, H, W] of any size and
    caption strings; they run in eval mode without gradients, in chunks, on the model's device."""

    def __init__(self, words: list[str], size: int, width: int = 32) -> None:
        super().__init__()
        self.input_size = size
        self.width = width
        self.num_features = NUM_FEATURES
        w = width
        # [n,3,s,s] -> unshuffle [n,12,s/2,s/2] -> conv, pool -> conv, pool -> conv -> pool to 4x4
        self.trunk = nn.Sequential(nn.PixelUnshuffle(2), *_conv(12, w), nn.MaxPool2d(2), *_conv(w, 2 * w),
                                   nn.MaxPool2d(2), *_conv(2 * w, 2 * w), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(2 * w * 16, NUM_FEATURES), nn.ReLU(inplace=True))
        self.image_proj = nn.Linear(NUM_FEATURES, EMBED)
        self.text = LearnedTextEncoder(TextSpec(width=TEXT_WIDTH, layers=2, heads=4, max_len=MAX_WORDS,
                                                vocab_size=VOCAB), words)
        self.text_proj = nn.Linear(TEXT_WIDTH, EMBED)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def _device(self) -> torch.device:
        return self.image_proj.weight.device

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, H, W] -> float [n, 3, s, s], normalised, at the judge's input size."""
        x = images.to(self._device(), torch.float32) / 255.0
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.input_size)
        return (x - 0.5) / 0.25

    def image_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared images [n, 3, s, s] -> (features [n, F], unit embeddings [n, E])."""
        h = self.hidden(self.trunk(x))
        return h, F.normalize(self.image_proj(h), dim=-1)

    def text_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Word ids [n, T] (PAD-padded) -> unit embeddings [n, E]."""
        mask = ids != PAD
        states = self.text(ids, mask)  # [n, T, Dt], zero at padding
        pooled = states.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def ids(self, captions: list[str]) -> torch.Tensor:
        """Word ids [n, T] of ``captions``, T = the longest caption's words (<= MAX_WORDS): padding
        beyond it costs time and changes nothing (mean pool over real words, masked attention)."""
        ids = self.text.featurize(captions)[0]
        longest = int((ids != PAD).sum(1).max()) if len(ids) else 1
        return ids[:, :max(1, longest)].to(self._device())

    def _no_grad_eval(self):  # noqa: ANN202
        return _Inference(self)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate image features, float [n, F]: the feature space of the domain FID/KID."""
        with self._no_grad_eval():
            outs = [self.image_forward(self.prepare(images[i:i + _CHUNK]))[0] for i in range(0, len(images), _CHUNK)]
        return torch.cat(outs) if outs else torch.zeros(0, NUM_FEATURES, device=self._device())

    def image_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings, float [n, E]."""
        with self._no_grad_eval():
            outs = [self.image_forward(self.prepare(images[i:i + _CHUNK]))[1] for i in range(0, len(images), _CHUNK)]
        return torch.cat(outs) if outs else torch.zeros(0, EMBED, device=self._device())

    def text_embed(self, captions: list[str]) -> torch.Tensor:
        """Unit caption embeddings, float [n, E]."""
        with self._no_grad_eval():
            outs = [self.text_forward(self.ids(captions[i:i + _CHUNK])) for i in range(0, len(captions), _CHUNK)]
        return torch.cat(outs) if outs else torch.zeros(0, EMBED, device=self._device())

    def cosine(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Cosine of each image with its own caption, float [n] on CPU."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"cosine: {images.shape[0]} images and {len(captions)} captions")
        return (self.image_embed(images) * self.text_embed(captions)).sum(-1).cpu()


class _Inference:
    """Eval mode and no gradients for the duration, the previous mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was = model, model.training
        self.grad = torch.no_grad()

    def __enter__(self) -> None:
        self.model.eval()
        self.grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        self.model.train(self.was)


def clip_loss(model: DomainClip, img: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of prepared images [B, 3, s, s] and their captions' word ids [B, T].

    Equal captions need no special care: the text tower is deterministic, so their embeddings
    are equal, their logit columns tie, and the loss and its gradients equal those of a target
    spread evenly over the copies (the loss only cannot fall below log(copies))."""
    _, zi = model.image_forward(img)
    zt = model.text_forward(ids)
    logits = model.logit_scale.clamp(max=math.log(100.0)).exp() * zi @ zt.T  # [B, B]
    target = torch.arange(len(ids), device=ids.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def training_pairs(splits: Any, spec: EvalSpec, size: int) -> tuple[torch.Tensor, list[str]]:
    """(uint8 images [n, 3, size, size], their true captions) the judge learns from: shapes'
    ``judge_train``, the train split of other in-memory data, the first ``eval.clip_images``
    of a streamed train split."""
    if hasattr(splits, "judge_train"):
        data = splits.judge_train
        images, captions = data.images, data.pair_captions
        out = [_resize_uint8(images[i:i + _CHUNK], size) for i in range(0, len(images), _CHUNK)]
        return torch.cat(out), list(captions)
    data = splits.head("train", min(splits.spec.n_train, spec.clip_images), size=size)
    return data.images, list(data.captions)  # the store holds true captions; a control permutes later


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=images.shape[-1] > size)
    return x.round().clamp(0, 255).to(torch.uint8)


class TooFewPairs(ConfigError):
    """The data has fewer real pairs than a contrastive judge needs (``MIN_PAIRS``)."""


def train_clip_judge(splits: Any, spec: EvalSpec, device: torch.device,
                     log: Callable[[str], None] = print) -> DomainClip:
    """Train the domain CLIP judge on the real pairs of ``splits``. Deterministic on CPU for a
    given dataset and spec. Raises :class:`TooFewPairs` below ``MIN_PAIRS`` pairs."""
    size = input_size(_image_size(splits))
    images, captions = training_pairs(splits, spec, size)
    if len(captions) < MIN_PAIRS:
        raise TooFewPairs(f"eval.clip_judge: data.name={splits.name!r} gives {len(captions)} training pairs, "
                          f"the domain CLIP judge needs at least {MIN_PAIRS} (raise data.n_train, or set "
                          "eval.clip_judge: false)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CLIP_VERSION)
        model = DomainClip(build_vocab(captions, VOCAB), size, spec.clip_width).to(device)
    ids = model.ids(captions)  # [n, T]
    gen = torch.Generator().manual_seed(0)
    decay = [p for n_, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n_, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=spec.clip_lr)
    steps, warm = spec.clip_steps, min(50, spec.clip_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warm + 1)) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    kind = "digits" if splits.name == "digits" else "any"  # digits alone may shift (position is no label)
    n, batch = len(captions), min(spec.clip_batch_size, len(captions))
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = _augment((images[idx].to(device).float() / 255.0 - 0.5) / 0.25, kind, gen)
        loss = clip_loss(model, x, ids[idx.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            log(f"clip judge[{splits.name}] step {step + 1}/{steps} loss {loss.item():.4f} "
                f"({time.time() - t0:.1f}s)")
    return model.eval()


def clip_judge_enabled(spec: EvalSpec, n_pairs: Optional[int]) -> bool:
    """Whether a run gets the domain CLIP judge: ``eval.clip_judge`` true (always; too few pairs
    is then an error), false (never), null (where ``n_pairs``, the train split's size or an
    upper bound of it, is at least ``MIN_PAIRS``)."""
    if spec.clip_judge is not None:
        return spec.clip_judge
    return n_pairs is None or n_pairs >= MIN_PAIRS


def clip_cache_key(image_key: str, spec: EvalSpec, image_size: int, n_train: int) -> str:
    """Cache key of a CLIP judge: the data's image key and every setting that changes its weights."""
    return content_hash({"image_key": image_key, "version": CLIP_VERSION, "steps": spec.clip_steps,
                         "batch": spec.clip_batch_size, "lr": spec.clip_lr, "width": spec.clip_width,
                         "size": input_size(image_size), "pairs": n_train, "images": spec.clip_images})


def get_clip_judge(splits: Any, spec: EvalSpec, cache_root: Optional[Path], device: torch.device,
                   log: Callable[[str], None] = print) -> Optional[DomainClip]:
    """The dataset's CLIP judge, trained once and cached at
    ``<cache_root>/cache/clipjudge/<key>/clip.pt`` (``cache_root=None``: trained, not cached).
    None where the data has too few pairs and ``eval.clip_judge`` is null (auto; the finding is
    cached too); :class:`TooFewPairs` there when it is true."""
    if cache_root is None:
        return _train_or_skip(splits, spec, device, log)
    key = clip_cache_key(splits.image_key, spec, _image_size(splits), splits.spec.n_train)
    file = cache_path(cache_root, "clipjudge", key, "clip.pt")
    too_few = file.with_name("too-few-pairs.txt")
    with _file_lock(file.with_name(".lock")):
        if file.exists():
            blob = torch_load(file)
            with torch.random.fork_rng(devices=[]):  # building it must not move the caller's RNG
                model = DomainClip(list(blob["words"]), int(blob["size"]), int(blob["width"]))
            model.load_state_dict(blob["state_dict"])
            return model.to(device).eval()
        if too_few.exists() and spec.clip_judge is None:
            return None
        model = _train_or_skip(splits, spec, device, log)
        if model is None:
            atomic_write_bytes(too_few, b"fewer real pairs than the domain CLIP judge needs\n")
            return None
        state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
        atomic_torch_save({"words": list(model.text.words), "size": model.input_size, "width": model.width,
                           "state_dict": state}, file)
        log(f"clip judge[{splits.name}] cached at {file}")
        return model


def _train_or_skip(splits: Any, spec: EvalSpec, device: torch.device,
                   log: Callable[[str], None]) -> Optional[DomainClip]:
    try:
        return train_clip_judge(splits, spec, device, log)
    except TooFewPairs as exc:
        if spec.clip_judge:
            raise
        log(f"clip judge[{splits.name}] skipped: {exc}")
        return None


def _image_size(splits: Any) -> int:
    return splits.image_size if hasattr(splits, "image_size") else splits.spec.image_size


def clip_metrics(model: DomainClip, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """``clip_domain``: 100 x mean cosine of each image with its caption, and its standard error
    ``clip_domain_se`` over the images."""
    cos = model.cosine(images, captions).double() * 100.0
    se = float(cos.std(unbiased=True) / math.sqrt(len(cos))) if len(cos) > 1 else float("nan")
    out = {"clip_domain": float(cos.mean())}
    if len(cos) > 1:
        out["clip_domain_se"] = se
    return out


def clip_references(model: DomainClip, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """The ceiling and the chance level of ``clip_domain`` on real pairs (uint8 [n, 3, H, W] and
    their true captions, n >= 2): ``clip_domain_real`` (each image with its own caption) and
    ``clip_domain_shuffled`` (each image with another image's caption, a fixed derangement)."""
    real = clip_metrics(model, images, captions)["clip_domain"]
    perm = derangement(len(captions))
    chance = clip_metrics(model, images, [captions[i] for i in perm])["clip_domain"]
    return {"clip_domain_real": real, "clip_domain_shuffled": chance}
