"""Rectified flow for training: noising, velocity target, timestep sampling with shift, loss.

Convention (shared with the samplers and both diffusers pipelines): t in [0, 1] is the
noise fraction,

    x_t = (1 - t) * x0 + t * eps,        v* = dx_t/dt = eps - x0,

so t = 1 is pure noise and sampling integrates from t = 1 down to 0.

Timesteps are drawn uniform, logit-normal (SD3 / FLUX default) or with SD3's "mode"
density, then optionally shifted towards noise for large images. Every shift is the map

    t -> a t / (1 + (a - 1) t)

with `a` fixed ("static"), `sqrt(seq_len / base_seq_len)` (SD3's resolution rule, "sd3"),
or `exp(mu)` with mu linear in the token count (FLUX / diffusers' `calculate_shift`,
"dynamic"; `exponential_time_shift` is the exact diffusers formula).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

TIMESTEP_METHODS = ("logit_normal", "uniform", "mode")
SHIFT_MODES = ("none", "static", "sd3", "dynamic")


def _bcast(t: Array, like: Array) -> Array:
    """(B,) -> (B, 1, ..., 1) matching `like`'s rank."""
    return jnp.reshape(t, t.shape + (1,) * (like.ndim - t.ndim)).astype(like.dtype)


def noise_latents(x0: Array, noise: Array, t: Array) -> Array:
    """x_t = (1 - t) x0 + t eps, with t (B,) broadcast over the other axes of x0 (B, ...)."""
    tb = _bcast(t, x0)
    return (1.0 - tb) * x0 + tb * noise


def velocity_target(x0: Array, noise: Array) -> Array:
    """The flow-matching regression target eps - x0."""
    return noise - x0


# ------------------------------------------------------------------ shifts


def shift_timesteps(t, shift: float):
    """SD3 / FLUX shift `a t / (1 + (a - 1) t)` (a > 1 moves t towards noise). Works on numpy or jnp."""
    return shift * t / (1 + (shift - 1) * t)


def exponential_time_shift(t, mu: float, sigma: float = 1.0):
    """diffusers' `time_shift` ('exponential'): e^mu / (e^mu + (1/t - 1)^sigma)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def linear_time_shift(t, mu: float, sigma: float = 1.0):
    """diffusers' `time_shift` ('linear'): mu / (mu + (1/t - 1)^sigma)."""
    return mu / (mu + (1 / t - 1) ** sigma)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """diffusers' `calculate_shift`: mu linear in the image token count (base_shift at base_seq_len,
    max_shift at max_seq_len)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def sd3_resolution_shift(image_seq_len: int, base_seq_len: int = 4096) -> float:
    """SD3's resolution-dependent shift a = sqrt(m / n) (token counts; n = the base resolution's)."""
    return math.sqrt(image_seq_len / base_seq_len)


# ------------------------------------------------------------------ timestep sampling


@dataclasses.dataclass(frozen=True)
class TimestepConfig:
    """How training timesteps are drawn.

    method: "logit_normal" (sigmoid of N(logit_mean, logit_std)), "uniform", or "mode"
      (SD3's mode-centred density with `mode_scale`).
    shift: "none", "static" (a = static_shift), "sd3" (a = sqrt(seq_len / base_seq_len)),
      "dynamic" (FLUX: mu = calculate_shift(seq_len, base_seq_len, max_seq_len, base_shift,
      max_shift), t -> exponential_time_shift(t, mu)).
    high_noise_share: the share of the draws (each draw with this probability) replaced, after the
      shift, by t ~ U(high_noise_min, 1): the noise levels where sampling starts and a picture is
      decided, which the logit-normal draw almost never visits (the demo's: 0.03% above t = 0.98),
      without moving the rest of the draws away from the low noise levels as a larger shift does.
    """

    method: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: str = "dynamic"
    static_shift: float = 3.0
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    high_noise_share: float = 0.0
    high_noise_min: float = 0.9

    def __post_init__(self):
        if self.method not in TIMESTEP_METHODS:
            raise ValueError(f"TimestepConfig.method={self.method!r}; expected one of {TIMESTEP_METHODS}")
        if not 0.0 <= self.high_noise_share <= 1.0:
            raise ValueError(f"TimestepConfig.high_noise_share={self.high_noise_share}; expected a share in [0, 1]")
        if not 0.0 <= self.high_noise_min < 1.0:
            raise ValueError(f"TimestepConfig.high_noise_min={self.high_noise_min}; expected a value in [0, 1)")
        if self.shift not in SHIFT_MODES:
            raise ValueError(f"TimestepConfig.shift={self.shift!r}; expected one of {SHIFT_MODES}")

    def apply_shift(self, t, image_seq_len: int | None = None):
        """Shifts t (numpy or jnp) for an image of `image_seq_len` tokens."""
        if self.shift == "none":
            return t
        if self.shift == "static":
            return shift_timesteps(t, self.static_shift)
        if image_seq_len is None:
            raise ValueError(f"TimestepConfig.shift={self.shift!r} needs the image token count (image_seq_len)")
        if self.shift == "sd3":
            return shift_timesteps(t, sd3_resolution_shift(image_seq_len, self.base_seq_len))
        mu = calculate_shift(image_seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)
        return shift_timesteps(t, math.exp(mu))


def sample_timesteps(
    rng: Array, batch: int, config: TimestepConfig = TimestepConfig(), image_seq_len: int | None = None
) -> Array:
    """(B,) float32 training timesteps in [0, 1] drawn per `config`, shifted for `image_seq_len` tokens
    (then the `high_noise_share` of them redrawn in [high_noise_min, 1])."""
    k_draw, k_pick, k_high = jax.random.split(rng, 3) if config.high_noise_share else (rng, None, None)
    if config.method == "logit_normal":
        t = jax.nn.sigmoid(config.logit_mean + config.logit_std * jax.random.normal(k_draw, (batch,), jnp.float32))
    else:
        u = jax.random.uniform(k_draw, (batch,), jnp.float32)
        if config.method == "uniform":
            t = u
        else:  # SD3 "mode" sampling (diffusers' compute_density_for_timestep_sampling)
            t = 1 - u - config.mode_scale * (jnp.cos(jnp.pi * u / 2) ** 2 - 1 + u)
    t = jnp.clip(config.apply_shift(t, image_seq_len), 0.0, 1.0).astype(jnp.float32)
    if config.high_noise_share:
        high = jax.random.uniform(k_high, (batch,), jnp.float32, config.high_noise_min, 1.0)
        t = jnp.where(jax.random.bernoulli(k_pick, config.high_noise_share, (batch,)), high, t)
    return t


# ------------------------------------------------------------------ loss


def flow_loss(pred: Array, target: Array, token_mask: Array | None = None, weights: Array | None = None) -> Array:
    """Mean squared error over features and valid tokens.

    Args:
      pred, target: (B, N, C) velocity prediction / target on the target tokens.
      token_mask: (B, N) bool or 0/1, True for tokens that count (e.g. real, non-padded
        target tokens); None counts all.
      weights: (B,) per-sample loss weights; None = 1.
    Returns:
      scalar float32: sum over valid tokens of mean_C (pred - target)^2 * w_b, divided by
      the number of valid tokens.
    """
    se = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)  # (B, N)
    mask = jnp.ones(se.shape, jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    if weights is not None:
        se = se * weights.astype(jnp.float32)[:, None]
    return jnp.sum(se * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def training_inputs(
    rng: Array, x0: Array, config: TimestepConfig = TimestepConfig(), image_seq_len: int | None = None
) -> dict[str, Any]:
    """One rectified-flow training draw for clean latents/tokens x0 (B, ...).

    Returns {"xt", "t" (B,), "target", "noise"}; `image_seq_len` defaults to x0.shape[1]
    (the token count when x0 is (B, N, C) tokens).
    """
    k_t, k_n = jax.random.split(rng)
    noise = jax.random.normal(k_n, x0.shape, x0.dtype)
    seq = x0.shape[1] if image_seq_len is None and x0.ndim == 3 else image_seq_len
    t = sample_timesteps(k_t, x0.shape[0], config, seq)
    return {"xt": noise_latents(x0, noise, t), "t": t, "target": velocity_target(x0, noise), "noise": noise}
