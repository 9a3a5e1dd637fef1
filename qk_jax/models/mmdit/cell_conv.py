"""Convolutions at the latent-cell scale around the MMDiT (`MMDiTConfig.cell_conv_width`).

An image token is a p x p patch of latent cells (`positions.patchify`). The transformer mixes
tokens only through attention and maps each token to its p x p cells through one Dense
(`proj_out`), so nothing ties a cell to the cells of the next token: at small budgets the
demo's DiT draws per-token specks where a convolutional network of the same size lays out
object-sized blobs (BENCHMARKS.md, "Three more levers at the demo's budget, and a convolutional
reference"; what this option changes: "Convolutions at the cell scale"). U-ViT and HDiT put
convolutions at the finest scale around the transformer for this; here:

- `CellStem`: p 3x3 convolutions over the noisy target's latent cells (zero-padded at the
  grid's edges), the cells of each token then flattened and projected to the stream's width
  and added to `img_in`'s output; it also returns the cell features, the U-Net skip.
- `CellHead`: the stream's last target tokens widened to p x p cells of features, joined with
  the stem's skip, p 3x3 convolutions down to the output channels, packed back into tokens and
  added to `proj_out`'s output.

Both projections into the stream and out of it start at zero, so a DiT with the option starts
as the plain one. The token grid comes from the position ids (`positions.grid_neighbours`), so
any target size works without static shapes: before each convolution a token gathers a one-cell
border of its neighbours' cells (zero off the grid), and the unpadded 3x3 convolution gives back
its own p x p cells, so the stack equals the same convolutions zero-padded on the whole grid
(`tests/test_mmdit.py`). Condition segments (clean input images) enter through `img_in` alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models import layers

Array = jax.Array


def tokens_to_cells(tokens: Array, p: int) -> Array:
    """(B, N, C * p * p) tokens in `patchify`'s channel-major packing -> (B, N, p, p, C) cells."""
    b, n, f = tokens.shape
    return tokens.reshape(b, n, f // (p * p), p, p).transpose(0, 1, 3, 4, 2)


def cells_to_tokens(cells: Array) -> Array:
    """(B, N, p, p, C) cells -> (B, N, C * p * p) tokens in `patchify`'s packing."""
    b, n, p, _, c = cells.shape
    return cells.transpose(0, 1, 4, 2, 3).reshape(b, n, c * p * p)


def cell_halo(cells: Array, index: Array, valid: Array) -> Array:
    """Each token's cells with a one-cell border from its grid neighbours, zero off the grid.

    cells (B, N, p, p, C); index, valid (B, N, 9) from `positions.grid_neighbours` (offset
    k = 3 * (dr + 1) + (dc + 1)) -> (B, N, p + 2, p + 2, C): what one 3x3 convolution, zero-padded
    on the whole grid, reads to compute the token's own p x p cells.
    """
    b, n, p, _, c = cells.shape
    taken = jnp.take_along_axis(cells.reshape(b, n, 1, p * p * c), index[..., None], axis=1)  # (B, N, 9, p*p*C)
    taken = taken * valid.astype(cells.dtype)[..., None]
    window = taken.reshape(b, n, 3, 3, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, n, 3 * p, 3 * p, c)
    return window[:, :, p - 1 : 2 * p + 1, p - 1 : 2 * p + 1]


class GridCellConvs(nn.Module):
    """3x3 convolutions of widths `features` (SiLU between) over the cells of a token grid,
    zero-padded at its edges: (B, N, p, p, C) -> (B, N, p, p, features[-1]). Each layer reads its
    input's one-cell halo (`cell_halo`); the last layer's kernel starts at zero with `zero_last`."""

    features: tuple[int, ...]
    zero_last: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, cells: Array, index: Array, valid: Array) -> Array:
        b, n, p = cells.shape[:3]
        h = cells
        for i, width in enumerate(self.features):
            last = i == len(self.features) - 1
            init = nn.initializers.zeros if last and self.zero_last else nn.initializers.lecun_normal()
            window = cell_halo(h, index, valid)
            h = nn.Conv(
                width,
                (3, 3),
                padding="VALID",
                kernel_init=layers.logical(init, (None, None, None, None)),
                bias_init=layers.logical(nn.initializers.zeros, (None,)),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv_{i}",
            )(window.reshape(b * n, p + 2, p + 2, window.shape[-1])).reshape(b, n, p, p, width)
            if not last:
                h = nn.silu(h)
        return h


class CellStem(nn.Module):
    """Noisy target tokens (B, N_t, C * p * p) + their grid neighbours -> (embedding (B, N_t,
    inner_dim), zero at init; cell features (B, N_t, p, p, width), the head's skip)."""

    width: int
    inner_dim: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, index: Array, valid: Array) -> tuple[Array, Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch_size
        cells = nn.silu(GridCellConvs((self.width,) * p, name="convs", **kw)(tokens_to_cells(tokens, p), index, valid))
        b, n = tokens.shape[:2]
        embed = layers.Dense(
            self.inner_dim, axes=(None, "embed"), kernel_init=nn.initializers.zeros, name="proj", **kw
        )(cells.reshape(b, n, p * p * self.width))
        return embed, cells


class CellHead(nn.Module):
    """The stream's target tokens (B, N_t, D) (after the output norm), the stem's cells (B, N_t,
    p, p, width) and the grid neighbours -> an addition to `proj_out` (B, N_t, out_channels *
    p * p), zero at init."""

    width: int
    out_channels: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, skip: Array, index: Array, valid: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch_size
        b, n = x.shape[:2]
        up = layers.Dense(p * p * self.width, axes=("embed", None), name="up", **kw)(x).reshape(b, n, p, p, self.width)
        cells = jnp.concatenate([up, skip.astype(up.dtype)], axis=-1)
        widths = (self.width,) * (p - 1) + (self.out_channels,)
        return cells_to_tokens(GridCellConvs(widths, zero_last=True, name="convs", **kw)(cells, index, valid))
