"""Small shared helpers: atomic file writes, seeding, device choice, content-keyed cache folders.

torch and numpy are imported inside the functions that need them, so the light commands
(``ablate table``, ``ablate status``) can use the file helpers without paying for torch.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import os
import random
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

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


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A 63-bit seed for what is drawn at ``step`` of a run seeded ``seed`` (``salt`` separates
    streams): resumed runs redraw exactly what an uninterrupted run drew."""
    return (seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)


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


def expand_path(value: str, field: str) -> str:
    """``~`` and ``$VARS`` expanded in a path setting; an unset variable is an error naming
    ``field`` (a path with ``$ABLATE_DATA`` left in it would only fail later, less clearly)."""
    from ablate.config import ConfigError

    text = os.path.expanduser(os.path.expandvars(str(value)))
    if "$" in text:
        var = text[text.index("$"):].split("/")[0]
        raise ConfigError(f"{field}: {var} is not set; export it or give the path with --set {field}=...")
    return text


def cache_path(root: Path, kind: str, key: str, name: str) -> Path:
    """``<root>/cache/<kind>/<key>/<name>``: where content-keyed artefacts live."""
    return Path(root) / "cache" / kind / key / name


def _rss_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def peak_memory(collect: bool = True) -> Iterator[dict[str, Optional[float]]]:
    """``with peak_memory() as m: ...`` leaves ``m["mb"]``: MiB of resident memory the block
    added at its peak, or None where the platform cannot say. ``collect``: run the cyclic
    garbage collector first (0.1-0.2 s with torch and numba loaded)."""
    out: dict[str, Optional[float]] = {"mb": None}
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: reuse is not free
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _rss_kb("VmRSS")
    except OSError:
        base = None
    yield out
    peak = _rss_kb("VmHWM")
    if base is not None and peak is not None:
        out["mb"] = max(0, peak - base) / 1024
