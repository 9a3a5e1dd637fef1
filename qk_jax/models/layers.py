"""Building blocks shared by every model: dense layers that carry logical axes, norms,
attention, rotary embeddings and the scan-over-layers wrapper with its remat policy.

All modules take a compute `dtype` and a parameter `param_dtype` (fp32 master weights,
bf16 compute when configured). Norm statistics and softmax always run in float32, as
the PyTorch references do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name  # noqa: F401 - the tag the remat policies read

Dtype = Any
Initializer = Callable[..., jax.Array]
# The variable collection holding LoRA factors of `Dense` layers (see `models/lora.py`).
LORA_COLLECTION = "lora"

default_kernel_init = nn.initializers.lecun_normal()


def logical(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))


class Dense(nn.Module):
    """`y = x @ kernel + bias` over the last axis, with logical names on the kernel; plus
    `x @ a @ b` when the `lora` variable collection holds factors for this layer.

    Attributes:
      features: output width.
      axes: logical names of the kernel's (input, output) dimensions.
    Shapes: (..., D_in) -> (..., features). Parameter names follow `nn.Dense`
    (`kernel` (D_in, features), `bias` (features,)) so weight mappings stay readable.
    """

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", logical(self.kernel_init, self.axes), (x.shape[-1], self.features), self.param_dtype
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
        if self.has_variable(LORA_COLLECTION, "a"):
            # Unmerged LoRA (`models/lora.py`): x a b with `b` pre-scaled by alpha / r. Training
            # differentiates the small factors only, never a full-size merged kernel.
            a = self.get_variable(LORA_COLLECTION, "a").astype(self.dtype)
            b = self.get_variable(LORA_COLLECTION, "b").astype(self.dtype)
            y = y + jnp.dot(jnp.dot(x.astype(self.dtype), a, precision=self.precision), b, precision=self.precision)
        if self.use_bias:
            bias = self.param("bias", logical(self.bias_init, (self.axes[1],)), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled by a learned `scale` (D,).

    Matches `Qwen2RMSNorm` and diffusers' `RMSNorm`: normalise in float32, cast back to
    the input dtype, then multiply by the weight.
    """

    eps: float = 1e-6
    use_scale: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(in_dtype)
        if not self.use_scale:
            return y.astype(self.dtype)
        scale = self.param(
            "scale", logical(nn.initializers.ones_init(), (self.axis_name,)), (x.shape[-1],), self.param_dtype
        )
        return scale.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm in float32 (optionally without affine parameters, as AdaLN uses it)."""

    eps: float = 1e-6
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_scale:
            y = y * self.param(
                "scale", logical(nn.initializers.ones_init(), (self.axis_name,)), (x.shape[-1],), self.param_dtype
            ).astype(jnp.float32)
        if self.use_bias:
            y = y + self.param(
                "bias", logical(nn.initializers.zeros_init(), (self.axis_name,)), (x.shape[-1],), self.param_dtype
            ).astype(jnp.float32)
        return y.astype(self.dtype)


# ----------------------------------------------------------------------- attention


ATTENTION_IMPLS = ("xla", "dot_product", "cudnn", "splash")


@struct.dataclass
class SegmentMask:
    """An attention mask given by per-token segment ids: query t attends key s iff
    `q_ids[b, t] == kv_ids[b, s]` (and s <= t when `causal`).

    `q_ids=None` is key padding: every query attends the keys whose id is 1 (real) and
    none whose id is 0 (padding). This is the form the splash kernel takes (one compiled
    kernel for every batch row); `dense()` gives the boolean mask the other backends take.

    q_ids: (B, T) int or None; kv_ids: (B, S) int; causal: static.
    """

    q_ids: jax.Array | None
    kv_ids: jax.Array
    causal: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def key_padding(cls, kv_valid: jax.Array) -> SegmentMask:
        """From a (B, S) bool mask of real keys."""
        return cls(None, kv_valid.astype(jnp.int32))

    def dense(self, q_len: int) -> jax.Array:
        """The boolean mask, (B, 1, 1, S) for key padding, else (B, 1, T, S); True = attend."""
        if self.q_ids is None:
            mask = (self.kv_ids == 1)[:, None, None, :]
        else:
            mask = (self.q_ids[:, :, None] == self.kv_ids[:, None, :])[:, None]
        if self.causal:
            s = self.kv_ids.shape[-1]
            mask = mask & jnp.tril(jnp.ones((q_len, s), bool))
        return mask


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | SegmentMask | None = None,
    *,
    impl: str = "xla",
    scale: float | None = None,
) -> jax.Array:
    """Multi-head attention with grouped KV heads.

    Args:
      q: (B, T, H, D) queries.
      k, v: (B, S, KV, D) keys / values; H must be a multiple of KV (GQA).
      mask: boolean, broadcastable to (B, H, T, S), True = attend; or a `SegmentMask`.
      impl: "xla" — explicit softmax(QK^T)V with float32 logits (fastest on CPU, exact);
        "cudnn" / "dot_product" — `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU);
        "splash" — the Pallas TPU flash kernel (`models/splash.py`; interpret mode off TPU),
        which takes a `SegmentMask` or no mask.
      scale: logit scale, default 1/sqrt(D).
    Returns:
      (B, T, H, D) in q's dtype.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    if h % kv:
        raise ValueError(f"{h} query heads are not a multiple of {kv} key/value heads")
    scale = d**-0.5 if scale is None else scale
    if impl == "splash":
        from qk_jax.models.splash import splash_attention

        if mask is None:
            mask = SegmentMask(None, jnp.ones((b, k.shape[1]), jnp.int32))
        if not isinstance(mask, SegmentMask):
            raise ValueError("attention_impl='splash' takes a SegmentMask (segment ids), not a dense boolean mask")
        q_ids = jnp.ones((b, t), jnp.int32) if mask.q_ids is None else mask.q_ids
        return splash_attention(q, k, v, q_ids, mask.kv_ids, causal=mask.causal, scale=scale)
    if isinstance(mask, SegmentMask):
        mask = mask.dense(t)
    if impl in ("cudnn", "dot_product"):
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=None if mask is None else jnp.broadcast_to(mask, (b, h, t, k.shape[1])),
            scale=scale,
            implementation="cudnn" if impl == "cudnn" else None,
        )
    if impl != "xla":
        raise ValueError(f"unknown attention implementation {impl!r}; use one of {ATTENTION_IMPLS}")
    groups = h // kv
    s = k.shape[1]
    # Heads-first layouts, (B, KV, G, T, D) x (B, KV, S, D): the batch dimensions of both
    # products lead, so XLA:CPU runs them without transposing their operands (half the
    # forward time of contracting the (B, T, KV, G, D) layout directly).
    qh = q.reshape(b, t, kv, groups, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkgtd,bksd->bkgts", qh, kh, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        # An additive bias (0 / float32 min) rather than a select: the same softmax, and its
        # gradient is the identity. Shaped (B or 1, KV or 1, G or 1, T, S).
        mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], t, s))
        mask = mask.reshape(mask.shape[0], kv, groups, t, s) if mask.shape[1] == h else mask[:, :, None]
        logits = logits + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", weights, vh)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# ------------------------------------------------------------------------- rotary


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] over the last axis (the HF / Llama rotary convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF-style RoPE: `x * cos + rotate_half(x) * sin`, computed in float32.

    x: (B, T, H, D); cos, sin: broadcastable to it, e.g. (B, T, 1, D).
    """
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def apply_rotary_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Diffusers-style RoPE on interleaved pairs (x[2i], x[2i+1]), computed in float32.

    x: (B, T, H, D); cos, sin: (.., D/2) angles' cos/sin broadcastable to (B, T, H, D/2).
    """
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x32[..., 0], x32[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def rope_frequencies(dim: int, theta: float) -> jax.Array:
    """Inverse frequencies `theta^(-2i/dim)`, i < dim/2, in float32, shape (dim/2,)."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SiLU(gate) * up."""
    return jax.nn.silu(gate) * up


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, tuple(axes))


# ------------------------------------------------------------------ layer stacks

# Names (`jax.ad_checkpoint.checkpoint_name`) of the activations a remat policy may keep:
# the attention projections' outputs (q, k, v before norm / RoPE, the attention output
# before its output projection) and the MLP's hidden activation (before the nonlinearity),
# in the MMDiT blocks and both VLM towers.
ATTENTION_PROJECTION_NAMES = ("attn_q", "attn_k", "attn_v", "attn_out")
MLP_HIDDEN_NAME = "mlp_hidden"

# `remat` settings of every model config: no rematerialisation; recompute everything; keep
# the matmul outputs without a batch dimension (`checkpoint_dots_with_no_batch_dims`);
# keep the attention projections and recompute the rest (the MLP, norms, attention core);
# the same with those projections offloaded to host memory instead of kept on device.
REMAT_POLICIES = ("none", "full", "dots", "save_attn_proj", "offload_attn_proj")


def remat_policy(remat: str):
    """A `REMAT_POLICIES` entry -> the `jax.checkpoint` policy (None = save nothing = full
    remat; "none" means no `nn.remat` at all, which `scan_layers` decides)."""
    if remat == "dots":
        return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    if remat == "save_attn_proj":
        return jax.checkpoint_policies.save_only_these_names(*ATTENTION_PROJECTION_NAMES)
    if remat == "offload_attn_proj":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=list(ATTENTION_PROJECTION_NAMES),
            offload_src="device",
            offload_dst="pinned_host",
        )
    if remat in ("full", "none"):
        return None
    raise ValueError(f"unknown remat policy {remat!r}; use one of {REMAT_POLICIES}")


def scan_layers(block_cls: type[nn.Module], length: int, remat: str, in_axes: Any = 0, out_axes: Any = 0):
    """`nn.scan` of `block_cls` over `length` layers: parameters stacked on a leading "layers"
    axis (one compiled body whatever the depth), each layer rematerialised per `remat`.

    The block is called as `block(carry, *xs) -> (carry, ys)`; `in_axes` / `out_axes` are
    `nn.scan`'s (`nn.broadcast` for an argument every layer sees whole).
    """
    policy = remat_policy(remat)
    if remat != "none":
        block_cls = nn.remat(block_cls, policy=policy, prevent_cse=False)
    # LoRA factors (the "lora" collection) are stacked per layer like the kernels they adapt.
    return nn.scan(
        block_cls,
        variable_axes={"params": 0, LORA_COLLECTION: 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        out_axes=out_axes,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
