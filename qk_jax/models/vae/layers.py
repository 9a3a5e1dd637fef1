"""Convolutional building blocks of the two VAEs (NHWC activations, float32 norms).

Module names follow diffusers' module paths with `.N` turned into `_N` (`down_blocks_0`,
`resnets_1`, `to_out_0`), so the converters map names mechanically
(`convert/vae_kl.py`, `convert/vae_qwen_image.py`).

The Qwen-Image (Wan-2.1) VAE is a *video* VAE built from causal 3D convolutions. For a
single frame its first (and only) causal chunk sees two zero frames of padding before
the image, so a 3x3x3 causal conv is exactly a 2D conv with the kernel's last temporal
tap. We keep the whole 3D kernels (and the unused temporal `time_conv` weights) in the
tree, so an exported folder is the complete video VAE again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models import layers

Array = jax.Array
_CONV_INIT = nn.initializers.lecun_normal()


def _conv_axes(ndim_kernel: int) -> tuple[str | None, ...]:
    # A logical name may appear once per array (flax rejects repeats when mapping to the
    # mesh): the first tap axis is named, the others are unnamed (never sharded either way).
    return ("conv_kernel",) + (None,) * (ndim_kernel - 1) + ("conv_in", "conv_out")


class Conv(nn.Module):
    """2D convolution on NHWC with logical axes; `kernel` (kh, kw, I, O) or, with a 3-entry
    `kernel_size`, a causal 3D kernel (kt, kh, kw, I, O) applied to a single frame (last tap).

    `padding`: ((top, bottom), (left, right)).
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: Sequence[tuple[int, int]] = ((1, 1), (1, 1))
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ks = tuple(self.kernel_size)
        kernel = self.param(
            "kernel",
            layers.logical(_CONV_INIT, _conv_axes(len(ks))),
            ks + (x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias", layers.logical(nn.initializers.zeros_init(), ("conv_out",)), (self.features,), self.param_dtype
        )
        if len(ks) == 3:
            kernel = kernel[-1]  # causal time padding of 2 zero frames: only the last tap sees the frame
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            tuple(self.strides),
            tuple(tuple(p) for p in self.padding),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias.astype(self.dtype)


class ConvParams(nn.Module):
    """Declares a conv's `kernel` / `bias` without using them (the video VAE's temporal convs)."""

    features: int
    in_features: int
    kernel_size: Sequence[int]
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> None:
        ks = tuple(self.kernel_size)
        self.param(
            "kernel",
            layers.logical(_CONV_INIT, _conv_axes(len(ks))),
            ks + (self.in_features, self.features),
            self.param_dtype,
        )
        self.param(
            "bias", layers.logical(nn.initializers.zeros_init(), ("conv_out",)), (self.features,), self.param_dtype
        )


class GroupNorm(nn.Module):
    """torch `GroupNorm` on NHWC in float32: statistics over (H, W, C/G) per group; `scale`, `bias` (C,)."""

    num_groups: int = 32
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by {self.num_groups} groups")
        f32 = jnp.promote_types(x.dtype, jnp.float32)  # at least float32 (float64 stays float64)
        xg = x.astype(f32).reshape(b, h, w, self.num_groups, c // self.num_groups)
        mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        scale = self.param("scale", layers.logical(nn.initializers.ones_init(), ("norm",)), (c,), self.param_dtype)
        bias = self.param("bias", layers.logical(nn.initializers.zeros_init(), ("norm",)), (c,), self.param_dtype)
        return (y * scale.astype(f32) + bias.astype(f32)).astype(self.dtype)


class ChannelRMSNorm(nn.Module):
    """Wan's `RMS_norm`: `x / max(||x||_2, 1e-12) * sqrt(C) * gamma` over channels (float32)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        f32 = jnp.promote_types(x.dtype, jnp.float32)
        x32 = x.astype(f32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, 1e-12) * (c**0.5)
        gamma = self.param("gamma", layers.logical(nn.initializers.ones_init(), ("norm",)), (c,), self.param_dtype)
        return (y * gamma.astype(f32)).astype(self.dtype)


def spatial_attention(q: Array, k: Array, v: Array) -> Array:
    """Single-head attention over all pixels: (B, H, W, C) x3 -> (B, H, W, C)."""
    b, h, w, c = q.shape
    flat = lambda t: t.reshape(b, h * w, 1, c)
    return layers.dot_product_attention(flat(q), flat(k), flat(v)).reshape(b, h, w, c)


def upsample_nearest(x: Array, factor: int = 2) -> Array:
    """Nearest-neighbour upsampling of (B, H, W, C) by an integer factor (= torch 'nearest' / 'nearest-exact')."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


# ----------------------------------------------------------------- AutoencoderKL blocks


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` without time embedding: GN-SiLU-conv x2 plus a 1x1 shortcut when widths differ."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = Conv(self.out_channels, name="conv1", **kw)(h)
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
        h = Conv(self.out_channels, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1), padding=((0, 0), (0, 0)), name="conv_shortcut", **kw)(x)
        return x + h


class AttentionBlock2D(nn.Module):
    """The VAE mid-block attention (diffusers `Attention`, one head, GroupNorm, residual)."""

    groups: int = 32
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        h = GroupNorm(self.groups, self.eps, name="group_norm", **kw)(x)
        dense = lambda name: layers.Dense(c, axes=("conv_in", "conv_out"), name=name, **kw)
        out = spatial_attention(dense("to_q")(h), dense("to_k")(h), dense("to_v")(h))
        return x + dense("to_out_0")(out)


class MidBlock2D(nn.Module):
    """resnet, (attention), resnet at the lowest resolution."""

    groups: int = 32
    add_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = AttentionBlock2D(self.groups, name="attentions_0", **kw)(x)
        return ResnetBlock2D(c, self.groups, name="resnets_1", **kw)(x)


# ----------------------------------------------------------------- Wan (Qwen-Image) blocks


class WanResidualBlock(nn.Module):
    """Wan residual block on one frame: RMS-SiLU-causal conv x2, 1x1 causal shortcut when widths differ."""

    out_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(ChannelRMSNorm(name="norm1", **kw)(x))
        h = Conv(self.out_channels, (3, 3, 3), name="conv1", **kw)(h)
        h = nn.silu(ChannelRMSNorm(name="norm2", **kw)(h))
        h = Conv(self.out_channels, (3, 3, 3), name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1, 1), padding=((0, 0), (0, 0)), name="conv_shortcut", **kw)(x)
        return x + h


class WanAttentionBlock(nn.Module):
    """Wan single-head spatial self-attention (per frame): RMS norm, 1x1 qkv conv, 1x1 output conv, residual."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        h = ChannelRMSNorm(name="norm", **kw)(x)
        q, k, v = jnp.split(Conv(3 * c, (1, 1), padding=((0, 0), (0, 0)), name="to_qkv", **kw)(h), 3, axis=-1)
        out = spatial_attention(q, k, v)
        return x + Conv(c, (1, 1), padding=((0, 0), (0, 0)), name="proj", **kw)(out)


class WanResample(nn.Module):
    """Wan resampling on one frame. `mode`: downsample2d/3d (pad right/bottom, 3x3 stride-2 conv) or
    upsample2d/3d (nearest 2x, 3x3 conv to half the channels). The 3d modes' temporal convs are
    declared (for the checkpoint) but a single frame never uses them — nor does diffusers on its
    first chunk."""

    mode: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        if self.mode.startswith("downsample"):
            x = Conv(c, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), name="resample_1", **kw)(x)
            if self.mode == "downsample3d":
                ConvParams(c, c, (3, 1, 1), self.param_dtype, name="time_conv")()
            return x
        if self.mode.startswith("upsample"):
            x = Conv(c // 2, (3, 3), name="resample_1", **kw)(upsample_nearest(x))
            if self.mode == "upsample3d":
                ConvParams(2 * c, c, (3, 1, 1), self.param_dtype, name="time_conv")()
            return x
        raise ValueError(f"WanResample: unknown mode {self.mode!r}")


class WanMidBlock(nn.Module):
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = WanResidualBlock(c, name="resnets_0", **kw)(x)
        x = WanAttentionBlock(name="attentions_0", **kw)(x)
        return WanResidualBlock(c, name="resnets_1", **kw)(x)
