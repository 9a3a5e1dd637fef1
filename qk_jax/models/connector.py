"""The connector: VLM hidden states -> the DiT's condition stream.

Both the text stream (hidden states of the prompt tokens) and the kontext tokens
(hidden states at the K query positions) go through it. Two forms, chosen by config:

- `mlp` (default, the paper's ~50M-parameter connector at 7B): Dense(D_vlm -> H) -> GELU ->
  Dense(H -> D_cond) -> RMSNorm;
- `transformer`: a few bidirectional pre-norm blocks at width D_vlm over the condition
  tokens (with their padding mask), then Dense(D_vlm -> D_cond) -> RMSNorm, as
  MetaQuery's connector.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models import layers


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    kind: str = "mlp"  # "mlp" | "transformer"
    in_dim: int = 3584
    out_dim: int = 3584
    hidden_dim: int = 7168
    num_layers: int = 2  # transformer blocks (kind="transformer")
    num_heads: int = 8
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in ("mlp", "transformer"):
            raise ValueError(f"connector.kind={self.kind!r}: choose 'mlp' or 'transformer'")
        if self.kind == "transformer" and self.in_dim % self.num_heads:
            raise ValueError(f"connector.in_dim={self.in_dim} is not divisible by connector.num_heads={self.num_heads}")


class _Block(nn.Module):
    """Bidirectional pre-norm self-attention + SwiGLU. (B, T, D) -> (B, T, D)."""

    config: ConnectorConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        dt = jnp.dtype(c.dtype)
        b, t, d = x.shape
        hd = d // c.num_heads
        h = layers.RMSNorm(c.norm_eps, dtype=dt, name="attn_norm")(x)
        q, k, v = (
            layers.Dense(d, ("embed", "heads"), dtype=dt, name=n)(h).reshape(b, t, c.num_heads, hd)
            for n in ("q", "k", "v")
        )
        a = layers.dot_product_attention(q, k, v, mask[:, None, None, :]).reshape(b, t, d)
        x = x + layers.Dense(d, ("heads", "embed"), dtype=dt, name="o")(a)
        h = layers.RMSNorm(c.norm_eps, dtype=dt, name="mlp_norm")(x)
        gate = layers.Dense(c.hidden_dim, ("embed", "mlp"), use_bias=False, dtype=dt, name="gate")(h)
        up = layers.Dense(c.hidden_dim, ("embed", "mlp"), use_bias=False, dtype=dt, name="up")(h)
        return x + layers.Dense(d, ("mlp", "embed"), use_bias=False, dtype=dt, name="down")(layers.swiglu(gate, up))


class Connector(nn.Module):
    """(B, T, D_vlm) hidden states + (B, T) bool mask -> (B, T, D_cond) condition tokens."""

    config: ConnectorConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        dt = jnp.dtype(c.dtype)
        x = hidden.astype(dt)
        if c.kind == "transformer":
            for i in range(c.num_layers):
                x = _Block(c, name=f"block_{i}")(x, mask)
            x = layers.RMSNorm(c.norm_eps, dtype=dt, name="in_norm")(x)
            x = layers.Dense(c.out_dim, ("embed", "cond_embed"), dtype=dt, name="proj")(x)
        else:
            x = layers.Dense(c.hidden_dim, ("embed", "mlp"), dtype=dt, name="fc1")(x)
            x = jax.nn.gelu(x, approximate=True)
            x = layers.Dense(c.out_dim, ("mlp", "cond_embed"), dtype=dt, name="fc2")(x)
        x = layers.RMSNorm(c.norm_eps, dtype=dt, name="out_norm")(x)
        return layers.constrain(x, ("act_batch", "act_length", "act_embed"))
