"""FLOPs of one Query-Kontext training step, from the model config and a prepared batch.

The parts and their gradient rules (see the package docstring):

  vit        forward only: nothing upstream of the vision tower is trained;
  llm        activation gradients always flow through it (the kontext queries are its
             input and are trained in every stage); its own kernels are frozen;
  connector  trained in every stage;
  dit/head   trained in full (stages 1-2), frozen under LoRA in stage 3; activation
             gradients flow through it down to its condition input;
  vae        forward only (targets and, in stage 3, the input images);
  lora       the unmerged adapters `x a (s b)` of stage 1 (VLM) and stage 3 (DiT): two
             weight matmuls per adapted kernel over that kernel's tokens, trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from qk_jax.flops.count import MatmulFlops
from qk_jax.flops.models import connector_flops, decoder_flops, mmdit_flops, vision_tower_flops
from qk_jax.flops.step import Part, train_step_flops
from qk_jax.flops.vae import vae_encode_flops
from qk_jax.tree import flatten_tree


def _trained(prefixes: Iterable[str], key: str) -> bool:
    return any(p == key or p.startswith(key + "/") for p in prefixes)


def lora_adapter_flops(lora_tree: Mapping[str, Any], tokens_for: Any) -> MatmulFlops:
    """Forward FLOPs of unmerged adapters: 2 * tokens * r * (d_in + d_out) per adapted kernel,
    times its stacked layers. `lora_tree`: `params["lora"]` (arrays or ShapeDtypeStructs);
    `tokens_for(path)`: how many tokens go through the adapted kernel at `path`."""
    kernels = {}
    for path, a in flatten_tree(lora_tree).items():
        if not path.endswith("/a"):
            continue
        b = flatten_tree(lora_tree)[path[:-2] + "/b"]
        layers = int(np.prod(a.shape[:-2])) if len(a.shape) > 2 else 1
        tokens = tokens_for(path)
        kernels[path] = 2 * tokens * a.shape[-2] * a.shape[-1] * layers
        kernels[path[:-2] + "/b"] = 2 * tokens * b.shape[-2] * b.shape[-1] * layers
    return MatmulFlops(kernels)


def kontext_train_step_flops(
    kcfg, batch: Mapping[str, Any], trainable: Iterable[str], lora_tree: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`train_step_flops` for one optimizer step on `batch` (a prepared model batch; with
    gradient accumulation its leaves carry a leading micro-batch axis), at its padded
    shapes: what the step computes (`kontext_useful_flops`: what of it is real work)."""
    ids = np.shape(batch["input_ids"])
    accum, (b, t) = (ids[0], ids[1:]) if len(ids) == 3 else (1, ids)
    stream = np.shape(batch["cond_index"])[-1] if "cond_index" in batch else t + kcfg.num_queries
    step = _step_flops(kcfg, _shapes(kcfg, batch), b, t, stream, list(trainable), lora_tree)
    if accum > 1:
        step = jax.tree.map(lambda x: x * accum if isinstance(x, (int, float)) else x, step)
    return step


def kontext_useful_flops(
    kcfg,
    batch: Mapping[str, Any],
    trainable: Iterable[str],
    lora_tree: Mapping[str, Any] | None = None,
    cache: dict | None = None,
) -> int:
    """The model FLOPs of the real work in one optimizer step on `batch` (the MFU numerator,
    as MaxText counts it): the step's `total` summed over the valid rows (`valid`), each at
    its prompt's real length (`attention_mask`) plus the kontext queries in the VLM, and at
    its condition stream's real length (`cond_index`) in the connector and the DiT; padded
    text tokens and padding rows are not counted. Image tokens carry no padding inside a valid
    row (a batch shares one target size and input-image count; the flat vision layout cuts
    each image's real patches), so every valid row counts its image tokens in full. In the
    flat vision layout the ViT attention spans all patches of the batch; a row counts its
    share of the patches as one sequence. A batch without padding (in the batched vision
    layout) counts as `kontext_train_step_flops(...)["total"]`. `cache`: a dict kept across
    calls with the same `kcfg`, `trainable` and LoRA tree (a row's count by shapes and length)."""
    trainable = list(trainable)
    shapes = _shapes(kcfg, batch)
    t_padded = np.shape(batch["input_ids"])[-1]
    mask = np.asarray(batch["attention_mask"]).reshape(-1, t_padded)
    valid = np.asarray(batch["valid"], bool).reshape(-1) if "valid" in batch else np.ones(len(mask), bool)
    rows_per_micro = np.shape(batch["input_ids"])[-2]
    if shapes["vit"] is not None:  # one row's images: the micro-batch's images shared by its rows
        patches, images = shapes["vit"]
        shapes["vit"] = (patches, images // rows_per_micro) if shapes["vit_batched"] else (patches // rows_per_micro, 1)
    lengths = (mask > 0).sum(axis=-1)[valid]
    if "cond_index" in batch:
        index = np.asarray(batch["cond_index"])
        streams = (index.reshape(-1, index.shape[-1]) >= 0).sum(axis=-1)[valid]
    else:
        streams = lengths + kcfg.num_queries
    cache = {} if cache is None else cache
    total = 0
    for (length, stream), count in zip(*np.unique(np.stack([lengths, streams], 1), axis=0, return_counts=True)):
        key = (tuple(sorted(shapes.items())), int(length), int(stream))
        if key not in cache:
            cache[key] = _step_flops(kcfg, shapes, 1, int(length), int(stream), trainable, lora_tree)["total"]
        total += int(count) * cache[key]
    return total


def _shapes(kcfg, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The sizes of a prepared batch the count needs besides its rows and text length."""
    target = np.shape(batch["target"])
    h, w = target[-3], target[-2]
    out = {
        "h": h,
        "w": w,
        "n_total": np.shape(batch["img_ids"])[-2],
        "n_target": (h // kcfg.downsample) * (w // kcfg.downsample),
        "n_inputs": np.shape(batch["cond_images"])[-4] if "cond_images" in batch else 0,
        "vit": None,
        "vit_batched": False,
    }
    if "pixel_values" in batch:
        pixels = np.shape(batch["pixel_values"])
        # Batched layout (..., I, P, D) with a one-image plan (..., P); flat (..., N, D) with a plan (..., N).
        batched = len(pixels) - np.ndim(batch["vision_plan"].window_segments) == 2
        out["vit"] = (pixels[-2], pixels[-3]) if batched else (pixels[-2], 1)
        out["vit_batched"] = batched
    return out


def _step_flops(
    kcfg, shapes: Mapping[str, Any], b: int, t: int, stream: int, trainable: list[str], lora_tree
) -> dict[str, Any]:
    """`train_step_flops` of one micro-batch of `b` rows of `t` text tokens in the VLM (plus the
    K queries) and `stream` condition tokens in the connector and the DiT."""
    k = kcfg.num_queries
    h, w, n_total, n_target, n_inputs = (shapes[x] for x in ("h", "w", "n_total", "n_target", "n_inputs"))
    parts = []
    if shapes["vit"] is not None:
        patches, images = shapes["vit"]
        parts.append(Part("vit", vision_tower_flops(kcfg.vlm, patches, images)))
    parts.append(
        Part(
            "llm",
            decoder_flops(kcfg.vlm, b, t + k, with_lm_head=False),
            weight_grads=_trained(trainable, "vlm"),
            backward_through=True,
            remat=kcfg.vlm.remat,
        )
    )
    parts.append(
        Part(
            "connector",
            connector_flops(kcfg.connector, b, stream),
            weight_grads=_trained(trainable, "connector"),
            backward_through=True,
        )
    )
    key = kcfg.generator_key
    parts.append(
        Part(
            key,
            mmdit_flops(kcfg.generator, b, n_total, stream, n_target),
            weight_grads=_trained(trainable, key),
            backward_through=True,
            remat=kcfg.generator.remat,
        )
    )
    parts.append(Part("vae", vae_encode_flops(kcfg.vae, b * (1 + (n_inputs if kcfg.low_level else 0)), h, w)))
    if lora_tree:

        def tokens_for(path: str) -> int:
            if path.startswith("vlm/"):
                return b * (t + k)
            if "/single_blocks/" in path:
                return b * (stream + n_total)
            return b * (stream if "/txt_" in path else n_total)  # double blocks: text or image stream

        parts.append(Part("lora", lora_adapter_flops(lora_tree, tokens_for), weight_grads=True, backward_through=True))
    return train_step_flops(parts)
