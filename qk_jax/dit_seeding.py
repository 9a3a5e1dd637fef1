"""Seeding a shallower DiT from a pretrained one: which source blocks become which target blocks.

The paper's ~10B MMDiT (`dit_10b`: Qwen-Image's width at 30 of its 60 double-stream
blocks) has no public weights; `qk-jax surgery --dit QWEN_IMAGE_DIR --dit-layers every_other`
seeds it from Qwen-Image, target block i taking source block 2i, every other parameter
(embedders, norms, output projection) taken as is. Block parameters are stacked on a
leading `layers` axis (`nn.scan`), so selecting blocks is one `take` per stacked tensor.

    indices = block_indices("every_other", source_layers=60, target_layers=30)   # (0, 2, ..., 58)
    params = select_blocks(source_params, indices, out_shardings=target_shardings)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qk_jax.tree import flatten_tree, unflatten_tree

# Parameter subtrees stacked over the double-stream blocks (the ones `--dit-layers` selects).
DOUBLE_BLOCKS = "double_blocks"
SPECS = ("all", "every_other", "first")


def block_indices(spec: str, source_layers: int, target_layers: int, flag: str = "--dit-layers") -> tuple[int, ...]:
    """The source block of each target block.

    Args:
      spec: "all" (same depth, block i <- i), "every_other" (block i <- 2i), "first" (block
        i <- i, the first `target_layers` blocks) or a comma-separated list of source indices.
    Raises:
      ValueError naming `flag` when the spec does not give exactly `target_layers` distinct
      indices within the source's `source_layers` blocks.
    """
    spec = (spec or "all").strip()
    if spec == "all":
        indices = tuple(range(source_layers))
    elif spec == "every_other":
        indices = tuple(range(0, source_layers, 2))
    elif spec == "first":
        indices = tuple(range(min(target_layers, source_layers)))
    else:
        try:
            indices = tuple(int(p) for p in spec.split(",") if p.strip())
        except ValueError:
            raise ValueError(f"{flag}={spec!r}: use one of {SPECS} or comma-separated block indices") from None
    if len(indices) != target_layers:
        raise ValueError(
            f"{flag}={spec!r} selects {len(indices)} of the source's {source_layers} blocks, the target "
            f"generator has num_layers={target_layers}"
        )
    if len(set(indices)) != len(indices) or not all(0 <= i < source_layers for i in indices):
        raise ValueError(f"{flag}={spec!r}: block indices must be distinct and within 0..{source_layers - 1}")
    return indices


def select_blocks(params: Any, indices: Sequence[int], out_shardings: Any = None) -> dict:
    """`params` (a DiT tree) with its double-stream blocks reduced to `indices`, in that order.

    `out_shardings` (a tree shaped like the result) places the selection; the source arrays
    may be sharded differently (e.g. over their own layer count).
    """
    idx = jnp.asarray(indices, jnp.int32)

    def select(tree):
        flat = flatten_tree(tree)
        return unflatten_tree(
            {p: jnp.take(v, idx, axis=0) if p.startswith(DOUBLE_BLOCKS + "/") else v for p, v in flat.items()}
        )

    return jax.jit(select, out_shardings=out_shardings)(params)
