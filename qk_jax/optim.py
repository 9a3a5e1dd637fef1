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

from qk_jax.tree import flatten_tree, path_str, unflatten_tree


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


def check_warmup(cfg) -> None:
    """ValueError naming both fields unless the warm-up (`cfg` = the `train` config) leaves at
    least one step of decay (optax would fail with 'requires positive decay_steps');
    `model_config.validate` reports it as a ConfigError at start."""
    warmup, total = int(cfg.warmup_steps), int(cfg.steps)
    if warmup and warmup >= total:
        raise ValueError(
            f"config field train.warmup_steps={warmup} must be below train.steps={total}: the learning rate "
            f"warms up over the first warmup_steps and decays over the rest (e.g. train.warmup_steps={total // 20})"
        )


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warmup to `cfg.learning_rate`, then cosine decay to `cfg.end_lr_ratio` of it."""
    check_warmup(cfg)
    total, warmup = int(cfg.steps), int(cfg.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.learning_rate,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )


# Weight decay by a parameter's role, read from its path (never from its rank: scanned layer
# stacks give biases and norm scales a leading layer axis). Decayed: the kernels of Dense /
# Conv layers, and the LoRA factors of a kernel (`lora/.../kernel/a`, `.../kernel/b`).
# Not decayed: biases, norm scales (RMSNorm / LayerNorm `scale`, `weight`, GroupNorm `gamma`),
# embeddings (token embeddings, the kontext query embedding, positional tables).
DECAYED_LEAVES = ("kernel",)
LORA_FACTORS = ("a", "b")
NOT_DECAYED_LEAVES = ("bias", "scale", "weight", "gamma", "beta", "embedding")


def decays(path: str) -> bool:
    """Whether AdamW's weight decay applies to the parameter at `path` ("dit/.../attn/img_q/kernel").
    ValueError naming a leaf whose role the rules above do not know."""
    parts = path.split("/")
    name = parts[-1]
    if name in DECAYED_LEAVES:
        return True
    if name in LORA_FACTORS and len(parts) >= 2 and parts[-2] in DECAYED_LEAVES:
        return True
    if name in NOT_DECAYED_LEAVES:
        return False
    raise ValueError(
        f"parameter {path!r}: no weight-decay role for a leaf named {name!r} (decayed: {DECAYED_LEAVES} and the "
        f"LoRA factors {LORA_FACTORS} of a kernel; not decayed: {NOT_DECAYED_LEAVES}); name it by its role"
    )


def decay_mask(tree: Any) -> Any:
    """`tree`'s structure with True where weight decay applies (`decays`)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: decays(path_str(p)), tree)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay on kernels only, see `decays`) after global-norm clipping."""
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
