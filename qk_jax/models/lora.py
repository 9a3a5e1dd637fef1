"""LoRA as a transform on parameter trees.

Adapters are attached to Dense kernels chosen by path patterns (regexes over
'/'-joined parameter paths such as `vlm/decoder/layers/attn/q_proj/kernel`). They live
in their own subtree, mirroring the paths they adapt:

    params["lora"]["vlm"]["decoder"]["layers"]["attn"]["q_proj"]["kernel"] = {"a": (.., D_in, r), "b": (.., r, D_out)}

Two ways to run them, with the same outputs (a test checks it):

- unmerged, for training: `lora_collection(params["lora"]["vlm"], scale)` turns the
  adapters of one sub-model into the `lora` variable collection that `layers.Dense` reads
  (`y = x W + x a (s b)`), so the backward pass differentiates only the small factors;
- merged: `apply_lora(params, scale)` returns a tree whose kernels are `W + s a b`
  (`s = alpha / rank`) — for sampling (merge once, then run plain kernels) and for
  stage surgery (`merge_lora` folds them in for good).

The trainable set of a stage is just "the `lora` subtree"; surgery merges or drops it as
a pure tree function.
Stacked kernels of `nn.scan` layers `(L, D_in, D_out)` get stacked adapters
`(L, D_in, r)`, `(L, r, D_out)`.

`a` starts random (Kaiming-uniform, as PEFT does) and `b` at zero, so attaching LoRA
leaves the model's outputs unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from qk_jax.tree import flatten_tree, unflatten_tree

LORA_KEY = "lora"


def select_kernels(params: Mapping[str, Any], patterns: Iterable[str], prefix: str = "") -> list[str]:
    """Paths of the kernels (2-D, or 3-D stacked) whose path matches any of `patterns`.

    Raises ValueError when a pattern matches nothing (a typo would otherwise train nothing).
    """
    flat = flatten_tree(params)
    patterns = list(patterns)
    chosen = []
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = [
            p
            for p, v in flat.items()
            if p.startswith(prefix)
            and p.endswith("/kernel")
            and regex.search(p)
            and not p.startswith(LORA_KEY + "/")
            and v.ndim in (2, 3)
        ]
        if not hits:
            raise ValueError(f"LoRA target pattern {pattern!r} matches no Dense kernel under {prefix or 'the tree'!r}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def init_lora(
    rng: jax.Array, params: Mapping[str, Any], patterns: Iterable[str], rank: int, prefix: str = "", dtype=jnp.float32
) -> dict[str, Any]:
    """A LoRA subtree (without the top `lora` key) for the kernels matching `patterns`."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    flat = flatten_tree(params)
    out = {}
    for i, path in enumerate(select_kernels(params, patterns, prefix)):
        shape = flat[path].shape
        lead, d_in, d_out = shape[:-2], shape[-2], shape[-1]
        bound = (6.0 / d_in) ** 0.5 / (5.0**0.5)  # kaiming_uniform(a=sqrt(5)), as PEFT
        a = jax.random.uniform(jax.random.fold_in(rng, i), lead + (d_in, rank), dtype, -bound, bound)
        out[path + "/a"] = a
        out[path + "/b"] = jnp.zeros(lead + (rank, d_out), dtype)
    return unflatten_tree(out)


def lora_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * a @ b, batched over leading (layer) axes, in float32."""
    return scale * jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))


def _adapters(lora_tree: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    flat = flatten_tree(lora_tree)
    kernels = sorted({p[: -len("/a")] for p in flat if p.endswith("/a")})
    return {k: (flat[k + "/a"], flat[k + "/b"]) for k in kernels}


def apply_lora(
    params: Mapping[str, Any], scale: float | Mapping[str, float], lora_key: str = LORA_KEY
) -> dict[str, Any]:
    """`params` without the `lora` subtree, each adapted kernel replaced by `W + scale*a@b`.

    `scale` (alpha / rank) is one float, or one per top-level key (`{"vlm": 2.0, "dit": 1.0}`).
    Used inside the jitted step (the adapted kernels are temporaries) and by `merge_lora`.
    """
    if lora_key not in params:
        return dict(params)
    base = {k: v for k, v in params.items() if k != lora_key}
    flat = flatten_tree(base)
    for path, (a, b) in _adapters(params[lora_key]).items():
        if path not in flat:
            raise KeyError(f"LoRA adapter for {path!r} has no base kernel in the tree")
        w = flat[path]
        if w.shape[:-2] + (w.shape[-2], w.shape[-1]) != a.shape[:-1] + (b.shape[-1],):
            raise ValueError(f"LoRA adapter for {path!r}: a {a.shape} @ b {b.shape} does not fit kernel {w.shape}")
        s = scale[path.split("/")[0]] if isinstance(scale, Mapping) else scale
        flat[path] = (w.astype(jnp.float32) + lora_delta(a, b, s)).astype(w.dtype)
    return unflatten_tree(flat)


def merge_lora(
    params: Mapping[str, Any], scale: float | Mapping[str, float], only: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Folds adapters into their kernels permanently and drops them from the tree.

    `only` restricts the merge to adapters under one top-level key (e.g. "vlm"); the
    others stay attached. Returns `(new_params, merged_paths)`.
    """
    if LORA_KEY not in params:
        return dict(params), []
    lora = params[LORA_KEY]
    keep = {k: v for k, v in lora.items() if only is not None and k != only}
    take = {k: v for k, v in lora.items() if only is None or k == only}
    merged = apply_lora({**{k: v for k, v in params.items() if k != LORA_KEY}, LORA_KEY: take}, scale)
    if keep:
        merged[LORA_KEY] = keep
    return merged, sorted(_adapters(take))


def lora_collection(adapters: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """The adapters of one sub-model (`params["lora"]["vlm"]`: `<module>/kernel/{a,b}`) as the
    `lora` variable collection of that sub-model's modules (`<module>/{a, b * scale}`)."""
    out = {}
    for path, (a, b) in _adapters(adapters).items():
        if not path.endswith("/kernel"):
            raise ValueError(f"LoRA adapter {path!r} does not adapt a Dense kernel")
        module = path[: -len("/kernel")]
        out[module + "/a"] = a
        out[module + "/b"] = b * scale
    return unflatten_tree(out)
