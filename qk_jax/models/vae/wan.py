"""`AutoencoderKLQwenImage`: Qwen-Image's Wan-2.1 causal-conv VAE, for single frames, in Flax.

    vae = AutoencoderKLQwenImage(config)
    z = vae.apply({"params": p}, images, method=vae.encode)    # (B, H/8, W/8, z_dim) normalised
    x = vae.apply({"params": p}, z, method=vae.decode)         # (B, H, W, 3) clamped to [-1, 1]

Normalisation lives inside, per channel: `encode` returns `(z - latents_mean) / latents_std`
and `decode` undoes it first, as the Qwen-Image pipelines do around the diffusers VAE.
Like diffusers, `decode` clamps its output to [-1, 1]. `layers.py` explains why one frame
of a causal 3D conv is a 2D conv with the last temporal tap.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models.vae.layers import ChannelRMSNorm, Conv, WanAttentionBlock, WanMidBlock, WanResample, WanResidualBlock

Array = jax.Array

_QWEN_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
_QWEN_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)


@dataclasses.dataclass(frozen=True)
class QwenImageVAEConfig:
    """diffusers `AutoencoderKLQwenImage` config."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # (sic) diffusers' spelling
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple[float, ...] = _QWEN_MEAN
    latents_std: tuple[float, ...] = _QWEN_STD
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"QwenImageVAEConfig.temperal_downsample={self.temperal_downsample} needs "
                f"len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(
                    f"QwenImageVAEConfig.{name} has {len(getattr(self, name))} entries, z_dim={self.z_dim}"
                )
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.temperal_downsample)

    def normalize(self, z: Array) -> Array:
        return (z - jnp.asarray(self.latents_mean, z.dtype)) / jnp.asarray(self.latents_std, z.dtype)

    def denormalize(self, z: Array) -> Array:
        return z * jnp.asarray(self.latents_std, z.dtype) + jnp.asarray(self.latents_mean, z.dtype)


QWEN_VAE_SIZES: dict[str, QwenImageVAEConfig] = {
    "tiny": QwenImageVAEConfig(
        base_dim=8,
        z_dim=4,
        dim_mult=(1, 2, 2),
        num_res_blocks=1,
        temperal_downsample=(False, True),
        latents_mean=(0.1, -0.2, 0.3, 0.0),
        latents_std=(1.5, 0.8, 2.0, 1.0),
    ),
    "qwen_image": QwenImageVAEConfig(),
}


class WanEncoder(nn.Module):
    config: QwenImageVAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        dims = [cfg.base_dim * u for u in (1,) + cfg.dim_mult]
        x = Conv(dims[0], (3, 3, 3), name="conv_in", **kw)(x)
        k, scale = 0, 1.0
        for i, d_out in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks):
                x = WanResidualBlock(d_out, name=f"down_blocks_{k}", **kw)(x)
                k += 1
                if scale in cfg.attn_scales:
                    x = WanAttentionBlock(name=f"down_blocks_{k}", **kw)(x)
                    k += 1
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                x = WanResample(mode, name=f"down_blocks_{k}", **kw)(x)
                k += 1
                scale /= 2.0
        x = WanMidBlock(name="mid_block", **kw)(x)
        x = nn.silu(ChannelRMSNorm(name="norm_out", **kw)(x))
        return Conv(2 * cfg.z_dim, (3, 3, 3), name="conv_out", **kw)(x)


class _WanUpBlock(nn.Module):
    out_channels: int
    num_res_blocks: int
    upsample_mode: str | None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_res_blocks + 1):
            x = WanResidualBlock(self.out_channels, name=f"resnets_{j}", **kw)(x)
        if self.upsample_mode is not None:
            x = WanResample(self.upsample_mode, name="upsamplers_0", **kw)(x)
        return x


class WanDecoder(nn.Module):
    config: QwenImageVAEConfig

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        dims = [cfg.base_dim * u for u in (cfg.dim_mult[-1],) + cfg.dim_mult[::-1]]
        upsample = cfg.temperal_downsample[::-1]
        x = Conv(dims[0], (3, 3, 3), name="conv_in", **kw)(z)
        x = WanMidBlock(name="mid_block", **kw)(x)
        for i, d_out in enumerate(dims[1:]):
            mode = None
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if upsample[i] else "upsample2d"
            x = _WanUpBlock(d_out, cfg.num_res_blocks, mode, name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(ChannelRMSNorm(name="norm_out", **kw)(x))
        return Conv(cfg.input_channels, (3, 3, 3), name="conv_out", **kw)(x)


class AutoencoderKLQwenImage(nn.Module):
    """Qwen-Image VAE on single frames. Params: encoder, quant_conv, post_quant_conv, decoder."""

    config: QwenImageVAEConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        one = ((0, 0), (0, 0))
        self.encoder = WanEncoder(cfg)
        self.decoder = WanDecoder(cfg)
        self.quant_conv = Conv(2 * cfg.z_dim, (1, 1, 1), padding=one, **kw)
        self.post_quant_conv = Conv(cfg.z_dim, (1, 1, 1), padding=one, **kw)

    def encode_moments(self, images: Array) -> tuple[Array, Array]:
        """(B, H, W, 3) in [-1, 1] -> posterior (mean, logvar), each (B, H/8, W/8, z_dim), un-normalised."""
        h = self.quant_conv(self.encoder(images))
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images: Array, sample: bool = False, rng: Array | None = None) -> Array:
        """(B, H, W, 3) in [-1, 1] -> normalised latents: the posterior mean, or a sample with `rng`."""
        mean, logvar = self.encode_moments(images)
        z = mean
        if sample:
            if rng is None:
                raise ValueError("AutoencoderKLQwenImage.encode(sample=True) needs an rng key")
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return self.config.normalize(z)

    def decode_raw(self, z: Array) -> Array:
        """Un-normalised latents -> images clamped to [-1, 1] (diffusers `decode` of one frame)."""
        return jnp.clip(self.decoder(self.post_quant_conv(z)), -1.0, 1.0)

    def decode(self, latents: Array) -> Array:
        """Normalised latents (B, h, w, z_dim) -> images (B, 8h, 8w, 3) in [-1, 1]."""
        return self.decode_raw(self.config.denormalize(latents))

    def __call__(self, images: Array) -> Array:
        return self.decode(self.encode(images))
