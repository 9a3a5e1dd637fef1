"""Aspect-ratio buckets (the paper's 1:1, 1:2, 2:3, 3:4, 3:5, 4:5, 9:16 and transposes).

A bucket is an image size `(height, width)` with both sides multiples of `multiple`
(16 for an 8x VAE with 2x2 patches; 28 for Qwen2.5-VL's 14px patches merged 2x2) and an
area close to the configured one. Every image is resized to cover its bucket and
centre-cropped, so a batch drawn from one bucket has one static shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

# height:width ratios of the paper, both orientations.
RATIOS = ("1:1", "1:2", "2:3", "3:4", "3:5", "4:5", "9:16", "2:1", "3:2", "4:3", "5:3", "5:4", "16:9")


def _ratio(text: str) -> float:
    a, _, b = text.partition(":")
    try:
        value = float(a) / float(b)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"aspect ratio {text!r} must look like 'h:w', e.g. '3:4'") from None
    if value <= 0:
        raise ValueError(f"aspect ratio {text!r} must be positive")
    return value


def bucket_size(ratio: str, area: int, multiple: int) -> tuple[int, int]:
    """(height, width) of the bucket `ratio` (h:w) at about `area` pixels, sides multiples of `multiple`."""
    r = _ratio(ratio)
    h = max(multiple, int(round(math.sqrt(area * r) / multiple)) * multiple)
    w = max(multiple, int(round(math.sqrt(area / r) / multiple)) * multiple)
    return h, w


def bucket_table(area: int, multiple: int, ratios: Sequence[str] = RATIOS) -> list[tuple[int, int]]:
    """Bucket sizes for `ratios`, in order (sizes that coincide after rounding are kept once)."""
    return paired_tables(area, multiple, area, multiple, ratios)[0]


def paired_tables(area: int, multiple: int, vlm_area: int, vlm_multiple: int, ratios: Sequence[str] = RATIOS):
    """(target buckets, the VLM size of the input images of each bucket), index-aligned."""
    if min(area, multiple, vlm_area, vlm_multiple) <= 0:
        raise ValueError(f"bucket areas ({area}, {vlm_area}) and multiples ({multiple}, {vlm_multiple}) must be > 0")
    table, vlm = [], []
    for ratio in ratios:
        size = bucket_size(ratio, area, multiple)
        if size not in table:
            table.append(size)
            vlm.append(bucket_size(ratio, vlm_area, vlm_multiple))
    return table, vlm


def choose_bucket(height: int, width: int, table: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest (in log space) to height:width."""
    target = math.log(height / width)
    return int(np.argmin([abs(math.log(h / w) - target) for h, w in table]))


def resize_crop(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes (H, W, 3) uint8 to cover `size` = (h, w), then centre-crops to it."""
    h, w = size
    ih, iw = img.shape[:2]
    if (ih, iw) == (h, w):
        return img
    scale = max(h / ih, w / iw)
    nh, nw = max(h, int(math.ceil(ih * scale - 1e-6))), max(w, int(math.ceil(iw * scale - 1e-6)))
    resample = Image.BICUBIC if scale > 1 else Image.LANCZOS
    out = np.asarray(Image.fromarray(img).resize((nw, nh), resample))
    y0, x0 = (nh - h) // 2, (nw - w) // 2
    return out[y0 : y0 + h, x0 : x0 + w]
