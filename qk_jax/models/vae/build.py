"""Named sizes and builders for the two image VAEs: `AutoencoderKL` (FLUX / SD3) and
`AutoencoderKLQwenImage` (Qwen-Image, Wan-2.1 family).

Both expose the same methods, used through `apply(..., method=...)`:

- `encode(images (B, H, W, 3) in [-1, 1], sample=False, rng=None) -> normalised latents (B, h, w, C)`
- `decode(normalised latents) -> images (B, H, W, 3)`
- `encode_moments(images) -> (mean, logvar)` and `decode_raw(latents)` without normalisation.

Normalisation (FLUX scaling/shift, Qwen-Image per-channel mean/std) is inside
`encode`/`decode` for both, so the DiT only ever sees normalised latents.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models.vae.kl import KL_SIZES, AutoencoderKL, AutoencoderKLConfig
from qk_jax.models.vae.wan import QWEN_VAE_SIZES, AutoencoderKLQwenImage, QwenImageVAEConfig

VAEConfig = AutoencoderKLConfig | QwenImageVAEConfig


def vae_config(name: str, **overrides) -> VAEConfig:
    """`tiny`, `flux` (AutoencoderKL) or `qwen_image_tiny`, `qwen_image` (AutoencoderKLQwenImage)."""
    table = {
        **KL_SIZES,
        **{("qwen_image" if k == "qwen_image" else f"qwen_image_{k}"): v for k, v in QWEN_VAE_SIZES.items()},
    }
    if name not in table:
        raise ValueError(f"unknown VAE size {name!r}; known: {sorted(table)}")
    return dataclasses.replace(table[name], **overrides)


def build_vae(config: VAEConfig):
    """The Flax module for a VAE config."""
    if isinstance(config, AutoencoderKLConfig):
        return AutoencoderKL(config)
    if isinstance(config, QwenImageVAEConfig):
        return AutoencoderKLQwenImage(config)
    raise TypeError(f"not a VAE config: {type(config).__name__}")


def abstract_vae_params(config: VAEConfig, image_size: int = 16) -> Any:
    """ShapeDtypeStruct tree of a VAE's parameters (no allocation)."""
    model = build_vae(config)
    size = max(image_size, config.downsample_factor)
    x = jnp.zeros((1, size, size, 3))
    return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x)["params"]))


def vae_param_count(config: VAEConfig) -> int:
    return int(sum(x.size for x in jax.tree.leaves(abstract_vae_params(config))))
