"""`AutoencoderKL`: the FLUX / SD3 image VAE (diffusers `AutoencoderKL`) in Flax.

    vae = AutoencoderKL(config)
    z = vae.apply({"params": p}, images, sample=False, method=vae.encode)   # (B, H/8, W/8, C) normalised
    x = vae.apply({"params": p}, z, method=vae.decode)                      # (B, H, W, 3) in ~[-1, 1]

Normalisation lives inside: `encode` returns `(z - shift_factor) * scaling_factor` (what
the DiT sees), `decode` undoes it first — the same arithmetic the FLUX pipeline does
around the diffusers VAE. `encode_moments` / `decode_raw` give the un-normalised
posterior and decoder for parity checks. Images are NHWC in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models.vae.layers import Conv, GroupNorm, MidBlock2D, ResnetBlock2D, upsample_nearest

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers `AutoencoderKL` config (DownEncoderBlock2D / UpDecoderBlock2D layout, SiLU)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float | None = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    sample_size: int = 1024
    force_upcast: bool = True
    # kept for config.json round trips; the FLUX/SD3 pipelines normalise with scaling/shift only
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"AutoencoderKLConfig.block_out_channels={self.block_out_channels}: {c} is not "
                    f"divisible by norm_num_groups={self.norm_num_groups}"
                )
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def normalize(self, z: Array) -> Array:
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def denormalize(self, z: Array) -> Array:
        return z / self.scaling_factor + (self.shift_factor or 0.0)


KL_SIZES: dict[str, AutoencoderKLConfig] = {
    "tiny": AutoencoderKLConfig(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32
    ),
    "flux": AutoencoderKLConfig(),
}


class KLEncoder(nn.Module):
    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        g = cfg.norm_num_groups
        x = Conv(cfg.block_out_channels[0], name="conv_in", **kw)(x)
        for i, ch in enumerate(cfg.block_out_channels):
            last = i == len(cfg.block_out_channels) - 1
            x = _ResnetStack(ch, cfg.layers_per_block, g, None if last else "down", name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock2D(g, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        x = nn.silu(GroupNorm(g, 1e-6, name="conv_norm_out", **kw)(x))
        return Conv(2 * cfg.latent_channels, name="conv_out", **kw)(x)


class _ResnetStack(nn.Module):
    """`num_layers` resnet blocks then an optional resampler: diffusers' `DownEncoderBlock2D`
    (`resample="down"`, params `downsamplers_0/conv`) or `UpDecoderBlock2D` (`"up"`, `upsamplers_0/conv`)."""

    out_channels: int
    num_layers: int
    groups: int
    resample: str | None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, name=f"resnets_{j}", **kw)(x)
        if self.resample is not None:
            x = _Resample(self.out_channels, down=self.resample == "down", name=f"{self.resample}samplers_0", **kw)(x)
        return x


class _Resample(nn.Module):
    """diffusers `Downsample2D` (pad right/bottom by one, stride-2 3x3 conv) or `Upsample2D`
    (nearest 2x, 3x3 conv); params under `{down,up}samplers_0/conv`."""

    out_channels: int
    down: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.down:
            return Conv(self.out_channels, (3, 3), (2, 2), ((0, 1), (0, 1)), name="conv", **kw)(x)
        return Conv(self.out_channels, name="conv", **kw)(upsample_nearest(x))


class KLDecoder(nn.Module):
    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        g = cfg.norm_num_groups
        chans = list(reversed(cfg.block_out_channels))
        x = Conv(chans[0], name="conv_in", **kw)(z)
        x = MidBlock2D(g, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        for i, ch in enumerate(chans):
            last = i == len(chans) - 1
            x = _ResnetStack(ch, cfg.layers_per_block + 1, g, None if last else "up", name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(GroupNorm(g, 1e-6, name="conv_norm_out", **kw)(x))
        return Conv(cfg.out_channels, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """FLUX/SD3 VAE. Params: encoder, decoder, quant_conv / post_quant_conv (when configured)."""

    config: AutoencoderKLConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.encoder = KLEncoder(cfg)
        self.decoder = KLDecoder(cfg)
        one = ((0, 0), (0, 0))
        self.quant_conv = Conv(2 * cfg.latent_channels, (1, 1), padding=one, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv(cfg.latent_channels, (1, 1), padding=one, **kw) if cfg.use_post_quant_conv else None

    def encode_moments(self, images: Array) -> tuple[Array, Array]:
        """(B, H, W, 3) in [-1, 1] -> posterior (mean, logvar), each (B, H/f, W/f, C), un-normalised."""
        h = self.encoder(images)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images: Array, sample: bool = False, rng: Array | None = None) -> Array:
        """(B, H, W, 3) in [-1, 1] -> normalised latents (B, H/f, W/f, C): the posterior mean, or a
        sample from it when `sample` (needs `rng`)."""
        mean, logvar = self.encode_moments(images)
        z = mean
        if sample:
            if rng is None:
                raise ValueError("AutoencoderKL.encode(sample=True) needs an rng key")
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return self.config.normalize(z)

    def decode_raw(self, z: Array) -> Array:
        """Un-normalised latents -> images (diffusers `AutoencoderKL.decode`)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, latents: Array) -> Array:
        """Normalised latents (B, h, w, C) -> images (B, h*f, w*f, 3)."""
        return self.decode_raw(self.config.denormalize(latents))

    def __call__(self, images: Array) -> Array:
        """Round trip (used by `init`): decode(encode(images))."""
        return self.decode(self.encode(images))
