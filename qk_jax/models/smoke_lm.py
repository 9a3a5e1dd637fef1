"""A small causal transformer LM used by `qk-jax smoke` to check a machine end to end
(mesh, sharded init, a sharded train step, a checkpoint round trip) before real jobs.

It is built from the same layers as the real models (`layers.py`), scans over its
blocks and carries logical axis names on every parameter.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from qk_jax.models import layers


class Block(nn.Module):
    """Pre-norm attention + SwiGLU MLP. (B, T, D) -> (B, T, D)."""

    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, _):
        b, t, d = x.shape
        hd = d // self.num_heads
        h = layers.RMSNorm(name="attn_norm", dtype=self.dtype)(x)
        qkv = layers.Dense(3 * d, axes=("embed", "heads"), use_bias=False, dtype=self.dtype, name="qkv")(h)
        q, k, v = jnp.split(qkv.reshape(b, t, 3 * self.num_heads, hd), 3, axis=2)
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        a = layers.dot_product_attention(q, k, v, mask).reshape(b, t, d)
        x = x + layers.Dense(d, axes=("heads", "embed"), use_bias=False, dtype=self.dtype, name="out")(a)
        h = layers.RMSNorm(name="mlp_norm", dtype=self.dtype)(x)
        gate = layers.Dense(self.mlp_dim, axes=("embed", "mlp"), use_bias=False, dtype=self.dtype, name="gate")(h)
        up = layers.Dense(self.mlp_dim, axes=("embed", "mlp"), use_bias=False, dtype=self.dtype, name="up")(h)
        x = x + layers.Dense(d, axes=("mlp", "embed"), use_bias=False, dtype=self.dtype, name="down")(
            layers.swiglu(gate, up)
        )
        return layers.constrain(x, ("act_batch", "act_length", "act_embed")), None


class SmokeLM(nn.Module):
    """tokens (B, T) int32 -> logits (B, T, V)."""

    vocab_size: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    num_layers: int
    remat: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        embed = self.param(
            "embed", layers.logical(nn.initializers.normal(0.02), ("vocab", "embed")), (self.vocab_size, self.embed_dim)
        )
        x = jnp.take(embed, tokens, axis=0).astype(self.dtype)
        stack = layers.scan_layers(Block, self.num_layers, "full" if self.remat else "none")
        x, _ = stack(self.num_heads, self.mlp_dim, self.dtype, name="blocks")(x, None)
        x = layers.RMSNorm(name="final_norm", dtype=self.dtype)(x)
        return jnp.einsum("btd,vd->btv", x, embed.astype(self.dtype)).astype(jnp.float32)
