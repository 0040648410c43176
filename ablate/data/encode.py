"""Streaming datasets as preparation sees them, and the token-store encoding of their shards.

:class:`StreamedSplits` is the face of a ``webdataset`` or ``hf`` dataset that preparation and
evaluation use in place of :class:`~ablate.data.DatasetSplits`: the shard lists, a key, and small
in-memory heads of the splits (the tokenizer's training sample, the validation and test images
that evaluation compares with); the training split itself is never loaded.

:func:`encode_store` turns every shard into a token-store shard, skipping the finished ones, so
a killed task redoes only its unfinished shards. Shards are dealt round-robin to ``n_tasks``
tasks (task ``i`` takes shards ``i, i + n, ...`` of the concatenated split lists), which the
scheduler runs as a job array.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ablate.config import DataSpec, content_hash
from ablate.data import sources
from ablate.data.store import TokenStore

__all__ = ["StreamedSplits", "encode_store", "store_for", "store_root", "store_progress", "ENCODE_BATCH"]

SPLITS = ("train", "val", "test")
ENCODE_BATCH = 64
STREAM_VERSION = 1


def _fingerprint(spec: DataSpec, shard_lists: dict[str, list[sources.Shard]]) -> str:
    """Local shard files by size and modification time, remote ones by URL (a folder: its index
    and every listed file): a rewritten shard changes the key, so a cache never serves codes of
    images that are gone."""
    if spec.name == "folder":
        from ablate.data import folder

        entries = [e for s in SPLITS for _, part in shard_lists[s] for e in part]
        return folder.fingerprint(spec.path, sorted(entries))
    parts = []
    for split in SPLITS:
        for name, _ in shard_lists[split]:
            p = Path(name)
            st = p.stat() if "://" not in name and p.is_file() else None
            parts.append([split, name, st.st_size if st else None, st.st_mtime_ns if st else None])
    return content_hash(parts)


class StreamedSplits:
    """A streaming dataset's splits. Opening checks every local shard exists (ConfigError)."""

    def __init__(self, spec: DataSpec):
        self.spec, self.name = spec, spec.name
        self.shards = {s: sources.shards(spec, s) for s in SPLITS}
        fields = {k: v for k, v in spec.model_dump(mode="json").items()
                  if k not in ("urls", "val_urls", "test_urls", "path", "max_objects", "heldout", "shuffle_captions")}
        self.image_key = content_hash({**fields, "shards": _fingerprint(spec, self.shards), "version": STREAM_VERSION})
        # the store holds true captions and is shared with the shuffled-caption control, which
        # permutes the training captions when it reads them (Prepared.split)
        self.key = content_hash({"image_key": self.image_key, "shuffle_captions": spec.shuffle_captions})
        self.image_size, self.max_objects = spec.image_size, 1
        self.limits = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}

    def head(self, split: str, n: int, size: Optional[int] = None) -> Any:
        """The first ``n`` usable samples of ``split`` (fewer if the split is smaller), decoded
        in shard order: the same samples, in the same order, as the store's first ``n``.
        ``size``: images resized to ``size`` x ``size`` as they are read (antialiased), so that
        many large images fit in memory."""
        from ablate.data import ImageTextSet

        images, captions, pending = [], [], []

        def flush() -> None:
            batch = torch.from_numpy(np.stack(pending))
            if size is not None and batch.shape[-1] != size:
                batch = torch.nn.functional.interpolate(batch.float(), size=(size, size), mode="bilinear",
                                                        antialias=True, align_corners=False)
                batch = batch.round().clamp(0, 255).to(torch.uint8)
            images.append(batch)
            pending.clear()

        for shard in self.shards[split]:
            it, _ = sources.read_shard(self.spec, shard)
            for image, caption in it:
                pending.append(image)
                captions.append(caption)
                if len(pending) == 256:
                    flush()
                if len(captions) >= n:
                    break
            if len(captions) >= n:
                break
        if pending:
            flush()
        if not captions:
            raise ValueError(f"data: split {split!r} has no usable sample")
        return ImageTextSet(torch.cat(images), captions, None)

    @functools.cached_property
    def val(self) -> Any:
        return self.head("val", self.spec.n_val)

    @functools.cached_property
    def test(self) -> Any:
        return self.head("test", self.spec.n_test)

    @property
    def reference(self) -> Any:
        """The real set the test set is compared with in the floors of FID and friends."""
        return self.val

    def task_shards(self, task: int, n_tasks: int) -> list[tuple[str, int, sources.Shard]]:
        """``(split, index, shard)`` of task ``task`` of ``n_tasks``."""
        flat = [(s, i, sh) for s in SPLITS for i, sh in enumerate(self.shards[s])]
        return flat[task::n_tasks]


def store_root(results_dir: Path, data_key: str, tok_key: str) -> Path:
    """Where the token store of (data, tokenizer) lives: ``<results>/cache/store/<key>/``."""
    from ablate.utils import cache_path

    return cache_path(results_dir, "store", content_hash({"data": data_key, "tokenizer": tok_key}), "")


def store_for(results_dir: Path, data_key: str, tok_key: str, tokenizer: Any) -> TokenStore:
    """The token store of (data, tokenizer), created (its manifest written) if new."""
    return TokenStore(store_root(results_dir, data_key, tok_key), {"data": data_key, "tokenizer": tok_key, "grid": list(tokenizer.grid),
                             "codebook_size": int(tokenizer.codebook_size)})


def encode_store(splits: StreamedSplits, tokenizer: Any, tok_key: str, results_dir: Path,
                 task: int = 0, n_tasks: int = 1, say: Callable[[str], None] = print,
                 safe_point: Callable[[], None] = lambda: None) -> TokenStore:
    """Encode this task's unfinished shards into the store; return the store.

    ``tokenizer.encode(uint8 [b, 3, S, S]) -> long [b, h, w]``. ``safe_point()`` is called
    between shards (a preemption stops there; finished shards stay)."""
    store = store_for(results_dir, splits.image_key, tok_key, tokenizer)
    for split, index, shard in splits.task_shards(task, n_tasks):
        if store.done(split, index):
            continue
        safe_point()
        t0 = time.perf_counter()
        it, report = sources.read_shard(splits.spec, shard)
        codes: list[np.ndarray] = []
        captions: list[str] = []
        batch: list[np.ndarray] = []

        def flush() -> None:
            if batch:
                x = torch.from_numpy(np.stack(batch))
                codes.append(tokenizer.encode(x).flatten(1).cpu().numpy())
                batch.clear()

        for image, caption in it:
            batch.append(image)
            captions.append(caption)
            if len(batch) == ENCODE_BATCH:
                flush()
        flush()
        if not captions:
            raise ValueError(f"data shard {shard[0]!r} has no usable sample ({report['skipped']})")
        report["seconds"] = round(time.perf_counter() - t0, 3)
        store.write(split, index, np.concatenate(codes), captions, report)
        skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "none"
        say(f"encoded {split} shard {index} ({shard[0]}): kept {report['kept']} of {report['samples']} "
            f"(skipped: {skipped}) in {report['seconds']:.1f}s")
    return store


def store_progress(splits: StreamedSplits, root: Path) -> dict[str, tuple[int, int]]:
    """``{split: (finished shards, shards)}`` of the store at ``root`` (it may not exist yet)."""
    from ablate.data.store import shard_dir

    return {s: (sum((shard_dir(root, s, i) / "meta.json").is_file() for i in range(len(splits.shards[s]))),
                len(splits.shards[s])) for s in SPLITS}
