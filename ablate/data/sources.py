"""Streaming image-caption sources: webdataset shards, Hugging Face datasets saved on disk,
and caption-indexed folders, read shard by shard.

A *shard* is the unit of preparation work: a tar file of a webdataset, ``data.shard_size`` rows
of a Hugging Face dataset, ``data.shard_size`` lines of a folder's ``captions.jsonl``.
:func:`shards` lists them per split, :func:`read_shard` decodes one into ``(image, caption)``
pairs with a report of what it skipped.

Untrusted input: a shard may come from anyone. Only image members (jpg/jpeg/png/webp, decoded by
PIL) and text members (txt, or json with a ``caption`` field) are ever decoded; every other
member is ignored, and pickle-type members (``.pyd``, ``.pickle``, ``.pkl``, ``.pth``, ``.pt``,
``.npy``) are counted as ``unsafe_member`` and never loaded. Tar members are read as bytes, never
extracted to disk.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ablate.config import ConfigError, DataSpec
from ablate.utils import expand_path

__all__ = ["STREAMING", "shards", "read_shard", "to_square", "expand_urls", "Shard", "write_shards"]

STREAMING = ("webdataset", "hf", "folder")
IMAGE_EXT = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = ("txt", "json")
UNSAFE_EXT = ("pyd", "pickle", "pkl", "pth", "pt", "npy", "npz")
SPLIT_URLS = {"train": "urls", "val": "val_urls", "test": "test_urls"}
WDS_LAYOUT = ("tar shards of samples <key>.jpg|png|webp with <key>.txt or <key>.json "
              "{\"caption\": ...} (the img2dataset layout)")

Shard = tuple[str, Any]  # (name shown in reports and errors, what read_shard needs)


def to_square(im: Any, size: int) -> np.ndarray:
    """A PIL image -> uint8 RGB ``[3, S, S]``: centre-cropped to a square, resized (Lanczos)."""
    from PIL import Image

    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _decode_image(data: bytes, size: int) -> Optional[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return to_square(im, size)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def expand_urls(value: Any, field: str) -> list[str]:
    """``data.urls`` (a brace pattern, a list of them, ``$VARS`` allowed) -> the shard list."""
    from braceexpand import braceexpand

    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        out += list(braceexpand(expand_path(str(item), f"data.{field}")))
    return out


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def shards(spec: DataSpec, split: str) -> list[Shard]:
    """The shards of ``split`` of a streaming dataset, checked for existence where local.

    Raises ConfigError naming the field (missing pattern or file, unreadable dataset)."""
    if spec.name == "webdataset":
        field = SPLIT_URLS[split]
        urls = expand_urls(getattr(spec, field), field)
        if not urls:
            raise ConfigError(f"data.{field} is required for data.name=webdataset: {WDS_LAYOUT}")
        missing = [u for u in urls if _is_local(u) and not Path(u).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more of {len(urls)})" if len(missing) > 1 else ""
            raise ConfigError(f"data.{field}: shard {missing[0]!r} does not exist{more}; expected {WDS_LAYOUT}")
        return [(u, u) for u in urls]
    if spec.name == "folder":
        from ablate.data import folder

        try:
            part = folder.split_entries(spec, folder.read_index(spec.path))[split]
        except (OSError, ValueError) as err:
            raise ConfigError(str(err)) from None
        size = spec.shard_size
        return [(f"{spec.path}[{split}:{a}:{a + len(part[a:a + size])}]", part[a:a + size])
                for a in range(0, len(part), size)]
    if spec.name == "hf":
        n = _hf_split(spec, split).num_rows
        size = spec.shard_size
        return [(f"{spec.path}[{split}:{a}:{min(n, a + size)}]", (split, a, min(n, a + size)))
                for a in range(0, n, size)]
    raise ConfigError(f"data.name={spec.name!r} is not a streaming dataset ({', '.join(STREAMING)})")


def read_shard(spec: DataSpec, shard: Shard) -> tuple[Iterator[tuple[np.ndarray, str]], dict[str, Any]]:
    """Decode one shard: ``(iterator of (uint8 [3, S, S], caption), report)``. The report fills
    in as the iterator runs: ``samples`` seen, ``kept``, ``skipped`` by reason. A shard that
    cannot be opened or is corrupt raises ValueError naming it."""
    report: dict[str, Any] = {"source": shard[0], "samples": 0, "kept": 0, "skipped": {}}
    if spec.name == "webdataset":
        return _webdataset(spec, shard[1], report), report
    if spec.name == "folder":
        return _folder(spec, shard[1], report), report
    return _hf(spec, shard[1], report), report


def _folder(spec: DataSpec, entries: list[tuple[str, str]], report: dict[str, Any]) -> Iterator[tuple[np.ndarray, str]]:
    root = Path(expand_path(spec.path, "data.path"))
    for name, caption in entries:  # paths were checked to stay inside data.path (folder.read_index)
        report["samples"] += 1
        try:
            data = (root / name).read_bytes()
        except OSError:
            data = b""
        image = _decode_image(data, spec.image_size) if data else None
        if image is None:
            _skip(report, "undecodable_image")
            continue
        report["kept"] += 1
        yield image, caption


def _skip(report: dict[str, Any], why: str) -> None:
    report["skipped"][why] = report["skipped"].get(why, 0) + 1


def _caption_of(sample: dict[str, bytes]) -> Optional[str]:
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace").strip()
    try:
        rec = json.loads(sample["json"].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    cap = rec.get("caption") if isinstance(rec, dict) else None
    return cap.strip() if isinstance(cap, str) else None


def _webdataset(spec: DataSpec, url: str, report: dict[str, Any]) -> Iterator[tuple[np.ndarray, str]]:
    from webdataset import gopen
    from webdataset.tariterators import tar_file_iterator

    try:
        stream = gopen(url)
    except Exception as err:  # noqa: BLE001 - any opener failure is this shard's
        raise ValueError(f"data shard {url!r} cannot be opened: {type(err).__name__}: {err}") from None
    current: Optional[str] = None
    sample: dict[str, bytes] = {}

    def finish() -> Optional[tuple[np.ndarray, str]]:
        report["samples"] += 1
        image_ext = next((e for e in IMAGE_EXT if e in sample), None)
        if any(e in sample for e in UNSAFE_EXT):
            _skip(report, "unsafe_member")  # counted, never loaded; the rest of the sample is used
        if image_ext is None:
            _skip(report, "no_image")
            return None
        if not any(e in sample for e in TEXT_EXT):
            _skip(report, "no_caption")
            return None
        caption = _caption_of(sample)
        if not caption:
            _skip(report, "empty_caption")
            return None
        image = _decode_image(sample[image_ext], spec.image_size)
        if image is None:
            _skip(report, "undecodable_image")
            return None
        report["kept"] += 1
        return image, caption

    try:
        with stream:
            for member in tar_file_iterator(stream):
                name = member["fname"]
                base, _, ext = Path(name).name.partition(".")
                key = str(Path(name).parent / base)
                if key != current:
                    if current is not None:
                        out = finish()
                        if out is not None:
                            yield out
                    current, sample = key, {}
                ext = ext.lower()
                if ext in IMAGE_EXT or ext in TEXT_EXT or ext in UNSAFE_EXT:
                    sample[ext] = member["data"] if ext not in UNSAFE_EXT else b""
            if current is not None:
                out = finish()
                if out is not None:
                    yield out
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"data shard {url!r} is corrupt: {type(err).__name__}: {err}; "
                         f"expected {WDS_LAYOUT}") from None
    if report["kept"] == 0 and report["samples"]:
        raise ValueError(f"data shard {url!r}: none of its {report['samples']} samples has a readable "
                         f"image and caption ({report['skipped']}); expected {WDS_LAYOUT}")


# ------------------------------------------------------------------------------------ huggingface

_HF_SPLITS = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


def _hf_split(spec: DataSpec, split: str) -> Any:
    """The ``datasets.Dataset`` of ``split`` with the image column left undecoded."""
    try:
        from datasets import Dataset, DatasetDict, Image, load_from_disk
    except ImportError:
        raise ConfigError("data.name=hf needs the `datasets` package: pip install -e '.[scale]'") from None
    try:
        ds = load_from_disk(expand_path(spec.path, "data.path"))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise ConfigError(f"data.path: {spec.path!r} is not a dataset saved with save_to_disk "
                          f"({type(err).__name__})") from None
    if isinstance(ds, DatasetDict):
        name = next((n for n in _HF_SPLITS[split] if n in ds), None)
        if name is None:
            raise ConfigError(f"data.path: {spec.path!r} has splits {sorted(ds)}; expected one of "
                              f"{list(_HF_SPLITS[split])} for {split}")
        ds = ds[name]
    elif not isinstance(ds, Dataset):
        raise ConfigError(f"data.path: {spec.path!r} is not a datasets Dataset or DatasetDict")
    for col in (spec.image_column, spec.caption_column):
        if col not in ds.column_names:
            which = "image_column" if col == spec.image_column else "caption_column"
            raise ConfigError(f"data.{which}: {col!r} is not a column of {spec.path!r} "
                              f"(columns: {ds.column_names})")
    if isinstance(ds.features[spec.image_column], Image):
        ds = ds.cast_column(spec.image_column, Image(decode=False))
    return ds


def _hf(spec: DataSpec, where: tuple[str, int, int], report: dict[str, Any]) -> Iterator[tuple[np.ndarray, str]]:
    split, a, b = where
    ds = _hf_split(spec, split).select(range(a, b))
    for row in ds:
        report["samples"] += 1
        caption, image = row[spec.caption_column], row[spec.image_column]
        if not isinstance(caption, str) or not caption.strip():
            _skip(report, "empty_caption")
            continue
        data = image.get("bytes") if isinstance(image, dict) else None
        if data is None and isinstance(image, dict) and image.get("path"):
            _skip(report, "image_by_path")  # a path inside a shared dataset may point anywhere
            continue
        decoded = _decode_image(data, spec.image_size) if data else None
        if decoded is None:
            _skip(report, "undecodable_image")
            continue
        report["kept"] += 1
        yield decoded, caption.strip()


# ---------------------------------------------------------------------------------------- writing

def write_shards(folder: Path, prefix: str, images: np.ndarray, captions: list[str], per_shard: int) -> str:
    """Write uint8 images ``[n, 3, H, W]`` (PNG) and captions (``.txt``; every third as ``.json``
    ``{"caption": ...}``, both layouts img2dataset writes) as tar shards ``<prefix>-00000.tar``,
    ... of ``per_shard`` samples; returns their brace pattern. For tests and benchmarks, and to
    turn a built-in dataset into shards."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(images) // per_shard)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s in range(n_shards):
        with tarfile.open(folder / f"{prefix}-{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(len(images), (s + 1) * per_shard)):
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(images[i].transpose(1, 2, 0))).save(buf, format="PNG")
                add(tar, f"{i:09d}.png", buf.getvalue())
                if i % 3 == 2:
                    add(tar, f"{i:09d}.json", json.dumps({"caption": captions[i]}).encode())
                else:
                    add(tar, f"{i:09d}.txt", captions[i].encode())
    return str(folder / f"{prefix}-{{{0:05d}..{n_shards - 1:05d}}}.tar")
