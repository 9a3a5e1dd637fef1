"""Qwen2.5-VL weights: HF safetensors folder <-> qk_jax parameter tree, one mapping both ways.

HF checkpoints name tensors in one of two layouts, both read here (one mapping each):
- "hub", the Hub / `save_pretrained` layout: `visual.*`, `model.{embed_tokens,layers,norm}.*`,
  `lm_head.weight`;
- "module", the transformers-5 module paths: `model.visual.*`, `model.language_model.*`.
Export writes "hub", which every transformers version loads.

Usage:
    cfg, params = load_hf(folder, dtype=np.float32)        # streamed, tensor by tensor
    export_hf(out_folder, cfg, params)                      # config.json + safetensors
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from qk_jax.convert import safetensors_io
from qk_jax.convert.mapping import CONV, IDENTITY, TRANSPOSE, Mapping, Rule, Transform
from qk_jax.models.qwen2_5_vl.config import Qwen25VLConfig

# HF's fused qkv: weight (3D, D) <-> kernel (D, 3, D); bias (3D,) <-> (3, D).
QKV_KERNEL = Transform(
    "qkv_kernel",
    lambda x: np.ascontiguousarray(x.T).reshape(x.shape[1], 3, -1),
    lambda y: np.ascontiguousarray(y.reshape(y.shape[0], -1).T),
)
QKV_BIAS = Transform("qkv_bias", lambda x: x.reshape(3, -1), lambda y: y.reshape(-1))

# (HF name relative to the prefix, JAX path relative to its root, transform).
_VISION = [
    ("patch_embed.proj.weight", "patch_embed/kernel", CONV),
    ("merger.ln_q.weight", "merger/ln_q/scale", IDENTITY),
    ("merger.mlp.0.weight", "merger/fc1/kernel", TRANSPOSE),
    ("merger.mlp.0.bias", "merger/fc1/bias", IDENTITY),
    ("merger.mlp.2.weight", "merger/fc2/kernel", TRANSPOSE),
    ("merger.mlp.2.bias", "merger/fc2/bias", IDENTITY),
]
_VISION_BLOCK = [  # stacked over {v}
    ("norm1.weight", "norm1/scale", IDENTITY),
    ("norm2.weight", "norm2/scale", IDENTITY),
    ("attn.qkv.weight", "attn/qkv/kernel", QKV_KERNEL),
    ("attn.qkv.bias", "attn/qkv/bias", QKV_BIAS),
    ("attn.proj.weight", "attn/proj/kernel", TRANSPOSE),
    ("attn.proj.bias", "attn/proj/bias", IDENTITY),
] + [(f"mlp.{p}.{w}", f"mlp/{p}/{j}", t) for p in ("gate_proj", "up_proj", "down_proj")
     for w, j, t in (("weight", "kernel", TRANSPOSE), ("bias", "bias", IDENTITY))]
_TEXT = [
    ("embed_tokens.weight", "embed_tokens/embedding", IDENTITY),
    ("norm.weight", "norm/scale", IDENTITY),
]
_TEXT_LAYER = [  # stacked over {i}
    ("input_layernorm.weight", "input_layernorm/scale", IDENTITY),
    ("post_attention_layernorm.weight", "post_attention_layernorm/scale", IDENTITY),
    ("self_attn.o_proj.weight", "self_attn/o_proj/kernel", TRANSPOSE),
] + [(f"self_attn.{p}.{w}", f"self_attn/{p}/{j}", t) for p in ("q_proj", "k_proj", "v_proj")
     for w, j, t in (("weight", "kernel", TRANSPOSE), ("bias", "bias", IDENTITY))] \
  + [(f"mlp.{p}.weight", f"mlp/{p}/kernel", TRANSPOSE) for p in ("gate_proj", "up_proj", "down_proj")]

# Tensor-name layouts: (vision prefix, text prefix).
LAYOUTS = {"hub": ("visual.", "model."), "module": ("model.visual.", "model.language_model.")}


def detect_layout(hf_names) -> str:
    """'module' when the names use transformers-5 module paths, else 'hub'."""
    return "module" if any(n.startswith(LAYOUTS["module"][0]) for n in hf_names) else "hub"


def hf_mapping(cfg: Qwen25VLConfig, layout: str = "hub") -> Mapping:
    """The declarative HF <-> JAX mapping for a configuration (layer counts, tied head) and
    a tensor-name layout ("hub": what checkpoints and `save_pretrained` hold; "module")."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: use one of {sorted(LAYOUTS)}")
    vis, txt = LAYOUTS[layout]
    rules = [Rule(vis + h, "visual/" + j, t) for h, j, t in _VISION]
    rules += [Rule(f"{vis}blocks.{{v}}.{h}", "visual/blocks/" + j, t, stack=("v",)) for h, j, t in _VISION_BLOCK]
    rules += [Rule(txt + h, "language_model/" + j, t) for h, j, t in _TEXT]
    rules += [Rule(f"{txt}layers.{{i}}.{h}", "language_model/layers/" + j, t, stack=("i",))
              for h, j, t in _TEXT_LAYER]
    ignore = []
    if cfg.tie_word_embeddings:
        # A tied checkpoint may still carry a copy of the embedding as the head.
        ignore.append(r"^lm_head\.weight$")
    else:
        rules.append(Rule("lm_head.weight", "lm_head/kernel", TRANSPOSE))
    return Mapping(rules, stack_sizes={"v": cfg.vision.depth, "i": cfg.text.num_hidden_layers}, ignore_hf=ignore)


def read_config(folder: str | os.PathLike, **overrides) -> Qwen25VLConfig:
    """The `Qwen25VLConfig` of a checkpoint folder's config.json."""
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: a Qwen2.5-VL checkpoint folder needs its config.json")
    with open(path) as f:
        return Qwen25VLConfig.from_hf_config(json.load(f), **overrides)


def load_hf(folder: str | os.PathLike, dtype: Any = np.float32, shardings: Any = None,
            config: Qwen25VLConfig | None = None) -> tuple[Qwen25VLConfig, dict]:
    """Reads a HF Qwen2.5-VL folder (single file or sharded with an index), streamed.

    Args:
      dtype: numpy dtype each tensor is converted to as it streams in (None keeps the file's).
      shardings: optional nested tree of `jax.sharding.Sharding` (same structure as the
        params); each parameter is placed on its devices as soon as it is complete.
      config: use this config instead of reading config.json.
    Returns:
      (config, nested parameter tree as `Qwen25VL(config).init` lays it out, unboxed).
    """
    cfg = config or read_config(folder)
    layout = detect_layout(safetensors_io.tensor_names(folder))
    params = safetensors_io.load_params(folder, hf_mapping(cfg, layout), dtype=dtype, shardings=shardings)
    return cfg, params


def export_hf(folder: str | os.PathLike, cfg: Qwen25VLConfig, params: dict, dtype: Any = None,
              max_shard_bytes: int = 4 << 30) -> list[str]:
    """Writes `config.json` (the published flat layout, `published_configs.qwen2_5_vl`) +
    safetensors (sharded with an index above `max_shard_bytes`) that
    `Qwen2_5_VLForConditionalGeneration.from_pretrained` loads. Returns the shard names."""
    from qk_jax.convert import published_configs

    stored = {np.dtype(x.dtype).name for x in jax.tree.leaves(params)}
    dtype_name = np.dtype(dtype).name if dtype is not None else (stored.pop() if len(stored) == 1 else "float32")
    extra = {"config.json": json.dumps(published_configs.qwen2_5_vl(cfg, dtype_name), indent=2)}
    return safetensors_io.save_params(folder, params, hf_mapping(cfg), dtype=dtype, extra_files=extra,
                                      max_shard_bytes=max_shard_bytes)
