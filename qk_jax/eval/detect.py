"""A deterministic Kontext-Shapes object detector: colour unmixing + shape fitting.

No learned model. Steps, for an image (H, W, 3):

1. Images larger than `max_side` are box-downsampled (the judge needs no more); a
   gaussian filter smooths them when the estimated noise level is high.
2. Colour unmixing: every pixel `p` (sRGB in 0..1) is explained, for each palette
   colour `c`, as `alpha * c + (1 - alpha) * grey` (least squares, alpha and grey in
   0..1). Backgrounds and identity textures are neutral, and antialiasing or blur mixes
   an object's colour with its neutral surroundings, so the right colour explains such
   a pixel with a near-zero residual while another colour does not. (A plain
   nearest-colour rule reads a magenta edge on grey as purple.) A pixel belongs to the
   colour with the smallest residual if that residual is below `max_residual` and
   `alpha >= 0.5`; `alpha` is the soft coverage used below.
3. Connected components per colour (4-connectivity), holes filled (the texture of an
   identity subject), tiny components dropped.
4. Shape: the soft mask of a component is compared (soft IoU) with every vocabulary
   shape drawn by the generator's own SDFs (`qk_jax.data.render`) at the component's
   centroid and area-equivalent radius, over a grid of rotations; the best fit wins and
   a fit below `min_fit` is no object. This uses fill ratio, convexity and vertex count
   implicitly, and is rotation-invariant, so flipped or rotated scenes read the same.
5. Size class from the fitted circumradius (`vocab.SIZE_BOUNDS`); texture signature of
   the interior (gradient-orientation statistics) and its pattern label (`vocab.PATTERNS`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image
from scipy import ndimage

from qk_jax.data import render, vocab

PALETTE = np.asarray([vocab.COLOURS[c] for c in vocab.COLOUR_NAMES], np.float64) / 255.0


@dataclasses.dataclass(frozen=True)
class DetectParams:
    max_residual: float = 0.13  # colour-unmixing residual (0..1 sRGB units) to accept a colour
    min_alpha: float = 0.5  # coverage for a pixel to count as object
    min_area_frac: float = 0.0025  # smaller components are noise
    min_fit: float = 0.62  # soft IoU with the best template
    denoise_sigma: float = 4.0  # estimated noise (0..255) above which the image is smoothed
    rotation_step: float = 3.0  # degrees
    blur_sigmas: tuple[float, ...] = (0.0, 0.7, 1.2, 1.8)  # template blurs tried (pixels)
    max_side: int = 128  # larger images are box-downsampled so min(H, W) == max_side (speed)


@dataclasses.dataclass
class Detection:
    shape: str
    colour: str
    cx: float  # normalised centre
    cy: float
    r: float  # circumradius / min(H, W)
    size: str
    area_frac: float  # object area / image area
    rotation: float
    fit: float  # soft IoU with the fitted template
    pattern: str | None = None  # texture label of an identity subject, None if plain
    signature: tuple[float, ...] = ()  # (dark fraction, c2, s2, c4, radial) of the interior

    @property
    def cell(self) -> str:
        col, row = min(max(int(self.cx * 3), 0), 2), min(max(int(self.cy * 3), 0), 2)
        return vocab.GRID[(col, row)]

    def to_json(self) -> dict:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "centre": [round(self.cx, 4), round(self.cy, 4)],
            "size": self.size,
            "area_frac": round(self.area_frac, 5),
            "r": round(self.r, 4),
            "cell": self.cell,
            "rotation": round(self.rotation, 1),
            "fit": round(self.fit, 3),
            "pattern": self.pattern,
            "signature": [round(s, 3) for s in self.signature],
        }


def as_float_image(image) -> np.ndarray:
    """Any RGB image (uint8, or float in 0..1 or -1..1) -> float64 (H, W, 3) in 0..1."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    a = a.astype(np.float64)
    if a.min() < -0.01:  # model outputs in [-1, 1]
        a = (a + 1.0) / 2.0
    return np.clip(a, 0.0, 1.0)


def noise_sigma(img: np.ndarray) -> float:
    """Noise level (0..255 units) from the median Laplacian response (Immerkaer's operator).

    The median ignores edges and textures, which occupy a minority of pixels, so clean
    renders read ~0 and only real noise triggers smoothing.
    """
    g = img.mean(-1) * 255.0
    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    resp = ndimage.convolve(g, k, mode="reflect")[1:-1, 1:-1]
    if resp.size == 0:
        return 0.0
    return float(np.median(np.abs(resp)) / (0.6745 * 6.0))


def unmix(img: np.ndarray):
    """Per-pixel, per-colour unmixing. img (H, W, 3) in 0..1 -> alpha, residual (H, W, 8)."""
    p = img[..., None, :]  # (H, W, 1, 3)
    c = PALETTE  # (K, 3)
    cc, c1 = (c * c).sum(-1), c.sum(-1)  # (K,)
    cp, p1 = (p * c).sum(-1), p.sum(-1)  # (H, W, K), (H, W, 1)
    det = cc * 3.0 - c1 * c1
    alpha = np.clip((3.0 * cp - c1 * p1) / det, 0.0, 1.0)
    beta = np.clip((p1 - alpha * c1) / 3.0, 0.0, 1.0 - alpha)  # (1 - alpha) * grey, grey in 0..1
    resid = np.sqrt(((p - alpha[..., None] * c - beta[..., None]) ** 2).sum(-1))
    return alpha, resid


def label_pixels(img: np.ndarray, params: DetectParams):
    """(labels (H, W) int, -1 = background; alpha (H, W, K)).

    The colour is chosen by residual among colours with some evidence (alpha >= 0.1)
    before the coverage test: a magenta pixel half-covered by a dark texture must read
    as "magenta, alpha 0.5", not as the darker purple at alpha 0.9.
    """
    alpha, resid = unmix(img)
    score = np.where(alpha >= 0.1, resid, np.inf)
    best = score.argmin(-1)
    best_resid = np.take_along_axis(score, best[..., None], -1)[..., 0]
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    labels = np.where((best_resid <= params.max_residual) & (best_alpha >= params.min_alpha), best, -1)
    return labels, alpha


def _rotated_templates(shape: str, u: np.ndarray, v: np.ndarray, r_px: float, step: float):
    """Soft coverage of `shape` for every rotation in its symmetry period: (R, h, w)."""
    if shape == "circle":
        return np.array([0.0]), render.coverage(render.shape_sdf("circle", u, v) * r_px)[None]
    rots = np.arange(0.0, render.SYMMETRY[shape], step)
    th = np.deg2rad(rots)[:, None, None]
    # rotating the points by -theta == rotating the shape by +theta
    ur, vr = u[None] * np.cos(th) + v[None] * np.sin(th), -u[None] * np.sin(th) + v[None] * np.cos(th)
    return rots, render.coverage(render.shape_sdf(shape, ur, vr) * r_px)


def fit_shape(soft: np.ndarray, y0: int, x0: int, params: DetectParams):
    """Best (shape, rotation, IoU, cx_px, cy_px, r_px) for a soft mask crop at (y0, x0).

    The templates are also blurred by each of `params.blur_sigmas`, because a generated
    (or blurred, or JPEG-compressed) object is the sharp shape seen through an unknown
    point-spread function; the blur conserves area, so the radius comes from the mass.
    """
    area = float(soft.sum())
    ys, xs = np.mgrid[0 : soft.shape[0], 0 : soft.shape[1]].astype(np.float64) + 0.5
    cy, cx = float((soft * ys).sum() / area), float((soft * xs).sum() / area)
    best = ("circle", 0.0, -1.0, 0.0)
    for shape in vocab.SHAPES:
        r_px = math.sqrt(area / render.AREA[shape])
        u, v = (xs - cx) / r_px, (ys - cy) / r_px
        rots, sharp = _rotated_templates(shape, u, v, r_px, params.rotation_step)
        for sigma in params.blur_sigmas:
            templates = ndimage.gaussian_filter(sharp, (0, sigma, sigma), mode="constant") if sigma else sharp
            inter = np.minimum(templates, soft[None]).sum((1, 2))
            union = np.maximum(templates, soft[None]).sum((1, 2))
            iou = inter / np.maximum(union, 1e-9)
            i = int(iou.argmax())
            if iou[i] > best[2]:
                best = (shape, float(rots[i]), float(iou[i]), r_px)
    shape, rot, iou, r_px = best
    return shape, rot, iou, cx + x0, cy + y0, r_px


def texture_signature(dark: np.ndarray, window: np.ndarray, cx: float, cy: float) -> tuple[float, ...]:
    """(dark fraction, c2, s2, c4, radial) of a texture inside a soft window (crop coords).

    c2 / s2: double-angle gradient orientation (horizontal stripes c2 -> -1, vertical
    stripes c2 -> +1, diagonal s2 -> +1); c4: axis-aligned edges (checker); radial:
    gradients along the ray from the centre (rings).
    """
    wsum = float(window.sum())
    if wsum < 1.0:
        return (0.0, 0.0, 0.0, 0.0, 0.0)
    frac = float((dark * window).sum() / wsum)
    smooth = ndimage.gaussian_filter(dark, 0.6)
    gy, gx = np.gradient(smooth)
    w = window * (gx * gx + gy * gy)
    ws = float(w.sum())
    if ws < 1e-9:
        return (frac, 0.0, 0.0, 0.0, 0.0)
    phi = np.arctan2(gy, gx)
    ys, xs = np.mgrid[0 : dark.shape[0], 0 : dark.shape[1]].astype(np.float64) + 0.5
    psi = np.arctan2(ys - cy, xs - cx)
    stats = [
        float((w * f).sum() / ws) for f in (np.cos(2 * phi), np.sin(2 * phi), np.cos(4 * phi), np.cos(2 * (phi - psi)))
    ]
    return (frac, *stats)


def pattern_label(sig: tuple[float, ...]) -> str | None:
    """The texture label from a signature (None: plain, no texture)."""
    frac, c2, s2, c4, radial = sig
    if frac < 0.2:
        return None
    if abs(c2) >= 0.45 or abs(s2) >= 0.45:
        if abs(c2) >= abs(s2):
            return "hstripes" if c2 < 0 else "vstripes"
        return "diagonal"
    if radial >= 0.45:
        return "rings"
    if c4 >= 0.2:
        return "checker"
    return "dots"


def detect(image, params: DetectParams = DetectParams()) -> list[Detection]:
    """All objects in an image, sorted top-to-bottom then left-to-right."""
    img = as_float_image(image)
    if min(img.shape[:2]) > params.max_side:  # area averaging keeps every colour's mass
        scale = params.max_side / min(img.shape[:2])
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        img = (
            np.asarray(Image.fromarray(np.round(img * 255).astype(np.uint8)).resize(size, Image.BOX), np.float64)
            / 255.0
        )
    h, w = img.shape[:2]
    if noise_sigma(img) > params.denoise_sigma:
        # a gaussian conserves each object's colour mass (a median filter would eat star
        # tips); the blurred templates of the shape fit absorb the added blur
        img = ndimage.gaussian_filter(img, (1.0, 1.0, 0), mode="nearest")
    labels, alpha = label_pixels(img, params)
    min_area = max(6.0, params.min_area_frac * h * w)
    candidates = []  # (area, colour index, slice, component mask in the slice)
    for k in range(len(vocab.COLOUR_NAMES)):
        mask = labels == k
        if mask.sum() < min_area:
            continue
        comps, _ = ndimage.label(mask)
        for idx, sl in enumerate(ndimage.find_objects(comps), start=1):
            if sl is not None:
                comp = comps[sl] == idx
                if comp.sum() >= min_area:
                    candidates.append((int(comp.sum()), k, sl, comp))
    # Objects never overlap, so a component inside another's filled outline is part of
    # that object's texture (e.g. the light cells of a checkered subject): drop it.
    taken = np.zeros((h, w), bool)
    found = []
    for _, k, sl, comp in sorted(candidates, key=lambda c: -c[0]):
        if taken[sl][comp].mean() > 0.5:
            continue
        taken[sl] |= ndimage.binary_dilation(ndimage.binary_fill_holes(comp), iterations=1)
        det = _measure(comp, sl, labels, alpha[..., k], k, vocab.COLOUR_NAMES[k], h, w, params)
        if det is not None:
            found.append(det)
    return sorted(found, key=lambda d: (round(d.cy, 2), d.cx))


def _measure(comp, sl, labels, alpha_k, k, colour, h, w, params) -> Detection | None:
    pad = 3
    y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
    x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
    core = np.zeros((y1 - y0, x1 - x0), bool)
    core[sl[0].start - y0 : sl[0].stop - y0, sl[1].start - x0 : sl[1].stop - x0] = comp
    filled = ndimage.binary_fill_holes(core)
    holes = filled & ~core
    near = ndimage.binary_dilation(filled, iterations=2)
    lab = labels[y0:y1, x0:x1]
    alpha = alpha_k[y0:y1, x0:x1]
    deep = ndimage.binary_erosion(core, iterations=2)
    # a desaturated object (JPEG chroma, a colour cast) has interior alpha < 1: rescale
    level = float(np.median(alpha[deep])) if deep.sum() >= 4 else 1.0
    soft = np.where(near & ((lab == k) | (lab == -1)), np.clip(alpha / max(level, 0.5), 0.0, 1.0), 0.0)
    soft = np.where(holes, 1.0, soft)
    if soft.sum() < 4.0:
        return None
    shape, rot, iou, cx_px, cy_px, r_px = fit_shape(soft, y0, x0, params)
    if iou < params.min_fit:
        return None
    m = min(h, w)
    r = r_px / m
    size = "small" if r < vocab.SIZE_BOUNDS[0] else ("medium" if r < vocab.SIZE_BOUNDS[1] else "large")
    sig, pattern = (), None
    if shape in vocab.SUBJECT_SHAPES and holes.sum() > 0:
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
        scale = r_px * render.INNER_SCALE * 0.85
        inner = render.coverage(render.shape_sdf(shape, (xs - cx_px) / scale, (ys - cy_px) / scale, rot) * scale)
        dark = np.where(lab == k, 1.0 - alpha_k[y0:y1, x0:x1], 1.0) * filled
        sig = texture_signature(dark, inner, cx_px - x0, cy_px - y0)
        pattern = pattern_label(sig)
    return Detection(
        shape=shape,
        colour=colour,
        cx=cx_px / w,
        cy=cy_px / h,
        r=r,
        size=size,
        area_frac=float(render.AREA[shape] * r_px * r_px / (h * w)),
        rotation=rot,
        fit=iou,
        pattern=pattern,
        signature=tuple(sig),
    )
