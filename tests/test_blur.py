"""Blurring diffusion (`qk_jax/models/blur.py`): the blur against scipy's Gaussian filter, the sampler's
step for the blurred process (DDIM) against the plain Euler step and the process's closed form,
and the sampling loop with `model.blur` against a loop written out here."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
from scipy import ndimage

from qk_jax import flow_solvers
from qk_jax.models.blur import BlurConfig, blur_grid, frequency_scales
from qk_jax.sample import sample_loop

TINY_FLOOR = 1e-9  # min_scale small enough that the blur is the Gaussian's to float32 precision


def _scipy_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, C) blurred per channel with mirror (half-sample symmetric) boundaries; the kernel's
    tails are cut at 8 sigma (below float32 precision) and must fit in the picture."""
    assert 8 * sigma < min(x.shape[:2])
    return ndimage.gaussian_filter(x.astype(np.float64), (sigma, sigma, 0), mode="reflect", truncate=8.0)


def scipy_heat_blur(x: np.ndarray, sigma: float, min_scale: float) -> np.ndarray:
    """(H, W, C): the heat equation's blur by scipy's orthonormal DCT-II, exact at any size and sigma."""
    h, w = x.shape[:2]
    u, v = np.arange(h)[:, None] / h, np.arange(w)[None, :] / w
    d = (1 - min_scale) * np.exp(-0.5 * np.pi**2 * sigma**2 * (u**2 + v**2)) + min_scale
    coeffs = scipy.fft.dctn(x.astype(np.float64), type=2, norm="ortho", axes=(0, 1))
    return scipy.fft.idctn(coeffs * d[..., None], type=2, norm="ortho", axes=(0, 1))


def test_blur_is_a_gaussian_with_mirror_boundaries():
    cfg = BlurConfig(max_sigma=6.0, min_scale=TINY_FLOOR)
    x = np.random.default_rng(0).normal(size=(3, 56, 72, 3)).astype(np.float32)
    # From sigma ~ 1.5 pixels up a sampled Gaussian kernel (scipy's) is the heat equation's blur to
    # float32 precision; below, the kernel's sampling shows (the blur here is the continuous one).
    t = np.array([1.0, 0.5, 0.4], np.float32)
    out = np.asarray(blur_grid(jnp.asarray(x), jnp.asarray(t), cfg))
    for i in range(3):
        sigma = 6.0 * np.sin(np.pi * t[i] / 2) ** 2
        np.testing.assert_allclose(out[i], _scipy_blur(x[i], sigma), atol=2e-5)
    # On an autoencoder's latent grid of factor 3 the blur is max_sigma / 3 grid cells wide.
    lat = np.asarray(blur_grid(jnp.asarray(x[:1]), jnp.ones(1), cfg, pixel=3.0))
    np.testing.assert_allclose(lat[0], _scipy_blur(x[0], 2.0), atol=2e-5)
    # No blur at t = 0, none when off; a plain picture stays plain at every t.
    np.testing.assert_allclose(np.asarray(blur_grid(jnp.asarray(x), jnp.zeros(3), cfg)), x, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(blur_grid(jnp.asarray(x), jnp.asarray(t), BlurConfig())), x)
    plain = np.full((1, 16, 16, 3), 0.3, np.float32)
    np.testing.assert_allclose(np.asarray(blur_grid(jnp.asarray(plain), jnp.ones(1), cfg)), plain, atol=1e-6)
    # The floor keeps every frequency's scale at min_scale or above (B_t invertible).
    d = np.asarray(frequency_scales(jnp.ones(1), 16, 16, BlurConfig(max_sigma=50.0)))
    assert d.min() >= 0.001 - 1e-7 and abs(d[0, 0, 0] - 1.0) < 1e-6
    with pytest.raises(ValueError, match="max_sigma"):
        BlurConfig(max_sigma=-1.0)
    with pytest.raises(ValueError, match="min_scale"):
        BlurConfig(max_sigma=1.0, min_scale=0.0)


def _grid_degrade(cfg: BlurConfig, h: int, w: int):
    """B_s on (B, h * w, C) tokens laid out row by row."""

    def degrade(x, s):
        grid = x.reshape(x.shape[0], h, w, x.shape[-1])
        return blur_grid(grid, jnp.full((x.shape[0],), s), cfg).reshape(x.shape)

    return degrade


def test_blurred_step_is_euler_without_blur_and_keeps_the_process_with_an_exact_denoiser():
    sigmas, timesteps = flow_solvers.flow_schedule(6, flow_solvers.FlowMatchSchedule(shift=2.0))
    noise = jax.random.normal(jax.random.key(0), (2, 48, 3))

    def velocity(x, t):
        return -0.6 * x + 0.8 * jnp.sin(x) + t

    plain = flow_solvers.euler_sample(velocity, noise, sigmas, timesteps)
    identity = flow_solvers.euler_sample(velocity, noise, sigmas, timesteps, lambda x0, s: x0, min_t=0.0)
    np.testing.assert_allclose(identity, plain, rtol=1e-5, atol=1e-5)

    # A denoiser that knows the one picture x*: its velocity (x - x*) / t. Stepped by the blurred
    # sampler, every point of the trajectory is the process's own, (1 - s) B_s x* + s eps, with the
    # noise it started from.
    cfg = BlurConfig(max_sigma=4.0)
    degrade = _grid_degrade(cfg, 6, 8)
    x_star = jax.random.uniform(jax.random.key(1), (2, 48, 3), minval=-1, maxval=1)
    oracle = lambda x, t: (x - x_star) / jnp.maximum(t, 0.05)
    for stop in (2, 4):
        x = flow_solvers.euler_sample(oracle, noise, sigmas[: stop + 1], timesteps[:stop], degrade, min_t=0.05)
        s = float(sigmas[stop])
        np.testing.assert_allclose(x, (1 - s) * degrade(x_star, s) + s * noise, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="euler"):
        flow_solvers.sample(oracle, noise, sigmas, timesteps, "heun", degrade)


def test_sampling_loop_steps_the_blurred_process():
    """`sample_loop` with `model.blur`: every step is DDIM's for x_s = (1 - s) B_s x0 + s eps on the
    target's picture (the x0 model's clean estimate and implied noise, put together at the next
    sigma), written out here with scipy's DCT; it needs the target's size."""
    h, w, c = 4, 6, 3
    cfg = BlurConfig(max_sigma=3.0)

    class Model:
        config = types.SimpleNamespace(blur=cfg, min_t=0.05)

        @staticmethod
        def velocity(params, x, tokens, img_ids, cond, mask, t):
            return params["a"] * x + params["b"] * jnp.cos(x) + t[:, None, None]

        @staticmethod
        def degrade(params, x, t, height, width):
            grid = x.reshape(x.shape[0], height, width, x.shape[-1])
            return blur_grid(grid, t, cfg).reshape(x.shape)

        def degrader(self, params, height, width):
            return lambda x, s: self.degrade(params, x, jnp.full((x.shape[0],), s), height, width)

    params = {"a": jnp.float32(-0.5), "b": jnp.float32(0.7)}
    noise = jax.random.normal(jax.random.key(2), (2, h * w, c))
    sigmas, timesteps = flow_solvers.flow_schedule(5, flow_solvers.FlowMatchSchedule(shift=1.0))
    cond, mask, img_ids = jnp.zeros((2, 3, 8)), jnp.ones((2, 3), bool), jnp.zeros((2, h * w, 3))
    loop = jax.jit(sample_loop(Model(), "euler", False, False, "cfg", (h, w)))
    out = np.asarray(
        loop(params, noise, sigmas, timesteps, cond, mask, None, img_ids, jnp.float32(1.0), jnp.float32(1.0))
    )

    def scipy_degrade(x, s):
        grid = x.reshape(2, h, w, c)
        sigma = 3.0 * np.sin(np.pi * s / 2) ** 2
        return np.stack([scipy_heat_blur(g, sigma, cfg.min_scale) for g in grid]).reshape(x.shape)

    x = np.asarray(noise, np.float64)
    for i in range(5):
        t, s = float(sigmas[i]), float(sigmas[i + 1])
        v = np.asarray(
            Model.velocity(params, jnp.asarray(x, jnp.float32), None, None, None, None, jnp.full((2,), timesteps[i]))
        )
        x0 = x - max(t, 0.05) * v
        eps = (x - (1 - t) * scipy_degrade(x0, t)) / t
        x = (1 - s) * scipy_degrade(x0, s) + s * eps
    np.testing.assert_allclose(out, x, rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="image_size"):
        sample_loop(Model(), "euler", False, False, "cfg")
