"""The ``folder`` dataset: a directory of images and a ``captions.jsonl`` that captions them.

Layout of ``data.path``::

    captions.jsonl     one JSON object a line: {"file": "a.png", "caption": "a red bird"}
    a.png, b.jpg, ...  paths in "file" are relative to data.path (sub-folders allowed)

Every image is converted to RGB, centre-cropped to a square and resized (Lanczos) to
``data.image_size``. All problems are reported as one line naming ``data.path`` and what is
expected, before any image is decoded.

The folder may come from anyone: a listed path that is absolute, climbs out with ``..``, or
passes through a symbolic link is refused (a link could point at any file on the machine).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
GENERATOR_VERSION = 1
_LAYOUT = 'a directory with images (png/jpg/jpeg/webp) and captions.jsonl lines {"file": ..., "caption": ...}'


def read_index(path: str | Path) -> list[tuple[str, str]]:
    """``[(file, caption)]`` from ``<path>/captions.jsonl``, checked against the files on disk.

    Raises FileNotFoundError (missing folder, index or listed file) or ValueError (bad line,
    unsupported suffix, duplicate file, empty index).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: {str(root)!r} is not a directory; expected {_LAYOUT}")
    index = root / "captions.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"data.path: {str(root)!r} has no captions.jsonl; expected {_LAYOUT}")
    entries: list[tuple[str, str]] = []
    seen: set[str] = set()
    for lineno, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"data.path: {index}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg}); expected {{\"file\": ..., \"caption\": ...}}") from None
        if not (isinstance(rec, dict) and isinstance(rec.get("file"), str)
                and isinstance(rec.get("caption"), str) and rec["caption"].strip()):
            raise ValueError(f"{where}: expected an object with string keys \"file\" and a non-empty \"caption\"")
        name = rec["file"]
        _check_inside(root, name, where)
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{where}: {name!r} is not an image file (accepted: {', '.join(IMAGE_SUFFIXES)})")
        if name in seen:
            raise ValueError(f"{where}: {name!r} is listed twice")
        if not (root / name).is_file():
            raise FileNotFoundError(f"{where}: listed image {name!r} does not exist under data.path")
        seen.add(name)
        entries.append((name, rec["caption"].strip()))
    if not entries:
        raise ValueError(f"data.path: {str(index)!r} lists no images; expected {_LAYOUT}")
    return entries


def _check_inside(root: Path, name: str, where: str) -> None:
    """``name`` must be a plain relative path inside ``root``: no ``..``, no symbolic link."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{where}: {name!r} is outside data.path (absolute or with '..'); "
                         "list files relative to data.path")
    p = root
    for part in rel.parts:
        p = p / part
        if p.is_symlink():
            raise ValueError(f"{where}: {name!r} goes through a symbolic link ({p.name}); "
                             "data.path must hold the files themselves")


def split_entries(spec, entries: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:  # noqa: ANN001
    """The folder's entries dealt into ``{"train", "val", "test"}``: a permutation seeded by
    ``data.seed``, cut test first, then val, then train (sizes as ``load_dataset`` documents)."""
    from ablate.data import _pool_sizes

    sizes = _pool_sizes(spec, len(entries), f"data.path {spec.path!r}")
    order = np.random.default_rng([spec.seed, 7]).permutation(len(entries))
    out, start = {}, 0
    for s in ("test", "val", "train"):
        out[s] = [entries[i] for i in order[start:start + sizes[s]]]
        start += sizes[s]
    return out


def fingerprint(path: str | Path, entries: list[tuple[str, str]]) -> str:
    """A hash of the index and of each listed file's size and modification time: a cached copy
    is reused only while the folder is unchanged."""
    root = Path(path)
    h = hashlib.sha256((root / "captions.jsonl").read_bytes())
    for name, _ in entries:
        st = (root / name).stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_images(path: str | Path, files: list[str], size: int) -> np.ndarray:
    """uint8 RGB [n, 3, S, S]: each file centre-cropped to a square, then resized to ``size``."""
    from PIL import Image

    from ablate.data.sources import to_square

    root = Path(path)
    out = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, name in enumerate(files):
        try:
            with Image.open(root / name) as im:
                out[i] = to_square(im, size)
        except OSError as err:
            raise ValueError(f"data.path: cannot read image {name!r} ({err}); "
                             "expected a png/jpg/jpeg/webp file") from None
    return out
