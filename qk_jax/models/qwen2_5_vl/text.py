"""The Qwen2 decoder of Qwen2.5-VL: GQA with q/k/v biases, RMSNorm, SwiGLU, M-RoPE, an
optional KV cache, scanned over layers.

A KV cache is a dict pytree
  {"k", "v": (L, B, S, KV, hd), "valid": (B, S) bool, "index": () int32}
where `index` is the next free slot (shared by all rows: batches are left-padded) and
`valid` marks slots that hold real (non-padding) tokens. See `init_cache`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models import layers
from qk_jax.models.qwen2_5_vl.common import GatedMLP
from qk_jax.models.qwen2_5_vl.config import TextConfig

Dtype = Any


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> dict[str, jax.Array]:
    """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "valid": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """(B, T) 1/0 mask -> (B, 1, T, T) boolean: causal and not attending to padding."""
    t = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]


class Attention(nn.Module):
    """GQA self-attention with q/k/v biases and M-RoPE, optionally through a KV cache.

    x (B, T, D); cos/sin (B, T, hd); mask (B, 1, T, S) with S = T without a cache or the
    cache length with one. Returns (output (B, T, D), updated cache_k, cache_v or None).
    """

    cfg: TextConfig
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_index=None, cache_k=None, cache_v=None):
        c = self.cfg
        b, t, _ = x.shape
        h, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = layers.checkpoint_name(layers.Dense(h * hd, axes=("embed", "heads"), name="q_proj", **kw)(x), "attn_q")
        k = layers.checkpoint_name(layers.Dense(kv * hd, axes=("embed", "kv_heads"), name="k_proj", **kw)(x), "attn_k")
        v = layers.checkpoint_name(layers.Dense(kv * hd, axes=("embed", "kv_heads"), name="v_proj", **kw)(x), "attn_v")
        q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, kv, hd), v.reshape(b, t, kv, hd)
        q = layers.apply_rotary_half(q, cos[:, :, None, :], sin[:, :, None, :])
        k = layers.apply_rotary_half(k, cos[:, :, None, :], sin[:, :, None, :])
        q = layers.constrain(q, ("act_batch", "act_length", "act_heads", None))
        if cache_k is not None:
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, cache_index, 0, 0))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
            k, v = cache_k.astype(self.dtype), cache_v.astype(self.dtype)
        out = layers.dot_product_attention(q, k, v, mask, impl=self.attention_impl).reshape(b, t, h * hd)
        out = layers.checkpoint_name(out, "attn_out")
        out = layers.Dense(c.hidden_size, axes=("heads", "embed"), use_bias=False, name="o_proj", **kw)(out)
        return out, cache_k, cache_v


class DecoderLayer(nn.Module):
    """Pre-norm GQA attention + SwiGLU MLP. (B, T, D) -> (B, T, D).

    Scanned: the carry is the hidden state; `cos`, `sin`, `mask`, `cache_index` are
    broadcast; `cache_k`, `cache_v` (this layer's slice of the cache, or None) are
    scanned. Returns `(x, (x if collect_hidden else None, new_k, new_v))`.
    """

    cfg: TextConfig
    attention_impl: str = "xla"
    collect_hidden: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_index, cache_k, cache_v):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = layers.RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        attn, cache_k, cache_v = Attention(c, self.attention_impl, name="self_attn", **kw)(
            y, cos, sin, mask, cache_index, cache_k, cache_v
        )
        x = x + attn
        y = layers.RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + GatedMLP(c.intermediate_size, c.hidden_act, use_bias=False, name="mlp", **kw)(y)
        x = layers.constrain(x, ("act_batch", "act_length", "act_embed"))
        return x, (x if self.collect_hidden else None, cache_k, cache_v)


class TextModel(nn.Module):
    """Token embedding, the scanned decoder layers and the final norm (HF `Qwen2_5_VLTextModel`)."""

    cfg: TextConfig
    attention_impl: str = "xla"
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=layers.logical(nn.initializers.normal(0.02), ("vocab", "embed")),
            **kw,
        )
        self.norm = layers.RMSNorm(c.rms_norm_eps, **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """(B, T) ids -> (B, T, D)."""
        return self.embed_tokens(input_ids)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied LM head: (B, T, D) -> (B, T, V) float32."""
        return self.embed_tokens.attend(hidden).astype(jnp.float32)

    @nn.compact
    def run_layers(self, x, cos, sin, mask, cache=None, collect_hidden=False):
        """The decoder layers. x (B, T, D); cos/sin (B, T, hd); mask (B, 1, T, S) or a `layers.SegmentMask`.

        Returns (last layer output (B, T, D) before the final norm,
                 per-layer outputs (L, B, T, D) or None, new cache or None).
        """
        c = self.cfg
        stack = layers.scan_layers(
            DecoderLayer,
            c.num_hidden_layers,
            self.remat,
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
        )
        # The splash kernel has no KV-cache form: decoding through a cache (generation, a few
        # tokens per step against a dense slot mask) runs the XLA attention.
        impl = "xla" if cache is not None and self.attention_impl == "splash" else self.attention_impl
        index = None if cache is None else cache["index"]
        ck = None if cache is None else cache["k"]
        cv = None if cache is None else cache["v"]
        x, (per_layer, new_k, new_v) = stack(
            c, impl, collect_hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="layers"
        )(x, cos, sin, mask, index, ck, cv)
        new_cache = None if cache is None else dict(cache, k=new_k, v=new_v)
        return x, per_layer, new_cache

    def final_norm(self, x):
        return self.norm(x)
