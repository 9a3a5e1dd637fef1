"""Parameter trees addressed by '/'-joined paths (`vlm/decoder/layers/attn/q_proj/kernel`).

One spelling of a parameter's name for every layer of the package: the converter's rules,
LoRA targets, the optimizer's frozen masks, the FLOP counter, surgery and the checkpoint
checksums all key parameters by the same path. It lives at the bottom of the package
(imports nothing of qk_jax) so models can use it without importing the converter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, key))
        else:
            out[key] = v
    return out


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}."""
    tree: dict[str, Any] = {}
    for key, v in flat.items():
        node = tree
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def path_keys(path) -> tuple[str, ...]:
    """The keys of a `jax.tree_util` key path as strings (dict keys, attribute names, indices)."""
    keys = []
    for p in path:
        if isinstance(p, jax.tree_util.DictKey):
            keys.append(str(p.key))
        elif isinstance(p, jax.tree_util.GetAttrKey):
            keys.append(str(p.name))
        elif isinstance(p, jax.tree_util.SequenceKey):
            keys.append(str(p.idx))
        else:
            keys.append(str(p))
    return tuple(keys)


def path_str(path) -> str:
    """'vlm/layers/attn/q/kernel' for a `jax.tree_util` key path."""
    return "/".join(path_keys(path))
