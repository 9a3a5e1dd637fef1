"""Splash attention (the Pallas TPU flash-attention kernel) behind `layers.dot_product_attention`.

The kernel takes unbatched (H, T, D) operands, a static per-head (T, S) mask (full or
causal here) and per-token segment ids: a query attends a key only when their ids are
equal. Per-row padding is expressed with segment ids (`layers.SegmentMask`), so one
compiled kernel serves every batch row. This module

  - pads T and S up to a multiple of the kernel's block size (128) and slices the output
    back, so callers pass any sequence length;
  - scales the queries (the kernel computes plain QK^T);
  - runs the kernel per batch row (`vmap`) inside a `shard_map` over the mesh of the
    traced step when there is one: batch rows over the axes of the `act_batch` logical
    rule and heads over those of `act_heads`, where they divide. A Pallas kernel is a
    custom call the SPMD partitioner cannot split, so without the `shard_map` every
    device would gather the whole batch.

Off TPU (no TPU mesh, no TPU default backend) the kernel runs in Pallas interpret mode (the same program,
executed op by op): exact but slow, meant for tests.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

# The kernel's lane width: block sizes (and so padded lengths) are multiples of it.
LANES = 128
# Largest block tried: longer blocks mean fewer grid steps on TPU (MaxText uses 512).
MAX_BLOCK = 512


def block_size(length: int) -> int:
    """The largest of 512, 256, 128 dividing `length` (a multiple of 128)."""
    for b in (MAX_BLOCK, 256, LANES):
        if length % b == 0:
            return b
    raise ValueError(f"splash attention: length {length} is not a multiple of {LANES}")


def padded_length(n: int) -> int:
    return -(-n // LANES) * LANES


def _interpret() -> bool:
    """Interpret mode unless the traced program targets TPUs: the devices of the mesh it is
    traced under (compile-only TPU devices in `qk-jax aot`), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = jax.default_backend() if device is None else device.platform
    return platform != "tpu"


def _kernel(num_heads: int, q_len: int, kv_len: int, causal: bool):
    """The splash kernel for `num_heads` heads of (q_len, kv_len), both padded lengths."""
    shape = (q_len, kv_len)
    one = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    bq, bkv = block_size(q_len), block_size(kv_len)
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    return splash.make_splash_mha(
        splash.MultiHeadMask([one] * num_heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=_interpret(),
    )


def _rows(q, k, v, q_ids, kv_ids, *, causal: bool):
    """The kernel over a batch: q (B, H, T, D), k/v (B, KV, S, D), ids (B, T) / (B, S) int32."""
    kernel = _kernel(q.shape[1], q.shape[2], k.shape[2], causal)
    one = lambda q1, k1, v1, qi, ki: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=qi, kv=ki))  # noqa: E731
    return jax.vmap(one)(q, k, v, q_ids, kv_ids)


def _rule_axes(logical: str, mesh) -> tuple[str, ...]:
    """Mesh axes (of size > 1) the active logical rules give `logical`, e.g. ("data", "fsdp")."""
    for name, axes in nn.get_logical_axis_rules():
        if name == logical:
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    return ()


def _dividing(axes: tuple[str, ...], mesh, *sizes: int):
    """`axes` as a spec entry when their product divides every size, else None."""
    n = math.prod(mesh.shape[a] for a in axes)
    if not axes or any(s % n for s in sizes):
        return None
    return axes[0] if len(axes) == 1 else axes


def splash_attention(q, k, v, q_ids, kv_ids, *, causal: bool, scale: float) -> jax.Array:
    """Attention through the splash kernel.

    Args:
      q: (B, T, H, D); k, v: (B, S, KV, D) with H a multiple of KV.
      q_ids: (B, T), kv_ids: (B, S) int segment ids (a query attends keys of its own id);
        every query must see at least one key.
      causal: also mask keys after the query (T == S).
      scale: logit scale.
    Returns:
      (B, T, H, D) in q's dtype.
    """
    b, t, h, _ = q.shape
    s, kvh = k.shape[1], k.shape[2]
    tp, sp = padded_length(t), padded_length(s)
    # Padded queries take the id of the row's first key, so that each sees at least one key
    # (a query seeing none gives a 0/0 softmax; their outputs are sliced off anyway);
    # padded keys take -1, an id no query has.
    q_ids = q_ids.astype(jnp.int32)
    kv_ids = kv_ids.astype(jnp.int32)
    q_ids = jnp.pad(q_ids, ((0, 0), (0, tp - t)), constant_values=0)
    q_ids = jnp.where(jnp.arange(tp)[None] < t, q_ids, kv_ids[:, :1])
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, sp - s)), constant_values=-1)
    heads_first = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
    qh = heads_first((q * jnp.asarray(scale, q.dtype)).astype(q.dtype), tp)
    kh, vh = heads_first(k, sp), heads_first(v, sp)

    run = functools.partial(_rows, causal=causal)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        batch = _dividing(_rule_axes("act_batch", mesh), mesh, b)
        heads = _dividing(_rule_axes("act_heads", mesh), mesh, h, kvh)
        if batch is not None or heads is not None:
            operand, ids = P(batch, heads, None, None), P(batch, None)
            run = jax.shard_map(run, in_specs=(operand, operand, operand, ids, ids), out_specs=operand, check_vma=False)
    out = run(qh, kh, vh, q_ids, kv_ids)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)
