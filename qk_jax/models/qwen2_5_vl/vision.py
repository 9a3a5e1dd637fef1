"""The Qwen2.5-VL vision tower: 3D-conv patch embedding, window/full attention blocks with
2D RoPE, and the spatial patch merger.

Two layouts of the same computation (same parameters, same outputs):

- flat (HF's): `pixel_values` (N, C*Tp*P*P), all images of a batch one after the other in
  merge-block order, as the HF processor emits them. The tower treats the N patches as
  one sequence; which patches may attend to which is given by the segment ids of the
  host-built `VisionPlan` over all images (`build_vision_plan`). Attention is (N, N):
  quadratic in the batch, replicated across devices. Any mix of grids; the parity path.
- batched: `pixel_values` (I, P, C*Tp*P*P), I images that share one grid (Query-Kontext
  batches are bucketed so that they do), with the plan of ONE image (`build_image_plan`,
  fields of shape (P,)). Every image is its own sequence of P patches: attention is
  (I, P, P), and the image axis is split over the data-parallel mesh axes like a batch.

Both are one code path: the flat layout is the batched one with I = 1.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models import layers
from qk_jax.models.qwen2_5_vl.common import GatedMLP
from qk_jax.models.qwen2_5_vl.config import VisionConfig
from qk_jax.models.qwen2_5_vl.rope import vision_cos_sin
from qk_jax.models.qwen2_5_vl.vision_plan import VisionPlan

Dtype = Any


def _images_axis(x: jax.Array) -> str | None:
    """The logical axis of the image dimension: split like a batch, except for a single
    sequence (the flat layout), which a constraint would only pad onto idle devices."""
    return "act_batch" if x.shape[0] > 1 else None


class FusedQKV(nn.Module):
    """HF's fused q/k/v projection, stored as a (D, 3, D) kernel so that the heads axis can
    be sharded without cutting across q, k and v. (..., D) -> (..., 3, D)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        kernel = self.param(
            "kernel",
            layers.logical(layers.default_kernel_init, ("vision_embed", "qkv", "heads")),
            (d, 3, d),
            self.param_dtype,
        )
        bias = self.param(
            "bias", layers.logical(nn.initializers.zeros_init(), ("qkv", "heads")), (3, d), self.param_dtype
        )
        return jnp.einsum("...d,dke->...ke", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class VisionAttention(nn.Module):
    """Bidirectional attention restricted to equal segment ids, with 2D RoPE, over each of
    I sequences: x (I, N, D), cos/sin (N, head_dim), segments (N,) -> (I, N, D)."""

    cfg: VisionConfig
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, segments):
        i, n, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, hd = self.cfg.num_heads, self.cfg.head_dim
        qkv = FusedQKV(name="qkv", **kw)(x)
        q, k, v = (layers.checkpoint_name(qkv[:, :, j], f"attn_{c}").reshape(i, n, h, hd) for j, c in enumerate("qkv"))
        q = layers.apply_rotary_half(q, cos[None, :, None, :], sin[None, :, None, :])
        k = layers.apply_rotary_half(k, cos[None, :, None, :], sin[None, :, None, :])
        q = layers.constrain(q, (_images_axis(q), "act_length", "act_heads", None))
        if self.attention_impl == "splash":
            ids = jnp.broadcast_to(segments.astype(jnp.int32), (i, n))
            mask = layers.SegmentMask(ids, ids)
        else:
            mask = (segments[:, None] == segments[None, :])[None, None]  # (1, 1, N, N)
        out = layers.dot_product_attention(q, k, v, mask, impl=self.attention_impl)
        out = layers.checkpoint_name(out.reshape(i, n, d), "attn_out")
        return layers.Dense(d, axes=("heads", "vision_embed"), name="proj", **kw)(out)


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
        x = x + GatedMLP(
            self.cfg.intermediate_size, self.cfg.hidden_act, use_bias=True, embed_axis="vision_embed", name="mlp", **kw
        )(h)
        return layers.constrain(x, (_images_axis(x), "act_length", "act_embed")), None


class PatchMerger(nn.Module):
    """RMSNorm, then each `merge_unit` consecutive patches concatenated and mapped through a
    GELU MLP to the LM width. (I, N, D) -> (I, N / merge_unit, out_hidden_size)."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = self.cfg.hidden_size * self.cfg.merge_unit
        x = layers.RMSNorm(self.cfg.rms_norm_eps, name="ln_q", **kw)(x).reshape(x.shape[0], -1, width)
        x = layers.Dense(width, axes=("vision_embed", "mlp"), name="fc1", **kw)(x)
        x = jax.nn.gelu(x, approximate=False)
        return layers.Dense(self.cfg.out_hidden_size, axes=("mlp", "embed"), name="fc2", **kw)(x)


class PatchEmbed(nn.Module):
    """HF's Conv3d with kernel == stride, i.e. a matmul over each flattened patch.
    (..., C*Tp*P*P) -> (..., D). The kernel keeps the flax conv layout (Tp, P, P, C, D) so
    that weight conversion is a plain permute."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.cfg
        if pixel_values.shape[-1] != c.patch_dim:
            raise ValueError(
                f"pixel_values has shape {pixel_values.shape}; the vision config expects "
                f"(..., in_channels*temporal_patch_size*patch_size**2 = {c.patch_dim})"
            )
        # (logical names must be unique per array: the patch width axis is left unnamed)
        kernel = self.param(
            "kernel",
            layers.logical(layers.default_kernel_init, ("conv_kernel", "patch", None, "in_channels", "vision_embed")),
            (c.temporal_patch_size, c.patch_size, c.patch_size, c.in_channels, c.hidden_size),
            self.param_dtype,
        )
        patches = pixel_values.reshape(
            *pixel_values.shape[:-1], c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size
        )
        return jnp.einsum("...ctpq,tpqcd->...d", patches.astype(self.dtype), kernel.astype(self.dtype))


class VisionTower(nn.Module):
    """Patches + VisionPlan -> merged image embeddings, in the original (processor) order
    of each image's tokens (see the module docstring for the two layouts):

      flat:    pixel_values (N, C*Tp*P*P), plan over all images -> (N / merge_unit, D_out)
      batched: pixel_values (I, P, C*Tp*P*P), plan of one image -> (I, P / merge_unit, D_out)
    """

    cfg: VisionConfig
    attention_impl: str = "xla"
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, plan: VisionPlan) -> jax.Array:
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batched = pixel_values.ndim == 3
        if pixel_values.ndim not in (2, 3):
            raise ValueError(
                f"pixel_values has shape {pixel_values.shape}; expected (num_patches, patch_dim) or "
                "(num_images, patches_per_image, patch_dim)"
            )
        x = pixel_values if batched else pixel_values[None]
        i, n = x.shape[:2]
        if plan.window_segments.shape[-1] != n:
            raise ValueError(
                f"the vision plan covers {plan.window_segments.shape[-1]} patches but pixel_values has "
                f"{n} per sequence (shape {pixel_values.shape}); batched pixel_values (I, P, D) take the "
                "plan of one image (build_image_plan)"
            )
        x = PatchEmbed(c, name="patch_embed", **kw)(x)  # (I, N, D)
        # Window order: permute whole merge units.
        x = x.reshape(i, n // c.merge_unit, c.merge_unit, -1)[:, plan.window_index].reshape(i, n, -1)
        x = layers.constrain(x, (_images_axis(x), "act_length", "act_embed"))
        cos, sin = vision_cos_sin(plan.positions, c.head_dim, c.rope_theta)
        is_full = jnp.asarray([j in c.fullatt_block_indexes for j in range(c.depth)])
        blocks = layers.scan_layers(
            VisionBlock, c.depth, self.remat, in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0)
        )
        x, _ = blocks(c, self.attention_impl, name="blocks", **kw)(
            x, cos, sin, plan.window_segments, plan.full_segments, is_full
        )
        merged = PatchMerger(c, name="merger", **kw)(x)[:, plan.reverse_index]  # (I, U, D_out)
        return merged if batched else merged[0]
