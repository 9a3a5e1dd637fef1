"""Latent packing and RoPE position ids for the MMDiT image stream.

Latents are NHWC on our side. `patchify` packs them into tokens exactly as diffusers'
`_pack_latents` does for FLUX and Qwen-Image (token features ordered channel-major:
`(c, dy, dx)`), so a converted transformer sees the same token layout it was trained on.

Position ids are `(frame, row, col)` triples (float or int), one per token:

- Qwen-Image (MSRoPE): the image grid is centred — rows `-(h - h//2) .. h//2 - 1` — and
  segment `i` of an edit gets frame index `i`; text token `j` sits on the diagonal at
  `(s + j, s + j, s + j)` with `s = max over segments of max(h//2, w//2)`.
- FLUX: rows `0..h-1`, cols `0..w-1`, frame 0; text ids are all zero; FLUX.1-Kontext gives
  the i-th context image frame index i (`image_ids[..., 0] = i`).

`segment_ids` builds multi-segment ids (noisy target first, then condition images) under
either scheme the Query-Kontext assembly can choose: `"frame"` (segment i at frame i) or
`"shifted_2d"` (all at frame 0, segment i offset in (row, col)).

Everything here is host-side numpy (shapes are static); `rope_angles` and
`default_txt_ids` run in jnp inside the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.models import layers

# ----------------------------------------------------------------- packing


def patchify(latents: jax.Array, p: int = 2) -> jax.Array:
    """(B, H, W, C) latents -> (B, H/p * W/p, C * p * p) tokens in diffusers' packing order."""
    b, h, w, c = latents.shape
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
    x = latents.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # (B, h, w, C, py, px): channel-major, like torch's permute(0,2,4,1,3,5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: jax.Array, height: int, width: int, p: int = 2) -> jax.Array:
    """(B, H/p * W/p, C * p * p) tokens -> (B, H, W, C) latents; the inverse of `patchify`."""
    b, n, f = tokens.shape
    if n != (height // p) * (width // p) or f % (p * p):
        raise ValueError(f"{n} tokens of {f} features do not unpack to a {height}x{width} latent with patch {p}")
    c = f // (p * p)
    x = tokens.reshape(b, height // p, width // p, c, p, p)
    x = x.transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, height, width, c)


# ----------------------------------------------------------------- ids (host side)


def grid_ids(
    h: int, w: int, *, frame: float = 0, centred: bool = False, offset: tuple[float, float] = (0, 0)
) -> np.ndarray:
    """(h*w, 3) float32 ids `(frame, row, col)` of an h x w token grid, row-major.

    `centred` uses Qwen-Image's MSRoPE rows `-(h - h//2) .. h//2 - 1` (same for columns);
    otherwise rows start at 0 (FLUX). `offset` shifts (row, col).
    """
    rows = np.arange(h, dtype=np.float32) - ((h - h // 2) if centred else 0) + offset[0]
    cols = np.arange(w, dtype=np.float32) - ((w - w // 2) if centred else 0) + offset[1]
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 0] = frame
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(h * w, 3)


def diagonal_txt_ids(txt_len: int, start: float) -> np.ndarray:
    """(T, 3) ids `(start + j,) * 3`: Qwen-Image's text positions on the diagonal."""
    pos = start + np.arange(txt_len, dtype=np.float32)
    return np.repeat(pos[:, None], 3, axis=1)


def qwen_image_ids(
    img_shapes: Sequence[tuple[int, int, int]], txt_len: int, *, layer3d: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exactly diffusers' `QwenEmbedRope` (or `QwenEmbedLayer3DRope` with `layer3d`) as ids.

    Args:
      img_shapes: per segment `(frames, h, w)` in token units, target first (one entry of
        the pipeline's `img_shapes` list, e.g. `[(1, 32, 32), (1, 32, 48)]` for an edit).
      txt_len: number of text tokens (padded length).
    Returns:
      `(img_ids (N, 3), txt_ids (T, 3))` float32.
    """
    segs = []
    max_index = 0
    last = len(img_shapes) - 1
    for idx, (f, h, w) in enumerate(img_shapes):
        frame_ids = []
        for fi in range(f):
            frame = -1 if (layer3d and idx == last) else idx + fi
            frame_ids.append(grid_ids(h, w, frame=frame, centred=True))
        segs.append(np.concatenate(frame_ids, 0))
        max_index = max(max_index, h // 2, w // 2)
    if layer3d:
        max_index = max(max_index, last)
    return np.concatenate(segs, 0), diagonal_txt_ids(txt_len, max_index)


def flux_ids(img_shapes: Sequence[tuple[int, int]], txt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """FLUX / FLUX.1-Kontext ids: segment i (target 0, i-th context image i) at frame i, zero text ids."""
    img = np.concatenate([grid_ids(h, w, frame=i) for i, (h, w) in enumerate(img_shapes)], 0)
    return img, np.zeros((txt_len, 3), np.float32)


def segment_ids(
    shapes: Sequence[tuple[int, int]],
    *,
    scheme: str = "frame",
    centred: bool = True,
    offsets: Sequence[tuple[float, float]] | None = None,
) -> np.ndarray:
    """(sum h*w, 3) ids for several segments: the noisy target first, then condition images.

    Args:
      shapes: per segment (h, w) in tokens.
      scheme: "frame" — segment i at frame index i, all grids on the same (row, col) range
        (Qwen-Image-Edit with `centred=True`, FLUX.1-Kontext with `centred=False`);
        "shifted_2d" — every segment at frame 0, segment i shifted by `offsets[i]` in
        (row, col). The default offsets put each condition segment to the right of the
        previous ones (col offset = sum of the widths before it), so the n-th of
        equal-size references sits n image widths away; pass explicit offsets for other
        layouts (e.g. an edit source at a negative offset).
      centred: centre each grid (MSRoPE) before offsetting.
    """
    if scheme == "frame":
        if offsets is not None:
            raise ValueError("segment_ids: offsets are only used by scheme='shifted_2d'")
        return np.concatenate([grid_ids(h, w, frame=i, centred=centred) for i, (h, w) in enumerate(shapes)], 0)
    if scheme != "shifted_2d":
        raise ValueError(f"segment_ids: unknown scheme {scheme!r}; use 'frame' or 'shifted_2d'")
    if offsets is None:
        widths = [w for _, w in shapes]
        offsets = [(0.0, float(sum(widths[:i]))) for i in range(len(shapes))]
    if len(offsets) != len(shapes):
        raise ValueError(f"segment_ids: {len(offsets)} offsets for {len(shapes)} segments")
    return np.concatenate([grid_ids(h, w, centred=centred, offset=off) for (h, w), off in zip(shapes, offsets)], 0)


def batch_ids(ids: np.ndarray, batch: int) -> np.ndarray:
    """(N, 3) -> (B, N, 3)."""
    return np.broadcast_to(np.asarray(ids, np.float32)[None], (batch,) + np.shape(ids)).copy()


# ----------------------------------------------------------------- in-model (jnp)


def default_txt_ids(img_ids: jax.Array, txt_len: int, scheme: str) -> jax.Array:
    """Text ids when the caller passes none: (B, T, 3) float32.

    "diagonal" (Qwen-Image): the diagonal starting one past the largest image row/col id, which
    equals diffusers' `max(h//2, w//2)` for centred grids; "zeros" (FLUX): all at the origin.
    """
    b = img_ids.shape[0]
    if scheme == "zeros":
        return jnp.zeros((b, txt_len, 3), jnp.float32)
    start = jnp.max(img_ids[..., 1:].astype(jnp.float32), axis=(1, 2)) + 1.0  # (B,)
    pos = start[:, None] + jnp.arange(txt_len, dtype=jnp.float32)[None]
    return jnp.repeat(pos[..., None], 3, axis=-1)


def rope_angles(ids: jax.Array, axes_dims: Sequence[int], theta: float) -> jax.Array:
    """(B, S, 3) ids -> (B, S, head_dim/2) rotation angles in float32.

    Axis a contributes `axes_dims[a] / 2` frequencies `theta^(-2i/axes_dims[a])`, the
    angles of consecutive (interleaved) channel pairs, as FLUX's and Qwen-Image's RoPE do.
    """
    out = []
    for a, dim in enumerate(axes_dims):
        inv = layers.rope_frequencies(dim, theta)
        out.append(ids[..., a : a + 1].astype(jnp.float32) * inv)
    return jnp.concatenate(out, axis=-1)


def absolute_embedding(img_ids: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """(B, N, 3) position ids -> (B, N, dim) float32: half the features a sin-cos code of the
    row, half of the column (DiT's fixed 2-D embedding, on our ids: centred for Qwen-Image).
    A token at the same (row, col) in another segment gets the same code; RoPE's frame axis and
    the segment offsets still tell segments apart."""
    if dim % 4:
        raise ValueError(f"absolute position embedding: width {dim} must be a multiple of 4")
    quarter = dim // 4
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(quarter, dtype=jnp.float32) / quarter)
    parts = []
    for axis in (1, 2):  # row, col
        arg = img_ids[..., axis].astype(jnp.float32)[..., None] * freqs
        parts += [jnp.sin(arg), jnp.cos(arg)]
    return jnp.concatenate(parts, axis=-1)


def grid_neighbours(img_ids: jax.Array, num_target_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Each noisy-target token's 3x3 neighbourhood on the target's grid, from the position ids
    (for `MMDiTConfig.local_mixing`).

    Args:
      img_ids: (B, N, 3) `(frame, row, col)` ids of the image stream (integer-valued).
      num_target_tokens: the first that many tokens are the noisy target; the condition segments
        after them get no neighbours (they are clean images, and side by side under shifted 2-D
        positions their grids would touch).
    Returns:
      `(index (B, N, 9) int32, valid (B, N, 9) bool)`: for offset k = 3 * (dr + 1) + (dc + 1),
      `index[b, i, k]` is the target token at (row + dr, col + dc) of target token i (k = 4:
      itself), and `valid` is False where that place is off the grid and for condition tokens
      (the index is then 0 and unused).
    """
    ids = img_ids.astype(jnp.float32)
    target = ids[:, :num_target_tokens]
    is_target = (jnp.arange(ids.shape[1]) < num_target_tokens)[None, :, None]  # (1, N, 1)
    d_row = target[:, None, :, 1] - ids[:, :, None, 1]  # (B, N, N_target): row_j - row_i
    d_col = target[:, None, :, 2] - ids[:, :, None, 2]
    same_frame = target[:, None, :, 0] == ids[:, :, None, 0]
    index, valid = [], []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            hit = same_frame & (d_row == dr) & (d_col == dc) & is_target
            index.append(jnp.argmax(hit, axis=-1))
            valid.append(jnp.any(hit, axis=-1))
    return jnp.stack(index, axis=-1).astype(jnp.int32), jnp.stack(valid, axis=-1)
