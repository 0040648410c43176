"""Image-caption datasets: ``shapes`` (generated), ``digits`` (scikit-learn), ``folder`` (yours).

:func:`load_dataset` turns a :class:`~ablate.config.DataSpec` into train/val/test
:class:`ImageTextSet` splits, cached as ``.npz`` under ``<cache_root>/cache/data/<image_key>/``.

Split sizes: ``shapes`` gives exactly ``n_train/n_val/n_test`` images, each split from its own
seed stream (``[data.seed, split]``). ``digits`` (1797 images) and ``folder`` have a fixed pool of
N images, shuffled by ``data.seed`` and cut as test = min(n_test, N // 5), val = min(n_val,
N // 10), train = min(n_train, the rest); a warning names any split that was capped, and a pool
too small for non-empty splits is an error.

``shapes`` holds a seeded set of attribute combinations out of train and val (``data.heldout``;
see :mod:`ablate.data.shapes`); every third test image names one. Each split carries the set as
``ImageTextSet.heldout`` so that alignment can score seen and held-out captions apart.

``shuffle_captions`` permutes the *train* captions (and their attrs) among train images; val and
test keep true captions. The images' true attributes stay in ``ImageTextSet.true_attrs`` so a
classifier trained on the shuffled split can still learn what the images show.
"""
from __future__ import annotations

import functools
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ablate.config import DataSpec, content_hash
from ablate.data import digits as _digits
from ablate.data import folder as _folder
from ablate.data import shapes as _shapes
from ablate.utils import atomic_write_bytes, cache_path

log = logging.getLogger(__name__)

__all__ = ["ImageTextSet", "DatasetSplits", "load_dataset", "parse_caption", "data_key"]

SPLITS = ("train", "val", "test")
_SPLIT_SEED = {"train": 0, "val": 1, "test": 2}
_EXTRA_SEED = {"judge": 3, "reference": 4}  # shapes: seed streams of the evaluation-only sets
_MIN_POOL = 10  # fixed pools need at least 1 val and 2 test images (FID needs two)


@dataclass
class ImageTextSet:
    """One split. ``images``: uint8 [n, 3, H, W]; ``captions``: n strings; ``attrs``: per image,
    what its caption describes (shapes: list of object dicts; digits: ``[{"digit": d}]``;
    folder: None). ``true_attrs`` and ``true_captions`` are set only where the captions were
    shuffled: they then hold what each image really shows and says (use :attr:`labels` and
    :attr:`pair_captions` to get that in every case). ``heldout``: the
    combinations the dataset keeps out of training (shapes; None elsewhere or when none is)."""

    images: torch.Tensor
    captions: list[str]
    attrs: Optional[list[list[dict]]]
    true_attrs: Optional[list[list[dict]]] = field(default=None, repr=False)
    heldout: Optional[_shapes.HeldOut] = field(default=None, repr=False)
    true_captions: Optional[list[str]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"ImageTextSet.images must be uint8 [n, 3, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if len(self.captions) != len(self.images) or (self.attrs is not None and len(self.attrs) != len(self.images)):
            raise ValueError("ImageTextSet: images, captions and attrs must have the same length")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def labels(self) -> Optional[list[list[dict]]]:
        """What each image shows (ground truth for classifiers), captions shuffled or not."""
        return self.true_attrs if self.true_attrs is not None else self.attrs

    @property
    def pair_captions(self) -> list[str]:
        """Each image's true caption (what a judge of image-text pairs learns), shuffled or not."""
        return self.true_captions if self.true_captions is not None else self.captions

    def subset(self, idx: Any) -> "ImageTextSet":
        """The images at ``idx`` (a slice, list or int array), with their captions and attrs."""
        ids = list(range(len(self)))[idx] if isinstance(idx, slice) else [int(i) for i in idx]
        pick = (lambda xs: None if xs is None else [xs[i] for i in ids])  # noqa: E731
        return ImageTextSet(self.images[ids], [self.captions[i] for i in ids], pick(self.attrs),
                            pick(self.true_attrs), self.heldout, pick(self.true_captions))


@dataclass
class DatasetSplits:
    """Train/val/test of one dataset. ``key`` hashes every DataSpec field that determines the
    splits (shuffle included); ``image_key`` leaves ``shuffle_captions`` out, so caches of things
    that depend only on images and their true labels (tokens, the judge) are shared by a run and
    its shuffled-caption control.

    Two more real sets, made on first use (never cached: shapes renders them in well under a
    second) and for evaluation only: :attr:`judge_train` and :attr:`reference`."""

    name: str
    train: ImageTextSet
    val: ImageTextSet
    test: ImageTextSet
    key: str
    image_key: str
    image_size: int
    max_objects: int
    spec: Optional[DataSpec] = field(default=None, repr=False)

    def _shapes_split(self, n: int, stream: int, heldout_every: int) -> ImageTextSet:
        spec = self.spec
        held = _shapes.heldout_combos(spec.seed, spec.heldout) if heldout_every else None
        images, captions, attrs = _shapes.generate(n, spec.image_size, spec.max_objects, [spec.seed, stream],
                                                   held, heldout_every)
        return ImageTextSet(torch.from_numpy(images), captions, attrs, heldout=self.test.heldout)

    @functools.cached_property
    def judge_train(self) -> ImageTextSet:
        """The real images (and true labels) the judge learns from. shapes: ``n_train`` images
        of *every* attribute combination, from their own seed stream: the judge must read the
        held-out combinations the generator never saw. Other datasets: ``train``."""
        if self.name != "shapes" or self.spec is None:
            return self.train
        return self._shapes_split(self.spec.n_train, _EXTRA_SEED["judge"], 0)

    @functools.cached_property
    def reference(self) -> ImageTextSet:
        """A second real sample of the *test* distribution, test's counterpart in the floors of
        the distribution metrics (FID, KID, precision/recall of real vs real). shapes: ``n_test``
        images with test's mix of held-out captions, from their own seed stream (val shows no
        held-out combination, so val vs test would measure that shift too). Other datasets:
        ``val``."""
        if self.name != "shapes" or self.spec is None:
            return self.val
        return self._shapes_split(self.spec.n_test, _EXTRA_SEED["reference"], _shapes.HELDOUT_EVERY)


def parse_caption(name: str, caption: str) -> Optional[dict]:
    """What a caption of dataset ``name`` asks for: shapes -> ``{"objects": [...], "relation"}``,
    digits -> ``{"digit": d}``; None when the caption does not parse (and always for folder)."""
    if name == "shapes":
        return _shapes.parse_caption(caption)
    if name == "digits":
        d = _digits.parse_caption(caption)
        return None if d is None else {"digit": d}
    return None


def _image_fields(spec: DataSpec) -> dict[str, Any]:
    """The DataSpec fields that determine the images and their true captions."""
    f: dict[str, Any] = {"name": spec.name, "image_size": spec.image_size, "n_train": spec.n_train,
                         "n_val": spec.n_val, "n_test": spec.n_test, "seed": spec.seed}
    if spec.name == "shapes":
        f.update(max_objects=spec.max_objects, heldout=spec.heldout, version=_shapes.GENERATOR_VERSION)
    elif spec.name == "digits":
        f.update(version=_digits.GENERATOR_VERSION)
    return f


def data_key(spec: DataSpec, folder_fingerprint: Optional[str] = None) -> tuple[str, str]:
    """``(key, image_key)`` of a DataSpec (folder datasets also hash the folder's fingerprint)."""
    f = _image_fields(spec)
    if spec.name == "folder":
        f.update(fingerprint=folder_fingerprint, version=_folder.GENERATOR_VERSION)
    image_key = content_hash(f)
    return content_hash({"image_key": image_key, "shuffle_captions": spec.shuffle_captions}), image_key


def _pool_sizes(spec: DataSpec, n: int, where: str) -> dict[str, int]:
    if n < _MIN_POOL:
        raise ValueError(f"{where}: {n} images, at least {_MIN_POOL} are needed for train/val/test splits")
    sizes = {"test": min(spec.n_test, n // 5), "val": min(spec.n_val, n // 10)}
    sizes["train"] = min(spec.n_train, n - sizes["test"] - sizes["val"])
    capped = [f"{s}={sizes[s]} (asked {getattr(spec, 'n_' + s)})" for s in SPLITS
              if sizes[s] < getattr(spec, "n_" + s)]
    if capped:
        log.warning("%s has %d images: capped %s", where, n, ", ".join(capped))
    return sizes


def _build(spec: DataSpec, entries: Optional[list[tuple[str, str]]]) -> dict[str, tuple]:
    """``{split: (images uint8 [n,3,S,S], captions, attrs | None)}`` with true captions."""
    S = spec.image_size
    if spec.name == "shapes":
        sizes = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
        held = _shapes.heldout_combos(spec.seed, spec.heldout)
        return {s: _shapes.generate(sizes[s], S, spec.max_objects, [spec.seed, _SPLIT_SEED[s]], held,
                                    _shapes.HELDOUT_EVERY if s == "test" else 0) for s in SPLITS}
    rng = np.random.default_rng([spec.seed, 7])
    if spec.name == "digits":
        images, labels = _digits.load_all(S)
        sizes = _pool_sizes(spec, len(labels), "data.name=digits (scikit-learn's 1797 images)")
        order = rng.permutation(len(labels))
        out, start = {}, 0
        for s in ("test", "val", "train"):
            ids = order[start:start + sizes[s]]
            start += sizes[s]
            out[s] = (images[ids], [_digits.caption_for(int(labels[i])) for i in ids],
                      [[{"digit": int(labels[i])}] for i in ids])
        return out
    assert entries is not None
    sizes = _pool_sizes(spec, len(entries), f"data.path {spec.path!r}")
    order = rng.permutation(len(entries))
    out, start = {}, 0
    for s in ("test", "val", "train"):
        ids = order[start:start + sizes[s]]
        start += sizes[s]
        files = [entries[i][0] for i in ids]
        out[s] = (_folder.load_images(spec.path, files, S), [entries[i][1] for i in ids], None)
    return out


def _save(path: Path, parts: dict[str, tuple]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for s, (images, captions, attrs) in parts.items():
        arrays[f"{s}_images"] = images
        arrays[f"{s}_captions"] = np.array(captions, dtype=np.str_)
        arrays[f"{s}_attrs"] = np.array(json.dumps(attrs))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _load(path: Path) -> dict[str, tuple]:
    with np.load(path, allow_pickle=False) as z:
        return {s: (z[f"{s}_images"], [str(c) for c in z[f"{s}_captions"]], json.loads(str(z[f"{s}_attrs"])))
                for s in SPLITS}


def load_dataset(spec: DataSpec, cache_root: Optional[Path] = None) -> DatasetSplits:
    """The train/val/test splits of ``spec`` (cached under ``cache_root`` when given).

    Deterministic in the DataSpec: the same spec gives the same images, captions and order.
    """
    entries = _folder.read_index(spec.path) if spec.name == "folder" else None
    fp = _folder.fingerprint(spec.path, entries) if entries is not None else None
    key, image_key = data_key(spec, fp)
    parts: Optional[dict[str, tuple]] = None
    file = cache_path(cache_root, "data", image_key, "splits.npz") if cache_root is not None else None
    if file is not None and file.exists():
        try:
            parts = _load(file)
        except (OSError, ValueError, KeyError) as err:  # an unreadable cache is rebuilt, not fatal
            log.warning("data cache %s unreadable (%s); rebuilding", file, err)
    if parts is None:
        parts = _build(spec, entries)
        if file is not None:
            _save(file, parts)
    held = _shapes.heldout_combos(spec.seed, spec.heldout) if spec.name == "shapes" else None
    held = held or None  # nothing held out: no set to carry
    sets = {s: ImageTextSet(torch.from_numpy(np.ascontiguousarray(parts[s][0])), parts[s][1], parts[s][2],
                            heldout=held) for s in SPLITS}
    if spec.shuffle_captions:
        tr = sets["train"]
        perm = np.random.default_rng([spec.seed, 99]).permutation(len(tr))
        sets["train"] = ImageTextSet(tr.images, [tr.captions[i] for i in perm],
                                     None if tr.attrs is None else [tr.attrs[i] for i in perm],
                                     true_attrs=tr.attrs, heldout=held, true_captions=tr.captions)
    return DatasetSplits(spec.name, sets["train"], sets["val"], sets["test"], key, image_key,
                         spec.image_size, spec.max_objects if spec.name == "shapes" else 1, spec)
