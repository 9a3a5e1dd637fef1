"""Trainable sets, the optimizer and EMA.

A stage trains a subset of the parameter tree named by path prefixes (docs/design.md, "The three stages":
stage 1 trains `queries`, `connector`, `head` and `lora/vlm`, ...). `partition` splits a
tree into the trainable part and the frozen part; the optimizer is built over the
trainable part only, so frozen parameters carry no optimizer state at all, and the
gradient is taken with respect to the trainable part only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qk_jax.tree import flatten_tree, unflatten_tree


def _matches(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def partition(params: Mapping[str, Any], trainable: Iterable[str]) -> tuple[dict, dict]:
    """Splits `params` into `(trainable_tree, frozen_tree)` by path prefixes.

    Raises ValueError naming a prefix that selects nothing (a typo must not silently
    freeze the model).
    """
    trainable = list(trainable)
    flat = flatten_tree(params)
    for prefix in trainable:
        if not any(_matches(p, [prefix]) for p in flat):
            raise ValueError(f"trainable prefix {prefix!r} selects no parameter; top-level keys are {sorted(params)}")
    train = {p: v for p, v in flat.items() if _matches(p, trainable)}
    frozen = {p: v for p, v in flat.items() if not _matches(p, trainable)}
    return unflatten_tree(train), unflatten_tree(frozen)


def combine(*trees: Mapping[str, Any]) -> dict:
    """Inverse of `partition`: merges disjoint trees (raises on an overlapping path)."""
    flat: dict[str, Any] = {}
    for tree in trees:
        for p, v in flatten_tree(tree).items():
            if p in flat:
                raise ValueError(f"parameter {p!r} is in more than one tree")
            flat[p] = v
    return unflatten_tree(flat)


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warmup to `cfg.learning_rate`, then cosine decay to `cfg.end_lr_ratio` of it."""
    total = max(int(cfg.steps), 1)
    warmup = min(int(cfg.warmup_steps), total)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.learning_rate,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, not on norms/biases/1-D params) after global-norm clipping."""

    def decay_mask(tree):
        return jax.tree.map(lambda x: x.ndim >= 2, tree)

    parts = []
    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


def ema_decay_at(step, decay: float):
    """EMA decay with the usual warm-up, min(decay, (1 + step) / (10 + step)): early on the
    average follows the weights closely, so a short run's EMA is not its initialisation."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, decay) -> Any:
    """ema <- decay * ema + (1 - decay) * params, in the EMA's dtype (float32)."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)


def global_norm(tree: Any) -> jax.Array:
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
