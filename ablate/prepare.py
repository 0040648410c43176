"""Shared preparation of a cell: dataset, VQ tokenizer and token cache, the dataset's judges
(the attribute judge of labelled data, the domain CLIP judge of captioned data).

Every piece is trained once and cached on disk under a key made from exactly the settings that
decide it; :func:`cache_keys` computes those keys from a spec without loading anything, and
:func:`prep_key` (which cells share one preparation job) is made from them: one source of truth.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import RunSpec, canonical_json, content_hash


def open_splits(d: Any, cache_root: Optional[Path]) -> Any:
    """The dataset of DataSpec ``d``: :class:`~ablate.data.DatasetSplits` (in memory) or, for
    ``webdataset``/``hf``, :class:`~ablate.data.encode.StreamedSplits` (shards checked, nothing
    loaded)."""
    from .data import load_dataset
    from .data.encode import StreamedSplits
    from .data.sources import STREAMING

    return StreamedSplits(d) if d.name in STREAMING else load_dataset(d, cache_root)


def _tokenizer_key(spec: RunSpec, image_key: str) -> str:
    from .tokenizer import tokenizer_key
    from .tokenizer.pretrained import pretrained_key

    size = (spec.data.image_size, spec.data.image_size)
    if spec.tokenizer.kind == "diffusers":  # frozen: the same for every dataset
        return content_hash({"pretrained": pretrained_key(spec.tokenizer.path), "image_size": list(size)})
    return tokenizer_key(spec.tokenizer, image_key, size)


@functools.lru_cache(maxsize=256)
def _cache_keys(spec_json: str) -> tuple[tuple[str, Optional[str]], ...]:
    from . import data as _data
    from .data.encode import StreamedSplits
    from .data.sources import STREAMING
    from .eval.clip_judge import clip_cache_key, clip_judge_enabled
    from .eval.judge import judge_cache_key, judge_kind

    spec = RunSpec.model_validate_json(spec_json)
    d = spec.data
    if d.name in STREAMING:
        image_key = StreamedSplits(d).image_key
    else:
        _, image_key = _data.data_key(d)
    kind = judge_kind(d.name)
    clip = None
    if clip_judge_enabled(spec.eval, None if d.name in STREAMING else d.n_train):
        clip = clip_cache_key(image_key, spec.eval, d.image_size, d.n_train)
    return (("tokenizer", _tokenizer_key(spec, image_key)),
            ("judge", judge_cache_key(image_key, kind, spec.eval) if kind else None),
            ("clip", clip))


def cache_keys(spec: RunSpec) -> dict[str, Optional[str]]:
    """``{"tokenizer": key, "judge": key or None, "clip": key or None}``: the cache keys :func:`prepare` will use
    (the same functions make them), computed from the spec alone."""
    return dict(_cache_keys(canonical_json(spec.model_dump(mode="json"))))


def prep_key(spec: RunSpec) -> str:
    """Cells whose tokenizer and judges' caches are the same share one preparation job."""
    return content_hash({**cache_keys(spec), "device": spec.train.device})


@dataclass
class Prepared:
    """What every cell on the same data and tokenizer shares (all of it cached on disk)."""

    splits: Any  # DatasetSplits (captions possibly shuffled for the control)
    vq: Any  # VQVAE
    tok_key: str
    store: Any  # TokenStore with the train/val/test codes and captions | None (judge-only part)
    judge: Any  # Judge | None
    metrics: dict[str, float]  # tokenizer and judge quality
    limits: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> samples used (streaming)
    clip: Any = None  # DomainClip | None

    def split(self, name: str) -> Any:
        """The store's reader of split ``name`` (the first ``data.n_<split>`` samples when
        streaming; training captions permuted for the shuffled-caption control of streamed data,
        whose store holds the true ones)."""
        reader = self.store.split(name, limit=self.limits.get(name))
        spec = getattr(self.splits, "spec", None)
        if name == "train" and self.limits and spec is not None and spec.shuffle_captions:
            reader = reader.shuffled_captions(spec.seed)
        return reader


PREP_PARTS = ("tokenizer", "judge")  # parallel jobs ("judge": both judges); a cell's own preparation adds "store"
CELL_PARTS = (*PREP_PARTS, "store")


def prepare(spec: RunSpec, results_dir: Path, device: torch.device, say: Callable[[str], None] = print,
            parts: tuple[str, ...] = CELL_PARTS, safe_point: Callable[[], None] = lambda: None) -> Prepared:
    """Dataset -> VQ tokenizer -> token cache, and the dataset's judges; trained once, then cached.

    ``parts`` limits the work to some of the pieces (the scheduler builds them as parallel jobs).
    ``safe_point()`` is called between phases (every cache is written atomically): it may raise
    to stop there, e.g. on a preemption signal; the phases done stay cached.
    """
    from .eval import get_judge, judge_report
    from .eval.clip_judge import get_clip_judge

    splits = open_splits(spec.data, results_dir)
    streamed = not hasattr(splits, "train")
    vq, tok_key, store, judge, clip, metrics = None, "", None, None, None, {}
    if "tokenizer" in parts or "store" in parts:
        # keyed by the images alone: the shuffled-caption control shares the tokenizer
        vq, tok_metrics, tok_key = load_tokenizer(spec, splits, results_dir, device, say)
        metrics.update(tok_metrics)
        safe_point()
        if not streamed:
            store = _memory_store(splits, vq, tok_key, results_dir)
        elif "store" in parts:  # the shards no preparation task has finished yet
            from .data.encode import encode_store

            store = encode_store(splits, vq, tok_key, results_dir, say=say, safe_point=safe_point)
    if "judge" in parts:
        # the judge learns what the images show (``labels``), never the (maybe shuffled) captions
        judge = get_judge(splits, spec.eval, results_dir, device, log=say)
        safe_point()
        if cache_keys(spec)["clip"] is not None:  # the true pairs, never a control's shuffled ones
            clip = get_clip_judge(splits, spec.eval, results_dir, device, log=say)
        if (judge is not None or clip is not None) and store is not None:
            safe_point()
            metrics.update(judge_report(splits, judge, spec.eval, device, clip))
            safe_point()
            metrics.update(tokenizer_ceiling(spec, splits, vq, store, judge, device, clip))
    limits = splits.limits if streamed else {}
    return Prepared(splits, vq, tok_key, store, judge, metrics, limits, clip)


def load_tokenizer(spec: RunSpec, splits: Any, results_dir: Path, device: torch.device,
                   say: Callable[[str], None] = print) -> tuple[Any, dict[str, float], str]:
    """(tokenizer, its ``tok_*`` metrics, its cache key): the pretrained one at
    ``tokenizer.path`` (frozen; its reconstruction still measured on validation images), or the
    VQ-VAE trained once on the training images (streaming data: the first
    ``min(n_train, tokenizer.images_drawn)`` of them, as many as its training can see)."""
    from .tokenizer import evaluate_vqvae, get_tokenizer
    from .tokenizer.pretrained import load_pretrained

    t = spec.tokenizer
    if t.kind == "diffusers":
        vq = load_pretrained(t.path, spec.data.image_size, device)
        return vq, evaluate_vqvae(vq, splits.val.images), _tokenizer_key(spec, splits.image_key)
    if hasattr(splits, "train"):
        train = splits.train.images
    else:
        train = splits.head("train", min(spec.data.n_train, t.images_drawn)).images
    return get_tokenizer(t, splits.image_key, train, splits.val.images, results_dir, device, log=say)


def _memory_store(splits: Any, vq: Any, tok_key: str, results_dir: Path) -> Any:
    """The token store of an in-memory dataset (shapes, digits, folder): one shard per split,
    holding the codes and the captions training sees (shuffled ones for the control)."""
    from .data.store import TokenStore
    from .tokenizer import tokenize_cached
    from .utils import cache_path

    root = cache_path(results_dir, "store", content_hash({"data": splits.key, "tokenizer": tok_key}), "")
    store = TokenStore(root, {"data": splits.key, "tokenizer": tok_key, "grid": list(vq.grid),
                              "codebook_size": vq.codebook_size})
    for name in ("train", "val", "test"):
        if not store.done(name, 0):
            part = getattr(splits, name)
            codes = tokenize_cached(vq, tok_key, name, part.images, results_dir).flatten(1)
            store.write(name, 0, codes.numpy(), part.captions, {"source": f"{splits.name}:{name}",
                                                                 "samples": len(part), "skipped": 0})
    return store


def tokenizer_ceiling(spec: RunSpec, splits: Any, vq: Any, store: Any, judge: Any,
                      device: torch.device, clip: Any = None) -> dict[str, float]:
    """The judges' scores on the tokenizer's reconstructions of real test images: the best a
    generator over these tokens can reach (``tok_align_acc``, ``tok_fid_domain``,
    ``tok_clip_domain``, ...)."""
    from .eval import evaluate_images

    n = min(spec.eval.n_images, len(splits.test))
    recon = vq.decode(store.split("test").codes(torch.arange(n)).view(n, *vq.grid))
    attrs = splits.test.attrs[:n] if splits.test.attrs is not None else None
    scores = evaluate_images(recon, splits.test.captions[:n], attrs, splits.test, judge, spec.eval, device, clip)
    return {f"tok_{k}": v for k, v in scores.items() if k.startswith(("align_acc", "fid_domain", "clip_domain"))
            and not k.endswith("_se")}


