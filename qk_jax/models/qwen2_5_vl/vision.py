"""The Qwen2.5-VL vision tower: 3D-conv patch embedding, window/full attention blocks with
2D RoPE, and the spatial patch merger.

Images arrive flattened as the HF processor emits them: `pixel_values` (N, C*Tp*P*P) for
all images of a batch one after the other, in merge-block order. The tower treats the
N patches as one sequence; which patches may attend to which is given by the segment
ids of the host-built `VisionPlan` (see `vision_plan.py`), so the compiled program is the
same for every batch of the same patch count.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models import layers
from qk_jax.models.qwen2_5_vl.common import GatedMLP, scan_layers
from qk_jax.models.qwen2_5_vl.config import VisionConfig
from qk_jax.models.qwen2_5_vl.rope import vision_cos_sin
from qk_jax.models.qwen2_5_vl.vision_plan import VisionPlan

Dtype = Any


class FusedQKV(nn.Module):
    """HF's fused q/k/v projection, stored as a (D, 3, D) kernel so that the heads axis can
    be sharded without cutting across q, k and v. (N, D) -> (N, 3, D)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        kernel = self.param("kernel", layers.logical(layers.default_kernel_init, ("vision_embed", "qkv", "heads")),
                            (d, 3, d), self.param_dtype)
        bias = self.param("bias", layers.logical(nn.initializers.zeros_init(), ("qkv", "heads")), (3, d),
                          self.param_dtype)
        return jnp.einsum("nd,dke->nke", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class VisionAttention(nn.Module):
    """Bidirectional attention restricted to equal segment ids, with 2D RoPE. (N, D) -> (N, D)."""

    cfg: VisionConfig
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, segments):
        n, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, hd = self.cfg.num_heads, self.cfg.head_dim
        qkv = FusedQKV(name="qkv", **kw)(x)
        q, k, v = (qkv[:, i].reshape(n, h, hd) for i in range(3))
        q = layers.apply_rotary_half(q, cos[:, None, :], sin[:, None, :])
        k = layers.apply_rotary_half(k, cos[:, None, :], sin[:, None, :])
        mask = (segments[:, None] == segments[None, :])[None, None]  # (1, 1, N, N)
        out = layers.dot_product_attention(q[None], k[None], v[None], mask, impl=self.attention_impl)
        return layers.Dense(d, axes=("heads", "vision_embed"), name="proj", **kw)(out.reshape(n, d))


class VisionBlock(nn.Module):
    """Pre-norm attention + gated MLP; `is_full` picks full or windowed segments (scanned)."""

    cfg: VisionConfig
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, window_segments, full_segments, is_full):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        segments = jnp.where(is_full, full_segments, window_segments)
        h = layers.RMSNorm(self.cfg.rms_norm_eps, name="norm1", **kw)(x)
        x = x + VisionAttention(self.cfg, self.attention_impl, name="attn", **kw)(h, cos, sin, segments)
        h = layers.RMSNorm(self.cfg.rms_norm_eps, name="norm2", **kw)(x)
        x = x + GatedMLP(self.cfg.intermediate_size, self.cfg.hidden_act, use_bias=True, embed_axis="vision_embed",
                         name="mlp", **kw)(h)
        return layers.constrain(x, ("act_length", "act_embed")), None


class PatchMerger(nn.Module):
    """RMSNorm, then each `merge_unit` consecutive patches concatenated and mapped through a
    GELU MLP to the LM width. (N, D) -> (N / merge_unit, out_hidden_size)."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = self.cfg.hidden_size * self.cfg.merge_unit
        x = layers.RMSNorm(self.cfg.rms_norm_eps, name="ln_q", **kw)(x).reshape(-1, width)
        x = layers.Dense(width, axes=("vision_embed", "mlp"), name="fc1", **kw)(x)
        x = jax.nn.gelu(x, approximate=False)
        return layers.Dense(self.cfg.out_hidden_size, axes=("mlp", "embed"), name="fc2", **kw)(x)


class PatchEmbed(nn.Module):
    """HF's Conv3d with kernel == stride, i.e. a matmul over each flattened patch.
    (N, C*Tp*P*P) -> (N, D). The kernel keeps the flax conv layout (Tp, P, P, C, D) so that
    weight conversion is a plain permute."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.cfg
        if pixel_values.ndim != 2 or pixel_values.shape[-1] != c.patch_dim:
            raise ValueError(f"pixel_values has shape {pixel_values.shape}; the vision config expects "
                             f"(num_patches, in_channels*temporal_patch_size*patch_size**2 = {c.patch_dim})")
        # (logical names must be unique per array: the patch width axis is left unnamed)
        kernel = self.param(
            "kernel", layers.logical(layers.default_kernel_init,
                                     ("conv_kernel", "patch", None, "in_channels", "vision_embed")),
            (c.temporal_patch_size, c.patch_size, c.patch_size, c.in_channels, c.hidden_size), self.param_dtype)
        patches = pixel_values.reshape(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        return jnp.einsum("nctpq,tpqcd->nd", patches.astype(self.dtype), kernel.astype(self.dtype))


class VisionTower(nn.Module):
    """pixel_values (N, C*Tp*P*P) + VisionPlan -> merged image embeddings (N / merge_unit, D_out),
    in the original (processor) order of the images and their tokens."""

    cfg: VisionConfig
    attention_impl: str = "xla"
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, plan: VisionPlan) -> jax.Array:
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = pixel_values.shape[0]
        x = PatchEmbed(c, name="patch_embed", **kw)(pixel_values)
        # Window order: permute whole merge units.
        x = x.reshape(n // c.merge_unit, c.merge_unit, -1)[plan.window_index].reshape(n, -1)
        cos, sin = vision_cos_sin(plan.positions, c.head_dim, c.rope_theta)
        is_full = jnp.asarray([i in c.fullatt_block_indexes for i in range(c.depth)])
        blocks = scan_layers(VisionBlock, c.depth, self.remat,
                             in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0))
        x, _ = blocks(c, self.attention_impl, name="blocks", **kw)(
            x, cos, sin, plan.window_segments, plan.full_segments, is_full)
        merged = PatchMerger(c, name="merger", **kw)(x)
        return merged[plan.reverse_index]
