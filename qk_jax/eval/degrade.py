"""Image degradations that mimic a generator's output, to test the judge's robustness.

Each takes and returns (H, W, 3) uint8 and is deterministic for a seed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage


def blur(img: np.ndarray, sigma: float = 0.8, seed: int = 0) -> np.ndarray:
    del seed
    out = ndimage.gaussian_filter(img.astype(np.float32), sigma=(sigma, sigma, 0), mode="nearest")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def noise(img: np.ndarray, sigma: float = 8.0, seed: int = 0) -> np.ndarray:
    """Additive gaussian noise, sigma in 0..255 units."""
    n = np.random.default_rng(seed).normal(0.0, sigma, img.shape)
    return np.clip(np.round(img + n), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int = 75, seed: int = 0, subsampling: int = 0) -> np.ndarray:
    """JPEG round trip: DCT block quantisation (`subsampling=2` also halves colour resolution)."""
    del seed
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def quantise(img: np.ndarray, levels: int = 24, seed: int = 0) -> np.ndarray:
    """Colour quantisation to `levels` values per channel."""
    del seed
    step = 255.0 / (levels - 1)
    return np.clip(np.round(np.round(img / step) * step), 0, 255).astype(np.uint8)


def colour_shift(img: np.ndarray, amount: float = 12.0, seed: int = 0) -> np.ndarray:
    """A global per-channel offset and gain, as a generator's colour cast."""
    rng = np.random.default_rng(seed)
    offset = rng.uniform(-amount, amount, 3)
    gain = 1.0 + rng.uniform(-amount, amount, 3) / 255.0
    return np.clip(np.round(img * gain + offset), 0, 255).astype(np.uint8)


DEGRADATIONS = {"blur": blur, "noise": noise, "jpeg": jpeg, "quantise": quantise, "colour_shift": colour_shift}


def combined(img: np.ndarray, seed: int = 0) -> np.ndarray:
    """Blur, then a colour cast, then noise: a soft, slightly off generated image."""
    return noise(colour_shift(blur(img, 0.6), 8.0, seed), 5.0, seed)
