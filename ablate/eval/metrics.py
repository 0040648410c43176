"""Metrics of a set of generated images: FID, caption alignment, CLIP score, failure rates.

Every metric is computed or absent, never a placeholder:

- ``fid_domain``: Frechet distance in the judge's penultimate feature space (torchmetrics
  ``FrechetInceptionDistance`` with the judge as its feature module), generated vs the real test
  images. Needs a judge (shapes, digits).
- ``fid``: the standard Inception FID, only when ``eval.inception_weights`` names a local weights
  file (torchmetrics + torch-fidelity; nothing is downloaded).
- ``clip_score``: torchmetrics ``CLIPScore``, only when ``eval.clip_model`` is a local directory
  with a transformers CLIP model and processor (loaded with ``local_files_only``).
- ``align_*``: does the judge see what the caption asks for (see :func:`alignment`).
- ``blank_rate``: share of images whose spatial pixel standard deviation (:func:`pixel_std`,
  on [0, 1]) is below ``eval.blank_threshold``; a flat image of any colour has 0, the least busy
  real shapes image (one small object at 32x32) about 0.033.
- ``fragment_rate``: share of non-blank images that are scattered patches rather than objects:
  the *foreground* (pixels whose colour differs from the per-channel median of the image's
  border ring by more than 0.15 in some channel) splits into more than
  ``eval.fragment_components`` 8-connected components of at least ``min_area`` pixels (3 at
  32x32, scaled with the area). A real image
  has at most two objects (shapes) or one stroke (digits); an undertrained generator scatters
  many small patches that a blank test misses. Meant for plain-background data; compare with
  ``fragment_rate_real`` from :func:`judge_report`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ablate.config import EvalSpec
from ablate.data import DatasetSplits, ImageTextSet, parse_caption
from ablate.data.shapes import relation_holds
from ablate.eval.judge import Judge, grid_targets

FOREGROUND_DELTA = 0.15  # colour distance from the background that counts as foreground
_CHUNK = 256
_ATTRS = ("colour", "shape", "size")


def _check_images(images: torch.Tensor, where: str) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{where}: images must be uint8 [n, 3, H, W], got {images.dtype} {tuple(images.shape)}")


def pixel_std(images: torch.Tensor) -> torch.Tensor:
    """Per-image spatial standard deviation on the [0, 1] scale, float [n]: the root of the
    channels' mean pixel variance (a flat image of any colour has 0)."""
    return (images.flatten(2).float() / 255.0).var(2).mean(1).sqrt()


def blank_mask(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool [n]: near-constant images (``pixel_std < threshold``)."""
    return pixel_std(images) < threshold


def count_components(images: torch.Tensor, min_area: Optional[int] = None) -> np.ndarray:
    """int [n]: 8-connected foreground components of at least ``min_area`` pixels per image
    (foreground as defined in the module docstring)."""
    from scipy import ndimage

    n, _, H, W = images.shape
    if min_area is None:
        min_area = max(2, round(3 * H * W / 1024))
    x = images.float() / 255.0
    # The border ring is background in every real image (objects and strokes sit inside), while
    # the median of all pixels is not where a digit fills most of its box.
    ring = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)  # [n, 3, P]
    bg = ring.median(dim=-1).values[:, :, None, None]  # [n, 3, 1, 1]
    fg = ((x - bg).abs().amax(1) > FOREGROUND_DELTA).numpy()  # [n, H, W]
    eight = np.ones((3, 3), dtype=bool)
    counts = np.zeros(n, dtype=np.int64)
    for i in range(n):
        labels, k = ndimage.label(fg[i], structure=eight)
        if k:
            areas = np.bincount(labels.ravel(), minlength=k + 1)[1:]
            counts[i] = int((areas >= min_area).sum())
    return counts


def fragment_mask(images: torch.Tensor, spec: EvalSpec) -> torch.Tensor:
    """bool [n]: non-blank images with more than ``spec.fragment_components`` components."""
    many = torch.from_numpy(count_components(images) > spec.fragment_components)
    return many & ~blank_mask(images, spec.blank_threshold)


def _targets(name: str, captions: list[str], attrs: Optional[list]) -> list[dict]:
    """Parsed captions, checked against ``attrs`` when given (a mismatch is a data bug)."""
    out = []
    for i, cap in enumerate(captions):
        t = parse_caption(name, cap)
        if t is None:
            raise ValueError(f"caption {cap!r} is not a {name} caption; alignment needs the dataset's own captions")
        if attrs is not None:
            if name == "digits":
                same = attrs[i][0]["digit"] == t["digit"]
            else:
                keys = ("colour", "shape", "size", "row", "col") if len(t["objects"]) == 1 else _ATTRS
                same = [{k: o[k] for k in keys} for o in attrs[i]] == t["objects"]
            if not same:
                raise ValueError(f"caption {cap!r} disagrees with its attrs {attrs[i]}")
        out.append(t)
    return out


def alignment(name: str, seen: list[list[dict]], captions: list[str],
              attrs: Optional[list] = None) -> dict[str, float]:
    """Caption alignment of images the judge read as ``seen`` (``Judge.read`` output).

    digits: ``align_acc`` = the judge's class is the caption's digit.
    shapes, one-object caption: the judge's most confident object is compared with the caption;
    ``align_colour/shape/size/position`` score each attribute (over one-object captions only) and
    ``align_acc`` needs all four (no object seen = all wrong; extra objects are not penalised).
    shapes, two-object caption: correct when two distinct seen objects match the two named
    objects in colour, shape and size and their cells satisfy the relation; ``align_acc`` covers
    all captions, ``align_acc_two`` only two-object ones.
    """
    if len(seen) != len(captions) or not captions:
        raise ValueError(f"alignment: {len(seen)} read images for {len(captions)} captions (need as many, >= 1)")
    targets = _targets(name, captions, attrs)
    if name == "digits":
        ok = [bool(s) and s[0]["digit"] == t["digit"] for s, t in zip(seen, targets)]
        return {"align_acc": float(np.mean(ok))}
    per: dict[str, list[bool]] = {"colour": [], "shape": [], "size": [], "position": []}
    all_ok: list[bool] = []
    two_ok: list[bool] = []
    for s, t in zip(seen, targets):
        objs = t["objects"]
        if len(objs) == 1:
            want, top = objs[0], (s[0] if s else None)
            hits = {k: top is not None and top[k] == want[k] for k in _ATTRS}
            hits["position"] = top is not None and (top["row"], top["col"]) == (want["row"], want["col"])
            for k, v in hits.items():
                per[k].append(v)
            all_ok.append(all(hits.values()))
        else:
            match = lambda o, w: all(o[k] == w[k] for k in _ATTRS)  # noqa: E731
            ok = any(match(a, objs[0]) and match(b, objs[1])
                     and relation_holds(t["relation"], (a["row"], a["col"]), (b["row"], b["col"]))
                     for a in s for b in s if a is not b)
            two_ok.append(ok)
            all_ok.append(ok)
    out = {"align_acc": float(np.mean(all_ok))}
    if per["colour"]:
        out.update({f"align_{k}": float(np.mean(v)) for k, v in per.items()})
    if two_ok:
        out["align_acc_two"] = float(np.mean(two_ok))
    return out


class JudgeFeatures(nn.Module):
    """The judge as a torchmetrics FID feature extractor: uint8 [B, 3, H, W] -> float [B, F].
    ``num_features`` spares torchmetrics its probe forward pass."""

    def __init__(self, judge: Judge) -> None:
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(images)


def _fid(metric, fake: torch.Tensor, real: torch.Tensor, device: torch.device) -> float:
    for imgs, is_real in ((real, True), (fake, False)):
        for i in range(0, imgs.shape[0], _CHUNK):
            metric.update(imgs[i:i + _CHUNK].to(device), real=is_real)
    return float(metric.compute())


def fid_domain(judge: Judge, fake: torch.Tensor, real: torch.Tensor, device: torch.device) -> float:
    """FID in the judge's feature space between two uint8 image sets (>= 2 images each)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=JudgeFeatures(judge), normalize=False).to(device)
    return _fid(metric, fake, real, device)


def check_eval_spec(spec: EvalSpec) -> None:
    """Fail early (one line naming the field) when an optional metric is asked for but cannot run."""
    if spec.inception_weights is not None:
        if not Path(spec.inception_weights).is_file():
            raise FileNotFoundError(f"eval.inception_weights: no file at {spec.inception_weights!r} "
                                    "(a local FID Inception weights .pth; nothing is downloaded)")
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise ImportError("eval.inception_weights needs torch-fidelity and torchvision "
                              "(pip install torch-fidelity torchvision), or leave it unset") from None
    if spec.clip_model is not None and not (Path(spec.clip_model) / "config.json").is_file():
        raise FileNotFoundError(f"eval.clip_model: {spec.clip_model!r} is not a local transformers CLIP "
                                "directory (with config.json and the processor files)")


def inception_fid(weights: str, fake: torch.Tensor, real: torch.Tensor, device: torch.device) -> float:
    """Standard FID (Inception pool3, 2048-d) with weights from a local file."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, normalize=False,
                                      feature_extractor_weights_path=str(weights)).to(device)
    return _fid(metric, fake, real, device)


class _ClipEmbeddings(nn.Module):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors: since
    transformers 5 they return a model output (embeddings in ``pooler_output``), which
    torchmetrics 1.9's CLIPScore cannot normalise."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_score(model_dir: str, images: torch.Tensor, captions: list[str], device: torch.device) -> float:
    """Mean torchmetrics CLIPScore (100 * cosine, floored at 0) of images and their captions,
    with a CLIP model and processor loaded from a local directory only."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
        return _ClipEmbeddings(model), CLIPProcessor.from_pretrained(model_dir, local_files_only=True)

    metric = CLIPScore(model_name_or_path=load).to(device)
    with torch.no_grad():
        for i in range(0, images.shape[0], _CHUNK):
            metric.update(list(images[i:i + _CHUNK].to(device)), captions[i:i + _CHUNK])
    return float(metric.compute())


def evaluate_images(images: torch.Tensor, captions: list[str], attrs: Optional[list], real: ImageTextSet,
                    judge: Optional[Judge], spec: EvalSpec, device: torch.device) -> dict[str, float]:
    """Score generated ``images`` (uint8 [n, 3, H, W]) made for ``captions`` against ``real``
    (held-out real test images). ``attrs`` (the captions' ground truth, or None) is checked
    against the parsed captions. Returns only the metrics that could be computed."""
    _check_images(images, "evaluate_images")
    if len(captions) != images.shape[0] or not captions:
        raise ValueError(f"evaluate_images: {images.shape[0]} images and {len(captions)} captions "
                         "(need as many, at least one)")
    check_eval_spec(spec)
    out: dict[str, float] = {
        "blank_rate": float(blank_mask(images, spec.blank_threshold).float().mean()),
        "fragment_rate": float(fragment_mask(images, spec).float().mean()),
    }
    if judge is not None:
        out.update(alignment(judge.kind, judge.read(images), captions, attrs))
    enough = images.shape[0] >= 2 and len(real) >= 2  # a covariance needs two samples
    if judge is not None and spec.fid_domain and enough:
        out["fid_domain"] = fid_domain(judge, images, real.images, device)
    if spec.inception_weights is not None and enough:
        out["fid"] = inception_fid(spec.inception_weights, images, real.images, device)
    if spec.clip_model is not None:
        out["clip_score"] = clip_score(spec.clip_model, images, captions, device)
    return out


def judge_report(splits: DatasetSplits, judge: Optional[Judge], spec: EvalSpec,
                 device: torch.device) -> dict[str, float]:
    """Reference values on *real* test images, the ceiling and floor a reader compares with:
    ``judge_acc`` (shapes: every cell's colour/shape/size-or-empty right; digits: class right),
    ``align_acc_real`` (alignment of real test images with their true captions), ``fid_domain_real``
    (real val vs real test: the FID of two real samples of these sizes), ``blank_rate_real`` and
    ``fragment_rate_real``."""
    test = splits.test
    out = {"blank_rate_real": float(blank_mask(test.images, spec.blank_threshold).float().mean()),
           "fragment_rate_real": float(fragment_mask(test.images, spec).float().mean())}
    if judge is None:
        return out
    labels = test.labels
    if judge.kind == "shapes":
        pr = judge.grid_probs(test.images)
        pred = torch.stack([pr[k].argmax(-1) for k in _ATTRS], -1)  # [n, 3, 3, 3]
        out["judge_acc"] = float((pred == grid_targets(labels)).flatten(1).all(1).float().mean())
    else:
        seen = judge.read(test.images)
        out["judge_acc"] = float(np.mean([s[0]["digit"] == t[0]["digit"] for s, t in zip(seen, labels)]))
    out["align_acc_real"] = alignment(judge.kind, judge.read(test.images), test.captions, test.attrs)["align_acc"]
    if spec.fid_domain and len(splits.val) >= 2 and len(test) >= 2:
        out["fid_domain_real"] = fid_domain(judge, splits.val.images, test.images, device)
    return out
