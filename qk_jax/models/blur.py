"""Blurring diffusion on the rectified-flow path: the clean picture is blurred as the noise grows.

    x_t = (1 - t) B_t x0 + t eps,      B_t: a Gaussian blur of standard deviation
                                            sigma_B(t) = max_sigma * sin^2(pi t / 2) pixels

(the forward process of Hoogeboom & Salimans, "Blurring Diffusion Models", ICLR 2023, with the
rectified-flow signal and noise scales). B_t is the heat equation's solution operator: with mirror
boundaries it is diagonal in the orthonormal 2-D DCT-II basis, frequency (u, v) of an H x W picture
scaled by

    d_t(u, v) = (1 - min_scale) exp(-pi^2 sigma_B(t)^2 (u^2 / H^2 + v^2 / W^2) / 2) + min_scale,

so B_0 is the identity and B_t stays invertible (`min_scale`, the paper's d_min). With
`max_sigma = 0` the process is plain rectified flow.

Why a generator wants it: in plain flow a picture's fine detail shows through the noise at every
noise level, so the denoiser learns to read detail from x_t wherever it is; started from pure noise,
it reads the sampler's own noise as detail and draws it (a mosaic of token-sized specks). Blurred,
x_t holds no detail finer than sigma_B(t) at any t: a denoiser learns that what is finer is noise,
and predicts detail from the coarse picture and the condition, which the training pairs then pay
for (a shape's identity is hidden from x_t until its blur is undone). The sampler's step for this
process is DDIM's (`flow_solvers.euler_sample` with `degrade`), which for max_sigma = 0 is the
plain Euler step.

Only the target's noising changes: the condition images of stage 3 stay clean.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.models.vae.pixel import dct_basis

Array = jax.Array
_EXACT = jax.lax.Precision.HIGHEST  # a blur is part of the data, not of the model


@dataclasses.dataclass(frozen=True)
class BlurConfig:
    """max_sigma: the blur's standard deviation at t = 1, in pixels of the picture (0 = off);
    min_scale: the floor of every frequency's scale (keeps B_t invertible)."""

    max_sigma: float = 0.0
    min_scale: float = 0.001

    def __post_init__(self):
        if not self.max_sigma >= 0:
            raise ValueError(f"model.blur.max_sigma={self.max_sigma}: expected 0 (off) or a blur in pixels")
        if not 0 < self.min_scale < 1:
            raise ValueError(f"model.blur.min_scale={self.min_scale}: expected a scale in (0, 1)")

    @property
    def enabled(self) -> bool:
        return self.max_sigma > 0

    def sigma(self, t: Array) -> Array:
        """The blur's standard deviation (pixels) at noise level t."""
        return self.max_sigma * jnp.sin(0.5 * jnp.pi * t) ** 2


def frequency_scales(t: Array, height: int, width: int, cfg: BlurConfig, pixel: float = 1.0) -> Array:
    """(B, H, W) d_t(u, v) for t (B,) on an H x W grid whose cells are `pixel` picture pixels wide
    (a latent grid of an autoencoder with factor f: pixel = f)."""
    u = np.arange(height, dtype=np.float32) / height
    v = np.arange(width, dtype=np.float32) / width
    lam = jnp.asarray(0.5 * np.pi**2 * (u[:, None] ** 2 + v[None, :] ** 2))  # per squared sigma (grid cells)
    s = (cfg.sigma(jnp.asarray(t, jnp.float32)) / pixel)[:, None, None]
    return (1.0 - cfg.min_scale) * jnp.exp(-lam[None] * s * s) + cfg.min_scale


def blur_grid(x: Array, t: Array, cfg: BlurConfig, pixel: float = 1.0) -> Array:
    """B_t of pictures or latent grids x (B, H, W, C), each channel on its own; t (B,)."""
    if not cfg.enabled:
        return x
    b, h, w, c = x.shape
    ch, cw = jnp.asarray(dct_basis(h, h)), jnp.asarray(dct_basis(w, w))
    xf = x.astype(jnp.float32)
    coeffs = jnp.einsum("uh,bhwc,vw->buvc", ch, xf, cw, precision=_EXACT)
    coeffs = coeffs * frequency_scales(t, h, w, cfg, pixel)[..., None]
    return jnp.einsum("uh,buvc,vw->bhwc", ch, coeffs, cw, precision=_EXACT).astype(x.dtype)
