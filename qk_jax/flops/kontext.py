"""FLOPs of one Query-Kontext training step, from the model config and a prepared batch.

The parts and their gradient rules (see the package docstring):

  vit        forward only: nothing upstream of the vision tower is trained;
  llm        activation gradients always flow through it (the kontext queries are its
             input and are trained in every stage); weight gradients for the LoRA-adapted
             kernels in stage 1;
  connector  trained in every stage;
  dit/head   trained in full (stages 1-2) or through LoRA (stage 3); activation
             gradients flow through it down to its condition input;
  vae        forward only (targets and, in stage 3, the input images);
  lora       the per-step merge of the adapters.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import numpy as np

from qk_jax.flops.models import connector_flops, decoder_flops, lora_flops, mmdit_flops, vision_tower_flops
from qk_jax.flops.step import Part, train_step_flops
from qk_jax.flops.vae import vae_encode_flops


def _trained(prefixes: Iterable[str], key: str) -> bool:
    return any(p == key or p.startswith(key + "/") for p in prefixes)


def kontext_train_step_flops(kcfg, batch: Mapping[str, Any], trainable: Iterable[str],
                             lora_tree: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`train_step_flops` for one optimizer step on `batch` (a prepared model batch; with
    gradient accumulation its leaves carry a leading micro-batch axis)."""
    trainable = list(trainable)
    ids = np.shape(batch["input_ids"])
    accum, (b, t) = (ids[0], ids[1:]) if len(ids) == 3 else (1, ids)
    k = kcfg.num_queries
    target = np.shape(batch["target"])
    h, w = target[-3], target[-2]
    img_ids = np.shape(batch["img_ids"])
    n_total = img_ids[-2]
    n_target = (h // kcfg.downsample) * (w // kcfg.downsample)
    n_inputs = np.shape(batch["cond_images"])[-4] if "cond_images" in batch else 0
    parts = []
    if "pixel_values" in batch:
        pixels = np.shape(batch["pixel_values"])
        # Batched layout (..., I, P, D) with a one-image plan (..., P); flat (..., N, D) with a plan (..., N).
        batched = len(pixels) - np.ndim(batch["vision_plan"].window_segments) == 2
        images, patches = (pixels[-3], pixels[-2]) if batched else (1, pixels[-2])
        parts.append(Part("vit", vision_tower_flops(kcfg.vlm, patches, images)))
    llm_grads = list(kcfg.lora_vlm.targets) if _trained(trainable, "lora/vlm") else _trained(trainable, "vlm")
    parts.append(Part("llm", decoder_flops(kcfg.vlm, b, t + k, with_lm_head=False), weight_grads=llm_grads,
                      backward_through=True, remat=kcfg.vlm.remat))
    parts.append(Part("connector", connector_flops(kcfg.connector, b, t + k),
                      weight_grads=_trained(trainable, "connector"), backward_through=True))
    key = kcfg.generator_key
    gen_grads = (list(kcfg.lora_dit.targets) if _trained(trainable, f"lora/{key}") else _trained(trainable, key))
    parts.append(Part(key, mmdit_flops(kcfg.generator, b, n_total, t + k, n_target), weight_grads=gen_grads,
                      backward_through=True, remat=kcfg.generator.remat))
    parts.append(Part("vae", vae_encode_flops(kcfg.vae, b * (1 + (n_inputs if kcfg.low_level else 0)), h, w)))
    if lora_tree:
        parts.append(Part("lora", lora_flops(lora_tree), weight_grads=True))
    step = train_step_flops(parts)
    if accum > 1:
        step = jax.tree.map(lambda x: x * accum if isinstance(x, (int, float)) else x, step)
    return step
