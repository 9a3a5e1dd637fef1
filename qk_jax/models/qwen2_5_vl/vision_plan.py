"""The host-side "vision plan": everything about the vision tower that depends on the
image grids, computed in numpy so that the jitted tower sees only arrays of static shape.

Qwen2.5-VL's vision tower reorders the patches of each image so that the patches of one
attention window are contiguous (in units of `spatial_merge_size**2` patches, so the
later 2x2 merge stays aligned), runs windowed attention in most blocks and attention
over each whole image (per frame) in the `fullatt_block_indexes` blocks, merges, and
undoes the reordering. All of that is fixed once `image_grid_thw` is known:

- `window_index` (U,): permutation of merge units (the HF `window_index`);
- `reverse_index` (U,): its inverse (HF `argsort(window_index)`), applied after the merger;
- `window_segments` (N,), `full_segments` (N,): per patch, in the reordered sequence,
  the id of its window / of its image frame; attention is allowed between patches with
  the same id. Inside the scanned blocks a per-layer flag picks which of the two to use;
- `positions` (N, 2): (row, col) of each patch for the 2D rotary embedding, reordered.

`pad_to` pads the patch count to a static bucket size (a multiple of the merge unit):
padded patches form their own segment (they never mix with real ones) and their merged
outputs, after the real ones, are ignored.

`build_image_plan` is the plan of the batched layout (`vision.py`): when every image of a
batch has the same grid, the plan of ONE image (fields of shape (P,)) serves them all and
the tower runs the images as a batch of (I, P) sequences.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qk_jax.models.qwen2_5_vl.config import VisionConfig


class VisionPlan(NamedTuple):
    """Static-shape index arrays for one batch of images (a pytree of int32 arrays)."""

    window_index: np.ndarray  # (U,)
    reverse_index: np.ndarray  # (U,)
    window_segments: np.ndarray  # (N,)
    full_segments: np.ndarray  # (N,)
    positions: np.ndarray  # (N, 2)


def _check_grid(grid_thw: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    grid = np.asarray(grid_thw, dtype=np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must have shape (num_images, 3), got {grid.shape}")
    m = cfg.spatial_merge_size
    bad = [tuple(g) for g in grid if g[1] % m or g[2] % m or min(g) < 1]
    if bad:
        raise ValueError(
            f"image_grid_thw rows {bad}: height and width must be positive multiples of spatial_merge_size={m}"
        )
    return grid


def num_patches(grid_thw: np.ndarray) -> int:
    """Patches (rows of `pixel_values`) of a batch of images."""
    return int(np.prod(np.asarray(grid_thw, dtype=np.int64), axis=-1).sum())


def num_merged_tokens(grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """LM tokens (image-pad tokens) of each image: (N_img,)."""
    return np.prod(np.asarray(grid_thw, dtype=np.int64), axis=-1) // spatial_merge_size**2


def patch_positions(grid: np.ndarray, m: int) -> np.ndarray:
    """(row, col) of each patch in the processor's merge-block-major order: (N, 2)."""
    out = []
    for t, h, w in grid:
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        hpos = hpos.reshape(block).transpose(0, 2, 1, 3).ravel()
        wpos = wpos.reshape(block).transpose(0, 2, 1, 3).ravel()
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0)


def window_index(grid: np.ndarray, m: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge-unit permutation into window order and the window boundaries (cumulative, in patches)."""
    index, cu = [], [0]
    offset = 0
    for t, h, w in grid:
        lh, lw = h // m, w // m
        ids = np.arange(t * lh * lw).reshape(t, lh, lw)
        pad_h, pad_w = window - lh % window, window - lw % window
        nh, nw = (lh + pad_h) // window, (lw + pad_w) // window
        padded = np.pad(ids, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, window, window)
        lengths = (padded != -100).sum(axis=(2, 3)).ravel()
        flat = padded.ravel()
        index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(lengths) * m * m + cu[-1]).tolist())
        offset += t * lh * lw
    cu = np.asarray(cu, np.int64)
    cu = cu[np.concatenate([[True], np.diff(cu) != 0])]  # drop empty windows (HF unique_consecutive)
    return np.concatenate(index), cu


def _segments(cu: np.ndarray, n: int) -> np.ndarray:
    return (np.searchsorted(cu, np.arange(n), side="right") - 1).astype(np.int32)


def build_vision_plan(grid_thw: np.ndarray, cfg: VisionConfig, pad_to: int | None = None) -> VisionPlan:
    """The plan for a batch of images given as `image_grid_thw` (N_img, 3).

    Args:
      pad_to: total patch count to pad to (>= the real count, a multiple of
        `spatial_merge_size**2`); None = no padding.
    """
    grid = _check_grid(grid_thw, cfg)
    m, unit = cfg.spatial_merge_size, cfg.merge_unit
    n = num_patches(grid)
    n_pad = n if pad_to is None else int(pad_to)
    if n_pad < n or n_pad % unit:
        raise ValueError(
            f"pad_to={pad_to} must be >= the {n} patches of image_grid_thw and a multiple of "
            f"spatial_merge_size**2={unit}"
        )
    win_index, cu_window = window_index(grid, m, cfg.merger_window)
    frame_lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    cu_full = np.concatenate([[0], np.cumsum(frame_lengths)])
    positions = patch_positions(grid, m)
    positions = positions.reshape(-1, unit, 2)[win_index].reshape(-1, 2)

    u, u_pad = n // unit, n_pad // unit
    win_index = np.concatenate([win_index, np.arange(u, u_pad)])
    window_segments = np.concatenate([_segments(cu_window, n), np.full(n_pad - n, -1)])
    full_segments = np.concatenate([_segments(cu_full, n), np.full(n_pad - n, -1)])
    positions = np.concatenate([positions, np.zeros((n_pad - n, 2), positions.dtype)])
    return VisionPlan(
        window_index=win_index.astype(np.int32),
        reverse_index=np.argsort(win_index).astype(np.int32),
        window_segments=window_segments.astype(np.int32),
        full_segments=full_segments.astype(np.int32),
        positions=positions.astype(np.int32),
    )


def pad_patches(pixel_values: np.ndarray, pad_to: int) -> np.ndarray:
    """Zero rows appended to `pixel_values` (N, patch_dim) up to `pad_to` rows, the static
    bucket size given to `build_vision_plan(..., pad_to=pad_to)`."""
    pixel_values = np.asarray(pixel_values)
    if pad_to < pixel_values.shape[0]:
        raise ValueError(f"pad_to={pad_to} is smaller than the {pixel_values.shape[0]} patches")
    return np.concatenate(
        [pixel_values, np.zeros((pad_to - pixel_values.shape[0], pixel_values.shape[1]), pixel_values.dtype)]
    )


def shares_one_grid(grid_thw: np.ndarray) -> bool:
    """True when every image of `image_grid_thw` (N_img, 3) has the same grid (the batched layout applies)."""
    grid = np.asarray(grid_thw)
    return grid.ndim == 2 and len(grid) > 0 and bool((grid == grid[:1]).all())


def build_image_plan(grid_thw: np.ndarray, cfg: VisionConfig) -> VisionPlan:
    """The plan of the batched layout: `image_grid_thw` (N_img, 3) must hold one grid
    (repeated); returns the plan of one image, fields (P,) / (P / merge_unit,). The images'
    `pixel_values` go to the tower as (N_img, P, patch_dim)."""
    grid = _check_grid(grid_thw, cfg)
    if not shares_one_grid(grid):
        raise ValueError(
            f"build_image_plan: the images have different grids {sorted({tuple(g) for g in grid})}; "
            "the batched vision layout needs one grid per batch (use build_vision_plan and flat "
            "pixel_values for mixed grids)"
        )
    return build_vision_plan(grid[:1], cfg)
