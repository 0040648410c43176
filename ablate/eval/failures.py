"""Failure cases: the generated images the judge scored wrong, saved for looking at.

``failures/failures.json`` holds ``{"items": [{"file", "caption", "read"}]}``: each image's PNG
file (in the same folder), the caption it was generated for, and what the judge read in it, in
words. ``ablate report`` shows them on a row's page.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from ablate.eval.metrics import alignment

__all__ = ["write_failures", "describe_read"]

LIMIT = 16  # failure images kept per run
SCAN = 256  # generated images looked at to find them


def describe_read(seen: list[dict]) -> str:
    """What the judge read in one image, in words ("nothing", "digit 3 (p=0.82)", "large red
    circle top left (0.97); ...")."""
    if not seen:
        return "nothing"
    if "digit" in seen[0]:
        return f"digit {seen[0]['digit']} (p={seen[0]['conf']:.2f})"
    rows, cols = ("top", "middle", "bottom"), ("left", "centre", "right")
    return "; ".join(f"{o['size']} {o['colour']} {o['shape']} {rows[o['row']]} {cols[o['col']]} ({o['conf']:.2f})"
                     for o in seen)


def write_failures(folder: Path, name: str, images: torch.Tensor, captions: list[str], attrs: Optional[list],
                   heldout: Any, judge: Any) -> Optional[Path]:
    """Save up to :data:`LIMIT` of the first :data:`SCAN` generated images (uint8 ``[n, 3, H,
    W]``) that the judge scores wrong against their captions, into ``folder``; returns the folder
    (None when the data has no judge or nothing was wrong)."""
    from PIL import Image

    if judge is None or name not in ("shapes", "digits"):
        return None
    n = min(SCAN, len(captions))
    seen = judge.read(images[:n])
    items = []
    for i in range(n):
        scores = alignment(name, [seen[i]], [captions[i]], None if attrs is None else [attrs[i]], heldout)
        right = scores.get("align_acc", scores.get("align_acc_heldout"))
        if right is None or right >= 1.0:
            continue
        file = f"{i:04d}.png"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].permute(1, 2, 0).cpu().numpy()).save(folder / file)
        items.append({"file": file, "caption": captions[i], "read": describe_read(seen[i])})
        if len(items) == LIMIT:
            break
    if not items:
        return None
    (folder / "failures.json").write_text(json.dumps({"items": items, "scanned": n}, indent=1) + "\n")
    return folder
