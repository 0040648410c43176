"""The ``digits`` dataset: scikit-learn's bundled handwritten digits (real data, 1797 images).

Each 8x8 image (16 grey levels) is scaled to 0..255, upscaled bilinearly to ``image_size``,
repeated to RGB (white strokes on black) and captioned by its class as a word:
"a handwritten digit seven". The data ships inside scikit-learn: nothing is downloaded.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four",
                                "five", "six", "seven", "eight", "nine")
GENERATOR_VERSION = 1
_RE = re.compile(rf"^a handwritten digit ({'|'.join(DIGIT_WORDS)})$")


def caption_for(digit: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def parse_caption(caption: str) -> Optional[int]:
    """The digit a caption names, or None when it is not a digits caption."""
    m = _RE.match(caption)
    return DIGIT_WORDS.index(m[1]) if m else None


def load_all(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 RGB [n, 3, S, S] and their labels [n] (int64)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0))[:, None]  # [n, 1, 8, 8]
    if size != 8:
        # antialias only matters when shrinking; upscaling stays plain bilinear
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8)
    img = x.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1).numpy()
    return img, bunch.target.astype(np.int64)
