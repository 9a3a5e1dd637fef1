"""Classifier-free guidance for flow velocities, and velocity closures that batch the branches.

Combinations (all on velocities v = model(x_t, t, condition)):

- `cfg`:       v_u + s (v_c - v_u)                                    (text CFG)
- `dual_cfg`:  v_u + s_img (v_img - v_u) + s_txt (v_c - v_img)        (InstructPix2Pix: text + image)
- `true_cfg`:  Qwen-Image's "true CFG": the CFG combination rescaled per token so its norm
               (over the feature axis) equals the conditional prediction's.

`guided_velocity(model_fn, branches, combine)` returns the `velocity_fn(x, t)` closure the
samplers take: the branch conditions (e.g. [cond, uncond] condition-token trees with a
leading batch axis) are concatenated once, outside the sampling loop, and every step runs
one batched DiT call on the stacked x.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def cfg(cond: Array, uncond: Array, scale: float) -> Array:
    return uncond + scale * (cond - uncond)


def dual_cfg(cond: Array, image_only: Array, uncond: Array, text_scale: float, image_scale: float) -> Array:
    """InstructPix2Pix guidance: `cond` sees text + image, `image_only` the image without text,
    `uncond` neither (diffusers' `StableDiffusionInstructPix2PixPipeline` combination)."""
    return uncond + image_scale * (image_only - uncond) + text_scale * (cond - image_only)


def true_cfg(cond: Array, uncond: Array, scale: float, axis: int = -1, rescale: bool = True) -> Array:
    """Qwen-Image true CFG: CFG, then scaled so that ||out|| = ||cond|| along `axis` (per token)."""
    comb = cfg(cond, uncond, scale)
    if not rescale:
        return comb
    c32, m32 = cond.astype(jnp.float32), comb.astype(jnp.float32)
    cond_norm = jnp.linalg.norm(c32, axis=axis, keepdims=True)
    comb_norm = jnp.linalg.norm(m32, axis=axis, keepdims=True)
    return (m32 * (cond_norm / comb_norm)).astype(comb.dtype)


ModelFn = Callable[[Array, Array, Any], Array]


def guided_velocity(model_fn: ModelFn, branches: Sequence[Any], combine: Callable[..., Array]):
    """A sampler `velocity_fn(x, t)` that evaluates all guidance branches in one batched call.

    Args:
      model_fn: `(x (K*B, ...), t (K*B,), condition) -> v (K*B, ...)`, e.g. a closure over
        the DiT params calling `MMDiT.apply`.
      branches: K condition pytrees, each with leading batch B (same shapes: pad text to a
        common length and mask it), e.g. `[cond, uncond]`. Concatenated here, once.
      combine: `(v_branch_0, ..., v_branch_{K-1}) -> v`, e.g.
        `lambda c, u: true_cfg(c, u, 4.0)`.
    """
    k = len(branches)
    stacked = branches[0] if k == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *branches)

    def velocity_fn(x: Array, t: Array) -> Array:
        b = x.shape[0]
        xs = x if k == 1 else jnp.concatenate([x] * k, axis=0)
        ts = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (k * b,))
        v = model_fn(xs, ts, stacked)
        return combine(*jnp.split(v, k, axis=0))

    return velocity_fn


def cfg_velocity(model_fn: ModelFn, cond: Any, uncond: Any, scale: float, *, mode: str = "cfg"):
    """Text guidance closure: mode "cfg" (plain) or "true_cfg" (Qwen-Image, norm-rescaled)."""
    if mode == "cfg":
        return guided_velocity(model_fn, [cond, uncond], lambda c, u: cfg(c, u, scale))
    if mode == "true_cfg":
        return guided_velocity(model_fn, [cond, uncond], lambda c, u: true_cfg(c, u, scale))
    raise ValueError(f"cfg_velocity: unknown mode {mode!r}; use 'cfg' or 'true_cfg'")


def dual_cfg_velocity(
    model_fn: ModelFn, cond: Any, image_only: Any, uncond: Any, text_scale: float, image_scale: float
):
    """Text + image guidance closure for edits (three branches per step)."""
    return guided_velocity(
        model_fn, [cond, image_only, uncond], lambda c, i, u: dual_cfg(c, i, u, text_scale, image_scale)
    )
