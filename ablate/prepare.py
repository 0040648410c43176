"""Shared preparation of a cell: dataset, VQ tokenizer and token cache, the dataset's judge.

Every piece is trained once and cached on disk under a key made from exactly the settings that
decide it; :func:`cache_keys` computes those keys from a spec without loading anything, and
:func:`prep_key` (which cells share one preparation job) is made from them: one source of truth.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import RunSpec, canonical_json, content_hash


@functools.lru_cache(maxsize=256)
def _cache_keys(spec_json: str) -> tuple[tuple[str, Optional[str]], ...]:
    from . import data as _data
    from .data import folder as _folder
    from .eval.judge import judge_cache_key, judge_kind
    from .tokenizer import tokenizer_key

    spec = RunSpec.model_validate_json(spec_json)
    d = spec.data
    fp = None
    if d.name == "folder":
        fp = _folder.fingerprint(d.path, _folder.read_index(d.path))
    _, image_key = _data.data_key(d, fp)
    kind = judge_kind(d.name)
    return (("tokenizer", tokenizer_key(spec.tokenizer, image_key, (d.image_size, d.image_size))),
            ("judge", judge_cache_key(image_key, kind, spec.eval) if kind else None))


def cache_keys(spec: RunSpec) -> dict[str, Optional[str]]:
    """``{"tokenizer": key, "judge": key or None}``: the cache keys :func:`prepare` will use
    (the same functions make them), computed from the spec alone."""
    return dict(_cache_keys(canonical_json(spec.model_dump(mode="json"))))


def prep_key(spec: RunSpec) -> str:
    """Cells whose tokenizer and judge caches are the same share one preparation job."""
    return content_hash({**cache_keys(spec), "device": spec.train.device})


@dataclass
class Prepared:
    """What every cell on the same data and tokenizer shares (all of it cached on disk)."""

    splits: Any  # DatasetSplits (captions possibly shuffled for the control)
    vq: Any  # VQVAE
    tok_key: str
    codes: dict[str, torch.Tensor]  # split -> [n, L] long
    judge: Any  # Judge | None
    metrics: dict[str, float]  # tokenizer and judge quality


PREP_PARTS = ("tokenizer", "judge")


def prepare(spec: RunSpec, results_dir: Path, device: torch.device, say: Callable[[str], None] = print,
            parts: tuple[str, ...] = PREP_PARTS, safe_point: Callable[[], None] = lambda: None) -> Prepared:
    """Dataset -> VQ tokenizer -> token cache, and the dataset's judge; trained once, then cached.

    ``parts`` limits the work to some of the pieces (the scheduler builds them as parallel jobs).
    ``safe_point()`` is called between phases (every cache is written atomically): it may raise
    to stop there, e.g. on a preemption signal; the phases done stay cached.
    """
    from .data import load_dataset
    from .eval import get_judge, judge_report
    from .tokenizer import get_tokenizer, tokenize_cached

    splits = load_dataset(spec.data, results_dir)
    vq, tok_key, codes, judge, metrics = None, "", {}, None, {}
    if "tokenizer" in parts:
        # keyed by the images alone: the shuffled-caption control shares the tokenizer
        vq, tok_metrics, tok_key = get_tokenizer(spec.tokenizer, splits.image_key, splits.train.images,
                                                 splits.val.images, results_dir, device, log=say)
        codes = {name: tokenize_cached(vq, tok_key, name, getattr(splits, name).images, results_dir).flatten(1)
                 for name in ("train", "val", "test")}
        metrics.update(tok_metrics)
        safe_point()
    if "judge" in parts:
        # the judge learns what the images show (``labels``), never the (maybe shuffled) captions
        judge = get_judge(splits, spec.eval, results_dir, device, log=say)
        if judge is not None and "tokenizer" in parts:
            safe_point()
            metrics.update(judge_report(splits, judge, spec.eval, device))
            safe_point()
            metrics.update(tokenizer_ceiling(spec, splits, vq, codes["test"], judge, device))
    return Prepared(splits, vq, tok_key, codes, judge, metrics)


def tokenizer_ceiling(spec: RunSpec, splits: Any, vq: Any, test_codes: torch.Tensor, judge: Any,
                      device: torch.device) -> dict[str, float]:
    """The judge's scores on the tokenizer's reconstructions of real test images: the best a
    generator over these tokens can reach (``tok_align_acc``, ``tok_fid_domain``, ...)."""
    from .eval import evaluate_images

    n = min(spec.eval.n_images, len(splits.test))
    recon = vq.decode(test_codes[:n].view(n, *vq.grid))
    attrs = splits.test.attrs[:n] if splits.test.attrs is not None else None
    scores = evaluate_images(recon, splits.test.captions[:n], attrs, splits.test, judge, spec.eval, device)
    return {f"tok_{k}": v for k, v in scores.items() if k.startswith(("align_acc", "fid_domain"))}


