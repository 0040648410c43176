"""Small shared helpers: atomic file writes, seeding, device choice, content-keyed cache folders.

torch and numpy are imported inside the functions that need them, so the light commands
(``ablate table``, ``ablate status``) can use the file helpers without paying for torch.
"""
from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temp file + rename (a crash never leaves a truncated file)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def torch_load(path: Path) -> Any:
    """Load a file written by :func:`atomic_torch_save` (tensors, dicts, lists, numbers, strings only)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def seed_everything(seed: int) -> "torch.Generator":
    """Seed python, numpy and torch; return a CPU generator seeded the same way."""
    random.seed(seed)
    import numpy as np
    import torch

    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(choice: str = "auto") -> "torch.device":
    """``auto`` -> cuda when available, else cpu."""
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(choice)


def cache_path(root: Path, kind: str, key: str, name: str) -> Path:
    """``<root>/cache/<kind>/<key>/<name>``: where content-keyed artefacts live."""
    return Path(root) / "cache" / kind / key / name
