"""The judge: a small CNN trained on a dataset's *real* images that reads generated ones.

``shapes``: the image is resized to 36x36 (three cells of 12 px) and a conv trunk is max
pooled to the 3x3 grid; per cell, shared 1x1 heads predict colour (6 + none), shape (3 + none)
and size (2 + none). :meth:`Judge.read` lists the objects it sees. ``digits``: a 10-class CNN on
16x16 (the data is 8x8 upscaled, so nothing is lost). Its penultimate activations are the feature
space of ``fid_domain``.

Training is light on purpose: 600 steps of batch 128 take 35-45 s on one core of a busy 2-core
CPU, and the shapes judge reads every real test image right from about step 300 on. It is
augmented with blur, noise and colour gain so that the slightly soft images of a VQ decoder
are read as their real counterparts. The trained judge is cached per (data image key, judge
config): a run and its shuffled-caption control share one judge.

It learns from ``DatasetSplits.judge_train``: on shapes a set of its own that shows every
attribute combination, held-out ones included (trained on the generator's train split alone,
it read only about 60% of the one-object and 36% of the two-object held-out test images
right, so ``align_acc_heldout`` would have measured the judge), elsewhere the train split.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ablate.config import EvalSpec, content_hash
from ablate.data import DatasetSplits
from ablate.data.shapes import COLOUR_NAMES, SHAPES, SIZES
from ablate.utils import atomic_torch_save, cache_path, torch_load

JUDGE_VERSION = 1
_INPUT = {"shapes": 36, "digits": 16}
_NONE = {"colour": len(COLOUR_NAMES), "shape": len(SHAPES), "size": len(SIZES)}  # index of "none"
_CHUNK = 512  # images per forward pass at inference


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Judge(nn.Module):
    """A dataset's attribute reader. Call :meth:`features` / :meth:`read` with uint8 images
    [n, 3, H, W] of any size (they are resized to the judge's input); both run in eval mode
    without gradients and in chunks, on the judge's device."""

    def __init__(self, kind: str, width: int = 32) -> None:
        super().__init__()
        if kind not in _INPUT:
            raise ValueError(f"no judge for data.name={kind!r} (judges exist for {', '.join(_INPUT)})")
        self.kind = kind
        self.input_size = _INPUT[kind]
        w = width
        if kind == "shapes":
            # [B,3,36,36] -> unshuffle [B,12,18,18] -> conv -> pool [B,w,9,9] -> conv -> pool to grid [B,w,3,3]
            # (max, not average, pooling to the grid: it learns shape about twice as fast)
            self.trunk = nn.Sequential(nn.PixelUnshuffle(2), *_conv(12, w), nn.MaxPool2d(2),
                                       *_conv(w, w), nn.MaxPool2d(3))
            self.hidden = nn.Sequential(nn.Conv2d(w, 32, 1), nn.ReLU(inplace=True))
            self.head = nn.Conv2d(32, sum(n + 1 for n in _NONE.values()), 1)
            self.num_features = 32 * 9
        else:
            # [B,3,16,16] -> [B,w,8,8] -> [B,2w,4,4] -> [B,2w] -> hidden [B,64] -> 10 classes
            self.trunk = nn.Sequential(*_conv(3, w), nn.MaxPool2d(2), *_conv(w, 2 * w), nn.MaxPool2d(2),
                                       *_conv(2 * w, 2 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.hidden = nn.Sequential(nn.Linear(2 * w, 64), nn.ReLU(inplace=True))
            self.head = nn.Linear(64, 10)
            self.num_features = 64

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float [B, 3, s, s] normalised, at the judge's input size ``s``."""
        x = images.to(self._device(), torch.float32) / 255.0
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.input_size)
        return (x - 0.5) / 0.25

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def forward_prepared(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, logits)``: shapes [B, 288], [B, 14, 3, 3]; digits [B, 64], [B, 10]."""
        h = self.hidden(self.trunk(x))
        return h.flatten(1), self.head(h)

    @contextmanager
    def _inference(self) -> Iterator[None]:
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was)

    def _chunks(self, images: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with self._inference():
            for i in range(0, images.shape[0], _CHUNK):
                yield self.forward_prepared(self.prepare(images[i:i + _CHUNK]))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, float [n, F] (F = ``num_features``), on the judge's device."""
        return torch.cat([f for f, _ in self._chunks(images)]) if images.shape[0] else \
            torch.zeros(0, self.num_features, device=self._device())

    def grid_probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """shapes only: per-cell probabilities ``colour [n,3,3,7]``, ``shape [n,3,3,4]``,
        ``size [n,3,3,3]`` (the last class of each is "none"), on CPU."""
        if self.kind != "shapes":
            raise ValueError("grid_probs is for the shapes judge")
        outs = [logits.cpu() for _, logits in self._chunks(images)]
        logits = torch.cat(outs) if outs else torch.zeros(0, self.head.out_channels, 3, 3)
        out, start = {}, 0
        for name, n in _NONE.items():
            out[name] = logits[:, start:start + n + 1].softmax(1).permute(0, 2, 3, 1)
            start += n + 1
        return out

    def read(self, images: torch.Tensor) -> list[list[dict]]:
        """What the judge sees, per image, in the datasets' attrs format plus ``conf``:
        shapes -> objects ``{"colour","shape","size","row","col","conf"}`` in cells where
        P(no colour) < 0.5 (``conf`` = 1 - P(no colour)), most confident first;
        digits -> ``[{"digit": d, "conf": p}]``."""
        if self.kind == "digits":
            outs = [logits.softmax(1).cpu() for _, logits in self._chunks(images)]
            if not outs:
                return []
            p, d = torch.cat(outs).max(1)
            return [[{"digit": int(di), "conf": float(pi)}] for di, pi in zip(d, p)]
        pr = self.grid_probs(images)
        conf = 1.0 - pr["colour"][..., -1]  # [n, 3, 3]
        colour = pr["colour"][..., :-1].argmax(-1)
        shape = pr["shape"][..., :-1].argmax(-1)
        size = pr["size"][..., :-1].argmax(-1)
        seen: list[list[dict]] = []
        for i in range(conf.shape[0]):
            objs = [{"colour": COLOUR_NAMES[colour[i, r, c]], "shape": SHAPES[shape[i, r, c]],
                     "size": SIZES[size[i, r, c]], "row": r, "col": c, "conf": float(conf[i, r, c])}
                    for r in range(3) for c in range(3) if conf[i, r, c] > 0.5]
            seen.append(sorted(objs, key=lambda o: -o["conf"]))
        return seen


def grid_targets(labels: list[list[dict]]) -> torch.Tensor:
    """Per-cell class indices [n, 3, 3, 3] (colour, shape, size; the "none" index where empty)."""
    t = torch.tensor([_NONE["colour"], _NONE["shape"], _NONE["size"]]).repeat(len(labels), 3, 3, 1)
    for i, objs in enumerate(labels):
        for o in objs:
            t[i, o["row"], o["col"]] = torch.tensor([COLOUR_NAMES.index(o["colour"]),
                                                     SHAPES.index(o["shape"]), SIZES.index(o["size"])])
    return t


def _targets(kind: str, labels: list[list[dict]]) -> torch.Tensor:
    if kind == "shapes":
        return grid_targets(labels)  # [n, 3, 3, 3]
    return torch.tensor([objs[0]["digit"] for objs in labels])  # [n]


def _loss(judge: Judge, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if judge.kind == "digits":
        return F.cross_entropy(logits, y)
    loss, start = logits.new_zeros(()), 0
    for k, n in enumerate(_NONE.values()):
        loss = loss + F.cross_entropy(logits[:, start:start + n + 1], y[..., k])
        start += n + 1
    return loss


def _augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Label-preserving noise on normalised images [B, 3, s, s]: blur by a random amount,
    per-channel gain, Gaussian noise, and (digits only, where position is no label) a shift."""
    B = x.shape[0]
    r = lambda *shape: torch.rand(*shape, generator=gen).to(x.device)  # noqa: E731
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x + (r(B, 1, 1, 1) * (r(B, 1, 1, 1) < 0.5)) * (blur - x)
    x = x * (1.0 + 0.16 * (r(B, 3, 1, 1) - 0.5))
    x = x + torch.randn(x.shape, generator=gen).to(x.device) * (0.24 * r(B, 1, 1, 1))
    if kind == "digits":
        pad = F.pad(x, (1, 1, 1, 1), value=-2.0)  # -2 is black after normalisation
        dy, dx = (int(v) for v in torch.randint(0, 3, (2,), generator=gen))
        x = pad[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
    return x


def train_judge(splits: DatasetSplits, spec: EvalSpec, device: torch.device,
                log: Callable[[str], None] = print) -> Judge:
    """Train a judge on ``splits.judge_train``'s images and their *true* labels (never the
    shuffled captions). Deterministic on CPU for a given dataset and spec."""
    data = splits.judge_train
    labels = data.labels
    if labels is None:
        raise ValueError(f"no judge for data.name={splits.name!r}: its images have no attribute labels")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(JUDGE_VERSION)
        judge = Judge(splits.name, spec.judge_width).to(device)
    gen = torch.Generator().manual_seed(0)
    # the train set at the judge's input size, kept as uint8 to bound memory: [n, 3, s, s]
    with judge._inference():
        xs = torch.cat([(judge.prepare(data.images[i:i + _CHUNK]) * 0.25 + 0.5).mul(255).round()
                        .clamp(0, 255).to(torch.uint8) for i in range(0, len(data), _CHUNK)])
    ys = _targets(splits.name, labels).to(device)
    opt = torch.optim.AdamW(judge.parameters(), lr=spec.judge_lr, weight_decay=1e-4)
    steps, warm = spec.judge_steps, min(50, spec.judge_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warm + 1)) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    judge.train()
    t0, n = time.time(), xs.shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (min(spec.judge_batch_size, n),), generator=gen).to(device)
        x = _augment((xs[idx].float() / 255.0 - 0.5) / 0.25, splits.name, gen)
        _, logits = judge.forward_prepared(x)
        loss = _loss(judge, logits, ys[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 500 == 0 or step + 1 == steps:
            log(f"judge[{splits.name}] step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.1f}s)")
    judge.eval()
    return judge


def judge_key(splits: DatasetSplits, spec: EvalSpec) -> str:
    """Cache key of a judge: the data's image key and every setting that changes its weights."""
    return judge_cache_key(splits.image_key, splits.name, spec)


def judge_kind(data_name: str) -> Optional[str]:
    """The judge a dataset gets (None: no labels to train one on)."""
    return data_name if data_name in _INPUT else None


def judge_cache_key(image_key: str, kind: str, spec: EvalSpec) -> str:
    """:func:`judge_key` from the data's image key and kind alone (no images loaded)."""
    return content_hash({"image_key": image_key, "kind": kind, "version": JUDGE_VERSION,
                         "steps": spec.judge_steps, "batch": spec.judge_batch_size, "lr": spec.judge_lr,
                         "width": spec.judge_width})


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so that concurrent jobs train a shared judge once (no-op without fcntl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def get_judge(splits: DatasetSplits, spec: EvalSpec, cache_root: Optional[Path], device: torch.device,
              log: Callable[[str], None] = print) -> Optional[Judge]:
    """The dataset's judge, trained once and cached at ``<cache_root>/cache/judge/<key>/judge.pt``
    (``cache_root=None`` trains without caching). None for datasets without labels (folder)."""
    if splits.name not in _INPUT:
        return None
    if cache_root is None:
        return train_judge(splits, spec, device, log)
    key = judge_key(splits, spec)
    file = cache_path(cache_root, "judge", key, "judge.pt")
    with _file_lock(file.with_name(".lock")):
        if file.exists():
            blob = torch_load(file)
            with torch.random.fork_rng(devices=[]):  # building it must not move the caller's RNG
                judge = Judge(blob["kind"], int(blob["width"]))
            judge.load_state_dict(blob["state_dict"])
            return judge.to(device).eval()
        judge = train_judge(splits, spec, device, log)
        state = {k: v.detach().cpu() for k, v in judge.state_dict().items()}
        atomic_torch_save({"kind": judge.kind, "width": spec.judge_width, "state_dict": state}, file)
        log(f"judge[{splits.name}] cached at {file}")
        return judge
