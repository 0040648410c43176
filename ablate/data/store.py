"""The token store: every split's VQ codes and captions as memory-mapped shards on disk.

Training reads batches from here, never from images, so a job's memory is bounded by the batch
and not by the dataset: the built-in datasets are a store of one shard per split, a webdataset
corpus one store shard per tar shard (see :mod:`ablate.data.encode`). Layout::

    <root>/manifest.json                   what the store holds (data and tokenizer keys, grid, K)
    <root>/<split>/shard-00000/codes.npy    codes, uint16 (K <= 65536) or int32, [n, L]
    <root>/<split>/shard-00000/captions.bin utf-8 captions back to back
    <root>/<split>/shard-00000/offsets.npy  int64 [n + 1]: caption i is bytes offsets[i]:offsets[i+1]
    <root>/<split>/shard-00000/meta.json    n, source, the per-shard report (samples seen, skipped)

A shard directory is written under a temporary name and renamed into place when complete, so a
shard is either whole or absent: a killed writer leaves nothing that a reader or a resumed
preparation would take for done. A finished shard is never rewritten.

Legend: n samples of a shard, L image tokens per sample, K codebook size.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ablate.config import ConfigError

__all__ = ["STORE_VERSION", "TokenStore", "SplitReader", "code_dtype", "write_shard", "shard_dir"]

STORE_VERSION = 1
_MANIFEST = "manifest.json"


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest integer type that holds codes ``0 .. K-1``."""
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def shard_dir(root: Path, split: str, index: int) -> Path:
    return Path(root) / split / f"shard-{index:05d}"


def write_shard(root: Path, split: str, index: int, codes: np.ndarray, captions: Sequence[str],
                codebook_size: int, report: Optional[dict[str, Any]] = None) -> Path:
    """Write one finished shard atomically: codes ``[n, L]`` and their ``n`` captions.

    Returns the shard's directory. If the shard already exists (another task finished it) the
    existing one is kept and nothing is written: a finished shard is never redone.
    """
    final = shard_dir(root, split, index)
    if (final / "meta.json").is_file():
        return final
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != len(captions):
        raise ValueError(f"write_shard: codes [n, L] and n captions expected, got {codes.shape} "
                         f"and {len(captions)} captions")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"write_shard: codes outside 0..{codebook_size - 1}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        np.save(tmp / "codes.npy", codes.astype(code_dtype(codebook_size), copy=False))
        blobs = [c.encode("utf-8") for c in captions]
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
        (tmp / "captions.bin").write_bytes(b"".join(blobs))
        np.save(tmp / "offsets.npy", offsets)
        meta = {"n": int(codes.shape[0]), "tokens": int(codes.shape[1]), "report": report or {}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        for f in tmp.iterdir():  # contents on disk before the rename makes the shard visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, final)
        except OSError:  # another task renamed its copy first: theirs is the shard
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass
class _Shard:
    codes: np.ndarray  # memmap [n, L]
    offsets: np.ndarray  # memmap [n + 1]
    blob: np.ndarray  # memmap uint8 (empty array when every caption is empty)
    meta: dict[str, Any]


def _open_shard(folder: Path) -> _Shard:
    meta = json.loads((folder / "meta.json").read_text())
    codes = np.load(folder / "codes.npy", mmap_mode="r", allow_pickle=False)
    offsets = np.load(folder / "offsets.npy", mmap_mode="r", allow_pickle=False)
    size = (folder / "captions.bin").stat().st_size
    blob = np.memmap(folder / "captions.bin", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    return _Shard(codes, offsets, blob, meta)


class SplitReader:
    """The samples of one split, in shard order, optionally only the first ``limit`` of them.

    ``codes(idx)`` and ``captions(idx)`` gather any set of global sample indices; only the
    rows asked for are read from disk (memory maps), so reading costs O(batch)."""

    def __init__(self, root: Path, split: str, limit: Optional[int] = None):
        folder = Path(root) / split
        shards = sorted(p for p in folder.glob("shard-*") if (p / "meta.json").is_file()) \
            if folder.is_dir() else []
        if not shards:
            raise FileNotFoundError(f"token store {root}: no finished shard of split {split!r}; "
                                    "run `ablate prepare` (or `ablate run`) first")
        self.split = split
        self.shards = [_open_shard(p) for p in shards]
        sizes = np.array([s.meta["n"] for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        total = int(self.starts[-1])
        self.n = total if limit is None else min(total, int(limit))
        self.tokens = int(self.shards[0].codes.shape[1])
        self.caption_perm: Optional[np.ndarray] = None  # set by shuffled_captions()

    def shuffled_captions(self, seed: int) -> "SplitReader":
        """This split with its captions permuted among its samples (seeded, the same permutation
        ``load_dataset`` uses for ``data.shuffle_captions``): the control in which text carries
        no information about the image. Codes are untouched."""
        out = copy.copy(self)
        out.caption_perm = np.random.default_rng([seed, 99]).permutation(self.n)
        return out

    def __len__(self) -> int:
        return self.n

    def _locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"split {self.split!r}: index out of range 0..{self.n - 1}")
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        return shard, idx - self.starts[shard]

    def codes(self, idx: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """Codes of samples ``idx`` (global indices) -> long ``[b, L]`` on the CPU."""
        idx = np.asarray(torch.as_tensor(idx).cpu(), dtype=np.int64).reshape(-1)
        shard, local = self._locate(idx)
        out = np.empty((idx.size, self.tokens), dtype=np.int64)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.shards[s].codes[local[sel]]  # reads only these rows
        return torch.from_numpy(out)

    def captions(self, idx: torch.Tensor | np.ndarray | Sequence[int]) -> list[str]:
        """Captions of samples ``idx`` (global indices)."""
        idx = np.asarray(torch.as_tensor(idx).cpu(), dtype=np.int64).reshape(-1)
        if self.caption_perm is not None:
            self._locate(idx)  # range check on the indices asked for
            idx = self.caption_perm[idx]
        shard, local = self._locate(idx)
        out = []
        for s, i in zip(shard.tolist(), local.tolist()):
            sh = self.shards[s]
            out.append(bytes(sh.blob[int(sh.offsets[i]):int(sh.offsets[i + 1])]).decode("utf-8"))
        return out

    def iter_captions(self, chunk: int = 4096) -> Iterator[str]:
        """Every caption of the split in order, read ``chunk`` at a time (bounded memory)."""
        for start in range(0, self.n, chunk):
            yield from self.captions(np.arange(start, min(self.n, start + chunk)))

    def reports(self) -> list[dict[str, Any]]:
        """The per-shard preparation reports (source, samples seen, skipped and why)."""
        return [s.meta.get("report", {}) for s in self.shards]


class TokenStore:
    """A store directory and what it holds. ``info``: ``{"data": key, "tokenizer": key,
    "grid": [h, w], "codebook_size": K, ...}``; opening a store written by another tokenizer
    (or for other data) is an error, never a silent mix."""

    def __init__(self, root: Path, info: dict[str, Any]):
        self.root = Path(root)
        self.info = {**info, "version": STORE_VERSION}
        manifest = self.root / _MANIFEST
        if manifest.is_file():
            have = json.loads(manifest.read_text())
            for field in ("data", "tokenizer", "grid", "codebook_size", "version"):
                if have.get(field) != self.info.get(field):
                    raise ConfigError(
                        f"token store {self.root}: written for {field}={have.get(field)!r}, this run "
                        f"needs {self.info.get(field)!r}; remove the folder or point the cache elsewhere")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = manifest.with_name(f".{_MANIFEST}.{os.getpid()}")
            tmp.write_text(json.dumps(self.info, indent=1) + "\n")
            os.replace(tmp, manifest)

    @property
    def codebook_size(self) -> int:
        return int(self.info["codebook_size"])

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.info["grid"]
        return int(h), int(w)

    def done(self, split: str, index: int) -> bool:
        return (shard_dir(self.root, split, index) / "meta.json").is_file()

    def write(self, split: str, index: int, codes: np.ndarray, captions: Sequence[str],
              report: Optional[dict[str, Any]] = None) -> Path:
        return write_shard(self.root, split, index, codes, captions, self.codebook_size, report)

    def split(self, name: str, limit: Optional[int] = None) -> SplitReader:
        return SplitReader(self.root, name, limit)

    def progress(self, split: str, total: int) -> tuple[int, int]:
        """(finished shards, ``total``) of ``split``."""
        return sum(self.done(split, i) for i in range(total)), total
