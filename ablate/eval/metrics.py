"""Metrics of a set of generated images: FID, caption alignment, CLIP score, failure rates.

Every metric is computed or absent, never a placeholder:

- ``fid_domain``: Frechet distance in a judge's penultimate feature space (torchmetrics
  ``FrechetInceptionDistance`` with the judge as its feature module), the n generated images vs
  the first n real test images (the images of their captions). The attribute judge's features
  where the data has one (shapes, digits), else the domain CLIP judge's (any captioned data).
- ``clip_domain`` (with ``clip_domain_se``): 100 x the mean cosine between each generated image
  and its caption under the domain CLIP judge (:mod:`ablate.eval.clip_judge`); its ceiling
  ``clip_domain_real`` and chance level ``clip_domain_shuffled`` (real test pairs, and real
  images with other images' captions) come from :func:`judge_report`.
- ``kid_domain`` / ``kid_domain_std``: torchmetrics ``KernelInceptionDistance`` on the same
  features, unbiased at small n, with its spread over random subsets (:func:`kid_domain`).
- ``precision_domain`` / ``recall_domain``: improved precision and recall (k-NN manifolds,
  k=3) on the same features: quality vs coverage, so mode collapse shows as low recall.
- The four depend on n (FID is biased upwards at small n): compare them with their floors from
  :func:`judge_report` (``fid_domain_real`` ...: two real samples at the same n) and across runs
  of the same n only.
- ``fid``: the standard Inception FID, only when ``eval.inception_weights`` names a local weights
  file (torchmetrics + torch-fidelity; nothing is downloaded).
- ``clip_score``: torchmetrics ``CLIPScore``, only when ``eval.clip_model`` is a local directory
  with a transformers CLIP model and processor (loaded with ``local_files_only``).
- ``align_*``: does the judge see exactly what the caption asks for (see :func:`alignment`);
  ``align_acc`` over captions of seen attribute combinations, ``align_acc_heldout`` over those
  naming a combination held out of training (shapes), GenEval-style task scores with two objects.
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

from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from ablate.config import EvalSpec
from ablate.data import DatasetSplits, ImageTextSet, parse_caption
from ablate.data.shapes import HeldOut, relation_holds
from ablate.eval.clip_judge import DomainClip, clip_metrics, clip_references
from ablate.eval.judge import Judge, grid_targets
from ablate.eval.standard import LOCAL, _feed, check_eval_spec, clip_score, inception_fid, standard_floors
from ablate.utils import expand_path

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


def _pair(seen: list[dict], want: list[dict], keys: tuple[str, ...], relation: Optional[str] = None) -> bool:
    """Two distinct seen objects match the two named ones on ``keys`` (and stand in ``relation``)."""
    return any(all(a[k] == want[0][k] for k in keys) and all(b[k] == want[1][k] for k in keys)
               and (relation is None or relation_holds(relation, (a["row"], a["col"]), (b["row"], b["col"])))
               for a in seen for b in seen if a is not b)


def alignment(name: str, seen: list[list[dict]], captions: list[str], attrs: Optional[list] = None,
              heldout: Optional[HeldOut] = None) -> dict[str, float]:
    """Caption alignment of images the judge read as ``seen`` (``Judge.read`` output).

    digits: ``align_acc`` = the judge's class is the caption's digit.

    shapes: an image is right (``align_acc``) only when the judge sees *exactly* what the caption
    names, extra objects included: a one-object caption needs exactly one object seen, matching
    it in colour, shape, size and position; a two-object caption needs exactly two objects
    seen, matching the two named ones in colour, shape and size, with the relation holding
    between their cells. With ``heldout`` (the combinations kept out of training,
    ``ImageTextSet.heldout``), captions naming a held-out combination are scored apart, as
    ``align_acc_heldout``; every other score covers only captions of seen combinations (all
    captions when ``heldout`` is None). Scores are present only when some caption counts in them.

    - ``align_colour/shape/size/position`` (one-object captions): the judge's *most confident*
      object has the named attribute (extra objects are not counted here: ``align_acc`` does).
    - Two-object captions, the GenEval tasks: ``align_two_objects`` (two distinct seen objects
      have the named shapes; others may be there too), ``align_colour_binding`` (... with the
      named colours: each colour on the right shape), ``align_relation`` (... fully matching,
      size included, and in the named relation), ``align_counting`` (exactly two objects seen,
      none extra), and ``align_acc_two`` = counting and relation (``align_acc`` on these captions).
    """
    if len(seen) != len(captions) or not captions:
        raise ValueError(f"alignment: {len(seen)} read images for {len(captions)} captions (need as many, >= 1)")
    targets = _targets(name, captions, attrs)
    if name == "digits":
        ok = [bool(s) and s[0]["digit"] == t["digit"] for s, t in zip(seen, targets)]
        return {"align_acc": float(np.mean(ok))}
    hits: dict[str, list[bool]] = {k: [] for k in (
        "acc", "acc_heldout", "colour", "shape", "size", "position",
        "acc_two", "two_objects", "colour_binding", "relation", "counting")}
    for s, t in zip(seen, targets):
        objs = t["objects"]
        if len(objs) == 1:
            want, top = objs[0], (s[0] if s else None)
            one = {k: top is not None and top[k] == want[k] for k in _ATTRS}
            one["position"] = top is not None and (top["row"], top["col"]) == (want["row"], want["col"])
            right = len(s) == 1 and all(one.values())
        else:
            one = {"two_objects": _pair(s, objs, ("shape",)),
                   "colour_binding": _pair(s, objs, ("colour", "shape")),
                   "relation": _pair(s, objs, _ATTRS, t["relation"]),
                   "counting": len(s) == 2}
            right = one["acc_two"] = one["counting"] and one["relation"]
        if heldout is not None and heldout.names_heldout(t):
            hits["acc_heldout"].append(right)
            continue
        hits["acc"].append(right)
        for k, v in one.items():
            hits[k].append(v)
    return {f"align_{k}": float(np.mean(v)) for k, v in hits.items() if v}


class JudgeFeatures(nn.Module):
    """A judge (attribute or domain CLIP: anything with ``features(images)`` and
    ``num_features``) as a torchmetrics feature extractor: uint8 [B, 3, H, W] -> float [B, F]
    (``dtype``: float32, or float64 where a metric sums many kernel values in its own dtype).
    ``num_features`` spares torchmetrics its probe forward pass."""

    def __init__(self, judge: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features
        self.out_dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(images).to(self.out_dtype)


def fid_domain(judge: Any, fake: torch.Tensor, real: torch.Tensor, device: torch.device) -> float:
    """FID in the judge's feature space between two uint8 image sets (>= 2 images each)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=JudgeFeatures(judge), normalize=False, **LOCAL).to(device)
    return float(_feed(metric, fake, real, device))


def kid_subset_size(n_fake: int, n_real: int) -> int:
    """Images per side in each KID subset: half the smaller set (at least 2, at most 1000), so
    that the 100 subsets differ and their spread means something."""
    return min(n_fake, n_real, 1000, max(2, min(n_fake, n_real) // 2))


def kid_domain(judge: Any, fake: torch.Tensor, real: torch.Tensor, device: torch.device,
               subsets: int = 100) -> tuple[float, float]:
    """``(mean, std)`` of torchmetrics ``KernelInceptionDistance`` (cubic polynomial kernel MMD,
    unbiased at any n) in the judge's feature space, over ``subsets`` random subsets of
    :func:`kid_subset_size` images per side (>= 2 images each). The std is the spread over
    subsets of half the images: about sqrt(2) times the standard error of the mean or more, a
    conservative error bar. Subsets are drawn from a fixed seed, without moving the caller's RNG."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=JudgeFeatures(judge, torch.float64), subsets=subsets,
                                         subset_size=kid_subset_size(len(fake), len(real)),
                                         normalize=False, **LOCAL).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, std = _feed(metric, fake, real, device)
    return float(mean), float(std)


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """float [n]: each point's distance to its k-th nearest other point of ``x`` [n, F]."""
    return torch.cat([torch.cdist(x[i:i + _CHUNK], x, compute_mode="donot_use_mm_for_euclid_dist")
                      .kthvalue(k + 1, dim=1).values for i in range(0, x.shape[0], _CHUNK)])


def _inside(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """bool [n]: each ``query`` point lies in some ball around a ``ref`` point of its radius."""
    return torch.cat([(torch.cdist(query[i:i + _CHUNK], ref, compute_mode="donot_use_mm_for_euclid_dist")
                       <= radii[None]).any(1) for i in range(0, query.shape[0], _CHUNK)])


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of feature sets ``fake`` [n, F]
    and ``real`` [m, F] (n, m >= 2). A set's manifold is the union of balls around its points,
    each of radius the distance to its k-th nearest neighbour in the set (k capped at size - 1).
    precision: share of fake points inside the real manifold (quality); recall: share of real
    points inside the fake manifold (coverage). A mode-collapsed fake set keeps its precision
    and loses its recall. Both depend on n: compare values at the same n only."""
    if fake.shape[0] < 2 or real.shape[0] < 2:
        raise ValueError(f"precision_recall: need >= 2 points per set, got {fake.shape[0]} and {real.shape[0]}")
    fake, real = fake.double(), real.double()
    r_real = _knn_radii(real, min(k, real.shape[0] - 1))
    r_fake = _knn_radii(fake, min(k, fake.shape[0] - 1))
    return float(_inside(fake, real, r_real).double().mean()), float(_inside(real, fake, r_fake).double().mean())


def domain_metrics(judge: Any, fake: torch.Tensor, real: torch.Tensor, device: torch.device,
                   k: int = 3) -> dict[str, float]:
    """The distribution metrics in the judge's feature space, two uint8 image sets (>= 2 each):
    ``fid_domain``, ``kid_domain`` with ``kid_domain_std``, ``precision_domain`` and
    ``recall_domain`` (k-NN, ``k``). All of them depend on the set sizes: compare values
    computed at the same sizes (the floors of :func:`judge_report` are)."""
    kid, kid_std = kid_domain(judge, fake, real, device)
    precision, recall = precision_recall(judge.features(fake), judge.features(real), k)
    return {"fid_domain": fid_domain(judge, fake, real, device), "kid_domain": kid, "kid_domain_std": kid_std,
            "precision_domain": precision, "recall_domain": recall}


def evaluate_images(images: torch.Tensor, captions: list[str], attrs: Optional[list], real: ImageTextSet,
                    judge: Optional[Judge], spec: EvalSpec, device: torch.device,
                    clip: Optional[DomainClip] = None) -> dict[str, float]:
    """Score generated ``images`` (uint8 [n, 3, H, W]) made for ``captions`` against ``real``
    (held-out real test images). ``attrs`` (the captions' ground truth, or None) is checked
    against the parsed captions; ``real.heldout`` splits alignment into seen and held-out.
    ``judge``: the attribute judge (alignment, domain features); ``clip``: the domain CLIP judge
    (``clip_domain``, and the domain features where there is no attribute judge).

    The distribution metrics (``fid_domain``, ``kid_domain``, ``precision_domain``,
    ``recall_domain``, ``fid``) compare the n images with the *first n* real images, the images
    of the captions when they are ``real.captions[:n]`` (as the caller's are): the same n as the
    floors of :func:`judge_report`, since all of them depend on n. Returns only the metrics
    that could be computed."""
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
        out.update(alignment(judge.kind, judge.read(images), captions, attrs, real.heldout))
    if clip is not None:
        out.update(clip_metrics(clip, images, captions))
    ref = real.images[:images.shape[0]]
    enough = images.shape[0] >= 2 and len(ref) >= 2  # a covariance needs two samples
    features = judge if judge is not None else clip
    if features is not None and spec.fid_domain and enough:
        out.update(domain_metrics(features, images, ref, device))
    if spec.inception_weights is not None and enough:
        out["fid"] = inception_fid(expand_path(spec.inception_weights, "eval.inception_weights"),
                                   images, ref, device)
    if spec.clip_model is not None:
        out["clip_score"] = clip_score(expand_path(spec.clip_model, "eval.clip_model"), images, captions, device)
    return out


def judge_report(splits: DatasetSplits, judge: Optional[Judge], spec: EvalSpec,
                 device: torch.device, clip: Optional[DomainClip] = None) -> dict[str, float]:
    """Reference values on *real* images, the ceilings and floors a reader compares with:
    ``judge_acc`` (shapes: every cell's colour/shape/size-or-empty right; digits: class right),
    ``align_acc_real`` and ``align_acc_heldout_real`` (alignment of real test images with their
    true captions, seen and held-out), ``blank_rate_real``, ``fragment_rate_real``; with the
    domain CLIP judge ``clip_domain_real`` (ceiling) and ``clip_domain_shuffled`` (chance) on
    the first n test pairs; and the floors of the distribution metrics, two real samples of the
    test distribution at the generated set's size (``splits.reference`` standing for the
    generated set; it is val except on shapes): ``fid_real`` (with Inception weights; and with a
    CLIP model ``clip_score_real`` / ``clip_score_shuffled``, see
    :func:`~ablate.eval.standard.standard_floors`), ``fid_domain_real``, ``kid_domain_real``
    (``kid_domain_std_real``), ``precision_domain_real``, ``recall_domain_real`` on the first
    ``n_domain_real`` images of each, n = min(eval.n_images, test size), fewer where the
    reference is smaller (then the floors are of that smaller n)."""
    test = splits.test
    out = {"blank_rate_real": float(blank_mask(test.images, spec.blank_threshold).float().mean()),
           "fragment_rate_real": float(fragment_mask(test.images, spec).float().mean())}
    if judge is not None:
        out.update(_attribute_references(judge, test))
    ref = splits.reference
    n = min(spec.n_images, len(test), len(ref))  # the generated set's size, or ref's if smaller
    if clip is not None and n >= 2:
        out.update(clip_references(clip, test.images[:n], test.captions[:n]))
    features = judge if judge is not None else clip
    if features is not None and spec.fid_domain and n >= 2:
        floors = domain_metrics(features, ref.images[:n], test.images[:n], device)
        out.update({f"{k}_real": v for k, v in floors.items()})
        out["n_domain_real"] = float(n)
    out.update(standard_floors(ref.images, test.images, test.captions, n, spec, device))
    return out


def _attribute_references(judge: Judge, test: ImageTextSet) -> dict[str, float]:
    """``judge_acc`` and the alignment of real test images with their true captions."""
    labels, out = test.labels, {}
    if judge.kind == "shapes":
        pr = judge.grid_probs(test.images)
        pred = torch.stack([pr[k].argmax(-1) for k in _ATTRS], -1)  # [n, 3, 3, 3]
        out["judge_acc"] = float((pred == grid_targets(labels)).flatten(1).all(1).float().mean())
    else:
        seen = judge.read(test.images)
        out["judge_acc"] = float(np.mean([s[0]["digit"] == t[0]["digit"] for s, t in zip(seen, labels)]))
    align = alignment(judge.kind, judge.read(test.images), test.captions, test.attrs, test.heldout)
    out.update({f"{k}_real": align[k] for k in ("align_acc", "align_acc_heldout") if k in align})
    return out
