"""Rotary embeddings of Qwen2.5-VL: M-RoPE for the decoder, 2D RoPE for the vision tower,
and the host-side position-id logic (a port of HF `Qwen2_5_VLModel.get_rope_index`).

M-RoPE gives every token three position ids (temporal, height, width). Text tokens
have the same id on all three axes (a plain 1D position); the merged tokens of an image
get `(start, start + row, start + col)`, and the text after an image continues at
`max(previous ids) + 1` on all three axes. The rotary frequencies are split into
chunks of `mrope_section` and chunk i takes its angle from axis `i % 3`.

Positions are computed on the host in numpy (they depend on where the image tokens
sit, which is data-dependent control flow) and passed to the jitted model as an int32
array `(3, B, T)`.

Continuing positions after a prompt (generation, or K appended query tokens): the
n-th appended token of row b sits at `max over the row's valid prompt positions + 1 + n`
on all three axes; `extend_position_ids` computes exactly that.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------- text M-RoPE


def mrope_cos_sin(
    position_ids: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for the decoder.

    Args:
      position_ids: (3, B, T) integer positions (temporal, height, width).
    Returns:
      cos, sin: (B, T, head_dim) float32 in the rotate-half layout (angles repeated twice).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # (hd/2,)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # (3, B, T, hd/2)
    bounds = np.cumsum([0, *mrope_section])
    chunks = [freqs[i % 3, ..., bounds[i] : bounds[i + 1]] for i in range(len(mrope_section))]
    freqs = jnp.concatenate(chunks, axis=-1)  # (B, T, hd/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of the vision tower's 2D rotary embedding.

    Args:
      positions: (N, 2) integer (row, col) patch coordinates.
    Returns:
      cos, sin: (N, head_dim) float32; the first quarter of the angles rotates with the
      row, the second with the column, and the half is repeated (rotate-half layout).
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))  # (hd/4,)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (N, 2, hd/4)
    freqs = freqs.reshape(freqs.shape[0], -1)  # [row angles, col angles]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# ------------------------------------------------------------- host position logic


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    attention_mask: np.ndarray | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """3D position ids for a batch of interleaved text/image sequences (HF `get_rope_index`).

    Args:
      input_ids: (B, T) token ids; each image is a run of `t*h*w / merge^2` image-pad
        tokens, images in the order of `image_grid_thw` across the whole batch.
      image_grid_thw: (N_img, 3) patch grids (temporal, height, width), or None.
      attention_mask: (B, T) 1 = token, 0 = padding (left or right), or None.
      image_token_id, spatial_merge_size: from the model config.
    Returns:
      position_ids: (3, B, T) int32; padding positions are 0, as in HF.
      rope_deltas: (B,) int32, `max position + 1 - number of valid tokens` (HF's
        `mrope_position_deltas`), so that generated token k of row b sits at
        `valid_len + k + delta` on all three axes.
    Raises:
      ValueError when the image tokens do not match `image_grid_thw`.
    """
    input_ids = np.asarray(input_ids)
    b, t = input_ids.shape
    mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in np.asarray(image_grid_thw)]
    next_grid = 0
    position_ids = np.zeros((3, b, t), np.int64)
    deltas = np.zeros((b,), np.int64)
    for row in range(b):
        ids = input_ids[row][mask[row]]
        is_image = ids == image_token_id
        pieces = []
        pos = 0
        i = 0
        while i < len(ids):
            if not is_image[i]:
                j = i
                while j < len(ids) and not is_image[j]:
                    j += 1
                pieces.append(np.broadcast_to(np.arange(j - i) + pos, (3, j - i)))
                pos += j - i
                i = j
                continue
            # An image: consume its grid's worth of tokens (adjacent images split correctly).
            if next_grid >= len(grids):
                raise ValueError(f"row {row} has more image-token runs than image_grid_thw has images ({len(grids)})")
            gt, gh, gw = grids[next_grid]
            next_grid += 1
            lh, lw = gh // spatial_merge_size, gw // spatial_merge_size
            n = gt * lh * lw
            if i + n > len(ids) or not is_image[i : i + n].all():
                raise ValueError(
                    f"row {row}: image {next_grid - 1} with grid {grids[next_grid - 1]} needs {n} "
                    f"consecutive image tokens (id {image_token_id}) at token {i}"
                )
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(lh), np.arange(lw), indexing="ij")
            pieces.append(np.stack([tt.ravel() + pos, hh.ravel() + pos, ww.ravel() + pos]))
            pos += max(lh, lw)
            i += n
        llm = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        position_ids[:, row, mask[row]] = llm
        deltas[row] = (llm.max() + 1 if llm.size else 0) - len(ids)
    if next_grid != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the input ids hold {next_grid}")
    return position_ids.astype(np.int32), deltas.astype(np.int32)


def extend_position_ids(position_ids: np.ndarray, attention_mask: np.ndarray | None, num_new: int) -> np.ndarray:
    """Positions of `num_new` tokens appended after each row's prompt: (3, B, num_new) int32.

    Text positions continue at `max(valid prompt positions) + 1` on all three axes, as
    HF does when it generates (and as appended kontext query tokens should).
    """
    pos = np.asarray(position_ids)
    if attention_mask is not None:
        pos = np.where(np.asarray(attention_mask).astype(bool)[None], pos, -1)
    start = pos.max(axis=(0, 2)) + 1  # (B,)
    new = start[:, None] + np.arange(num_new)[None, :]
    return np.broadcast_to(new[None], (3, *new.shape)).astype(np.int32)


def text_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions of a text-only batch: `cumsum(mask) - 1` on all three axes, 0 on padding."""
    mask = np.asarray(attention_mask).astype(np.int64)
    pos = np.where(mask > 0, np.cumsum(mask, axis=-1) - 1, 0)
    return np.broadcast_to(pos[None], (3, *pos.shape)).astype(np.int32)
