"""Pieces shared by the vision tower and the decoder: activations and the gated MLP (the
scan-over-layers wrapper is `layers.scan_layers`, shared by every model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models import layers

Dtype = Any

_ACTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The HF `ACT2FN[name]` activation."""
    if name not in _ACTS:
        raise ValueError(f"activation {name!r} is not supported; use one of {sorted(_ACTS)}")
    return _ACTS[name]


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))` (HF `Qwen2MLP` / `Qwen2_5_VLMLP`). (..., D) -> (..., D).

    Attributes:
      embed_axis: logical name of the model width ("embed" or "vision_embed").
    """

    mlp_dim: int
    act: str = "silu"
    use_bias: bool = False
    embed_axis: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda n, axes, name: layers.Dense(
            n, axes=axes, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        gate = layers.checkpoint_name(
            dense(self.mlp_dim, (self.embed_axis, "mlp"), "gate_proj")(x), layers.MLP_HIDDEN_NAME
        )
        up = layers.checkpoint_name(dense(self.mlp_dim, (self.embed_axis, "mlp"), "up_proj")(x), layers.MLP_HIDDEN_NAME)
        h = activation(self.act)(gate) * up
        # Only the MLP axis is constrained: a None on the leading (batch, length) axes would
        # force them replicated, gathering the whole global batch's (B, T, mlp) on every
        # device (seen in the AOT memory report: 21 GiB per device at paper size).
        unconstrained = jax.sharding.PartitionSpec.UNCONSTRAINED
        h = layers.constrain(h, (*(unconstrained,) * (h.ndim - 1), "act_mlp"))
        return dense(x.shape[-1], ("mlp", self.embed_axis), "down_proj")(h)
