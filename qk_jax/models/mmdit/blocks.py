"""MMDiT building blocks: timestep embedding, AdaLN-zero modulation, double- and
single-stream blocks with joint attention, QK RMSNorm and 3-axis RoPE.

Block parameter layout (per block; `nn.scan` adds a leading `layers` axis):

  double_blocks/  img_mod, txt_mod          Dense D -> 6D  (shift, scale, gate) x (attn, mlp)
                  attn/{img,txt}_{q,k,v}    Dense D -> D
                  attn/{img,txt}_{q,k}_norm RMSNorm(head_dim)
                  attn/{img,txt}_out        Dense D -> D
                  {img,txt}_mlp/{fc1,fc2}   Dense D -> 4D -> D (tanh GELU)
  single_blocks/  mod                       Dense D -> 3D  (shift, scale, gate)
                  {q,k,v}, {q,k}_norm       as above
                  mlp_in                    Dense D -> 4D
                  out                       Dense (D + 4D) -> D over concat(attn, GELU(mlp_in))

The joint sequence is always `[text ; image]`, as in both diffusers models.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models import layers
from qk_jax.models.mmdit.config import MMDiTConfig

Array = jax.Array

# ------------------------------------------------------------------ embeddings


def timestep_sinusoid(t: Array, family: str, dim: int = 256, max_period: float = 10000.0) -> Array:
    """(B,) t in [0, 1] -> (B, dim) [cos, sin] features of the 1000-scaled timestep (float32).

    Both diffusers models scale by 1000 but at different points (Qwen-Image: inside the
    sinusoid, `1000 * (t * f)`; FLUX: before it, `(1000 * t) * f`); we follow each so the
    float32 rounding matches too.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    t = t.astype(jnp.float32)
    if family == "flux":
        arg = (t * 1000.0)[:, None] * freqs[None]
    else:
        arg = 1000.0 * (t[:, None] * freqs[None])
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


class MLPEmbedder(nn.Module):
    """Dense -> SiLU -> Dense (diffusers `TimestepEmbedding` / `PixArtAlphaTextProjection`). (B, F) -> (B, D)."""

    features: int
    in_axis: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.Dense(self.features, axes=(self.in_axis, "mlp"), name="linear_1", **kw)(x)
        return layers.Dense(self.features, axes=("mlp", "embed"), name="linear_2", **kw)(nn.silu(x))


# ------------------------------------------------------------------ helpers


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """x * (1 + scale) + shift, with shift/scale either (B, D) or per token (B, S, D)."""
    if shift.ndim == 2:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


def gate(g: Array) -> Array:
    return g[:, None] if g.ndim == 2 else g


def mod_params(dense: nn.Module, vec: Array, n: int, vec0: Array | None, is_cond: Array | None) -> list[Array]:
    """AdaLN-zero parameters: `n` chunks of `dense(silu(vec))`, each (B, D).

    With `vec0` (the t = 0 embedding) and `is_cond` (B, S) bool, condition tokens take
    their chunks from `vec0` instead: each chunk becomes per token (B, S, D) — diffusers'
    `zero_cond_t` / `modulate_index`.
    """
    chunks = jnp.split(dense(nn.silu(vec)), n, axis=-1)
    if vec0 is None or is_cond is None:
        return chunks
    chunks0 = jnp.split(dense(nn.silu(vec0)), n, axis=-1)
    sel = is_cond[..., None]
    return [jnp.where(sel, c0[:, None], c[:, None]) for c, c0 in zip(chunks, chunks0)]


def layer_norm(x: Array, eps: float, dtype) -> Array:
    """Affine-free LayerNorm in float32 (AdaLN's norm)."""
    return layers.LayerNorm(eps=eps, use_scale=False, use_bias=False, dtype=dtype)(x)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x (B, S, H, Dh), cos/sin (B, S, Dh/2) -> rotated x (interleaved pairs, float32 math)."""
    return layers.apply_rotary_interleaved(x, cos[:, :, None, :], sin[:, :, None, :])


class FeedForward(nn.Module):
    """Dense D -> mlp_dim -> tanh-GELU -> Dense -> D (diffusers `FeedForward(gelu-approximate)`).

    With `neighbours` (the image stream under `config.local_mixing`), the hidden features
    (B, N, mlp_dim) also get a depthwise 3x3 convolution over the token grid added to them
    (`local_mix/weight`, (9, mlp_dim), zero at init so the block starts as the plain feed-forward).
    """

    config: MMDiTConfig

    @nn.compact
    def __call__(self, x: Array, neighbours: tuple[Array, Array] | None = None) -> Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        h = layers.checkpoint_name(
            layers.Dense(cfg.mlp_dim, axes=("embed", "mlp"), name="fc1", **kw)(x), layers.MLP_HIDDEN_NAME
        )
        h = jax.nn.gelu(h, approximate=True)
        if neighbours is not None:
            h = h + GridConv(kw["param_dtype"], name="local_mix")(h, *neighbours)
        return layers.Dense(cfg.inner_dim, axes=("mlp", "embed"), name="fc2", **kw)(h)


class GridConv(nn.Module):
    """Depthwise 3x3 convolution over the token grid, `weight` (9, F) zero-initialised.

    Its own module so the weight is a `weight` (not decayed, and never taken for a Dense
    kernel by LoRA's path patterns)."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, index: Array, valid: Array) -> Array:
        weight = self.param(
            "weight", layers.logical(nn.initializers.zeros, (None, "mlp")), (9, h.shape[-1]), self.param_dtype
        )
        return depthwise_grid_conv(h, index, valid, weight.astype(h.dtype))


def depthwise_grid_conv(h: Array, index: Array, valid: Array, kernel: Array) -> Array:
    """Depthwise 3x3 convolution of token features over their grid, zero-padded at its edges.

    h (B, N, F); index, valid (B, N, 9) from `positions.grid_neighbours`; kernel (9, F).
    Returns (B, N, F): sum over k of kernel[k] * h[neighbour k] (0 off the grid).
    """
    out = jnp.zeros_like(h)
    for k in range(9):
        taken = jnp.take_along_axis(h, index[:, :, k : k + 1], axis=1)
        out = out + jnp.where(valid[:, :, k : k + 1], taken, 0) * kernel[k]
    return out


def attention(cfg: MMDiTConfig, q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """Joint attention over the whole sequence: (B, S, H, Dh) x3 -> (B, S, H*Dh)."""
    q = layers.constrain(q, ("act_batch", "act_length", "act_heads", None))
    out = layers.dot_product_attention(q, k, v, mask, impl=cfg.attention_impl)
    return layers.checkpoint_name(out.reshape(*out.shape[:2], cfg.inner_dim), "attn_out")


def _constrain(x: Array) -> Array:
    return layers.constrain(x, ("act_batch", "act_length", "act_embed"))


# ------------------------------------------------------------------ blocks


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined in one attention.

    Scanned: `__call__((img, txt), ctx) -> ((img, txt), ys)` where `ctx` is the dict of
    per-forward constants (temb, RoPE tables, masks) and `ys` the block outputs when
    `emit` is set (for per-block parity), else None.
    """

    config: MMDiTConfig
    emit: bool = False

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], ctx: dict[str, Array]):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        kw = dict(dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype))
        img, txt = carry
        vec, vec0, is_cond = ctx["vec"], ctx.get("vec0"), ctx.get("is_cond_img")
        cos, sin, mask = ctx["cos"], ctx["sin"], ctx.get("mask")

        img_mod = layers.Dense(6 * cfg.inner_dim, axes=("embed", "modulation"), name="img_mod", **kw)
        txt_mod = layers.Dense(6 * cfg.inner_dim, axes=("embed", "modulation"), name="txt_mod", **kw)
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = mod_params(img_mod, vec, 6, vec0, is_cond)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = mod_params(txt_mod, vec, 6, None, None)

        img_in = modulate(layer_norm(img, cfg.eps, dtype), i_sh1, i_sc1)
        txt_in = modulate(layer_norm(txt, cfg.eps, dtype), t_sh1, t_sc1)
        img_attn, txt_attn = JointAttention(cfg, name="attn")(img_in, txt_in, cos, sin, mask)
        img = img + gate(i_g1) * img_attn
        txt = txt + gate(t_g1) * txt_attn

        img_ff = FeedForward(cfg, name="img_mlp")(
            modulate(layer_norm(img, cfg.eps, dtype), i_sh2, i_sc2), ctx.get("neighbours")
        )
        img = _constrain(img + gate(i_g2) * img_ff)
        txt_ff = FeedForward(cfg, name="txt_mlp")(modulate(layer_norm(txt, cfg.eps, dtype), t_sh2, t_sc2))
        txt = _constrain(txt + gate(t_g2) * txt_ff)
        return (img, txt), ((img, txt) if self.emit else None)


class JointAttention(nn.Module):
    """Per-stream QKV + QK norm + RoPE, one attention over [txt ; img], per-stream output projections."""

    config: MMDiTConfig

    @nn.compact
    def __call__(self, img: Array, txt: Array, cos: Array, sin: Array, mask: Array | None):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        t_len = txt.shape[1]
        iq, ik, iv = qkv_heads(cfg, img, "img_")
        tq, tk, tv = qkv_heads(cfg, txt, "txt_")
        q = jnp.concatenate(
            [apply_rope(tq, cos[:, :t_len], sin[:, :t_len]), apply_rope(iq, cos[:, t_len:], sin[:, t_len:])], axis=1
        )
        k = jnp.concatenate(
            [apply_rope(tk, cos[:, :t_len], sin[:, :t_len]), apply_rope(ik, cos[:, t_len:], sin[:, t_len:])], axis=1
        )
        v = jnp.concatenate([tv, iv], axis=1)
        out = attention(cfg, q, k, v, mask)
        txt_out = layers.Dense(cfg.inner_dim, axes=("heads", "embed"), name="txt_out", **kw)(out[:, :t_len])
        img_out = layers.Dense(cfg.inner_dim, axes=("heads", "embed"), name="img_out", **kw)(out[:, t_len:])
        return img_out, txt_out


def qkv_heads(cfg: MMDiTConfig, x: Array, prefix: str) -> tuple[Array, Array, Array]:
    """(B, S, D) -> q, k, v (B, S, H, Dh): Dense + head split + QK RMSNorm.

    Called inside a compact `__call__`, so the params `{prefix}{q,k,v}` and
    `{prefix}{q,k}_norm` land directly in the calling module (attn/img_q/kernel)."""
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    b, s, _ = x.shape
    q, k, v = (
        layers.checkpoint_name(
            layers.Dense(cfg.inner_dim, axes=("embed", "heads"), name=f"{prefix}{n}", **kw)(x), f"attn_{n}"
        ).reshape(b, s, cfg.num_heads, cfg.head_dim)
        for n in ("q", "k", "v")
    )
    q = layers.RMSNorm(eps=cfg.eps, axis_name="head_dim", name=f"{prefix}q_norm", **kw)(q)
    k = layers.RMSNorm(eps=cfg.eps, axis_name="head_dim", name=f"{prefix}k_norm", **kw)(k)
    return q, k, v


class SingleStreamBlock(nn.Module):
    """FLUX single-stream block on the joint sequence: parallel attention + MLP, one output projection.

    Scanned: `__call__(x, ctx) -> (x, ys)` with x = [txt ; img] (B, T + N, D).
    """

    config: MMDiTConfig
    emit: bool = False

    @nn.compact
    def __call__(self, x: Array, ctx: dict[str, Array]):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        kw = dict(dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype))
        cos, sin, mask = ctx["cos"], ctx["sin"], ctx.get("mask")
        mod = layers.Dense(3 * cfg.inner_dim, axes=("embed", "modulation"), name="mod", **kw)
        shift, scale, g = mod_params(mod, ctx["vec"], 3, ctx.get("vec0"), ctx.get("is_cond_joint"))
        h = modulate(layer_norm(x, cfg.eps, dtype), shift, scale)
        mlp = layers.checkpoint_name(
            layers.Dense(cfg.mlp_dim, axes=("embed", "mlp"), name="mlp_in", **kw)(h), layers.MLP_HIDDEN_NAME
        )
        mlp = jax.nn.gelu(mlp, approximate=True)
        q, k, v = qkv_heads(cfg, h, "")
        attn = attention(cfg, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask)
        out = layers.Dense(cfg.inner_dim, axes=("mlp", "embed"), name="out", **kw)(
            jnp.concatenate([attn, mlp], axis=-1)
        )
        x = _constrain(x + gate(g) * out)
        return x, (x if self.emit else None)
