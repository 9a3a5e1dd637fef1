"""Qwen2.5-VL weights: HF safetensors folder <-> qk_jax parameter tree, one mapping both ways.

HF checkpoints name tensors in one of two layouts, both read here (one mapping each):
- "hub", the Hub / `save_pretrained` layout: `visual.*`, `model.{embed_tokens,layers,norm}.*`,
  `lm_head.weight`;
- "module", the transformers-5 module paths: `model.visual.*`, `model.language_model.*`.
Export writes "hub", which every transformers version loads.

The config.json translation lives here too (`config_from_hf`, `config_to_hf`).

Usage:
    cfg, params = load_hf(folder, dtype=np.float32)        # streamed, tensor by tensor
    export_hf(out_folder, cfg, params)                      # config.json + safetensors
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping as TMapping
from typing import Any

import jax
import numpy as np

from qk_jax.convert import safetensors_io
from qk_jax.convert.mapping import CONV, IDENTITY, TRANSPOSE, Mapping, Rule, Transform
from qk_jax.models.qwen2_5_vl.config import ConfigError, Qwen25VLConfig, TextConfig, VisionConfig

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
] + [
    (f"mlp.{p}.{w}", f"mlp/{p}/{j}", t)
    for p in ("gate_proj", "up_proj", "down_proj")
    for w, j, t in (("weight", "kernel", TRANSPOSE), ("bias", "bias", IDENTITY))
]
_TEXT = [
    ("embed_tokens.weight", "embed_tokens/embedding", IDENTITY),
    ("norm.weight", "norm/scale", IDENTITY),
]
_TEXT_LAYER = (
    [  # stacked over {i}
        ("input_layernorm.weight", "input_layernorm/scale", IDENTITY),
        ("post_attention_layernorm.weight", "post_attention_layernorm/scale", IDENTITY),
        ("self_attn.o_proj.weight", "self_attn/o_proj/kernel", TRANSPOSE),
    ]
    + [
        (f"self_attn.{p}.{w}", f"self_attn/{p}/{j}", t)
        for p in ("q_proj", "k_proj", "v_proj")
        for w, j, t in (("weight", "kernel", TRANSPOSE), ("bias", "bias", IDENTITY))
    ]
    + [(f"mlp.{p}.weight", f"mlp/{p}/kernel", TRANSPOSE) for p in ("gate_proj", "up_proj", "down_proj")]
)

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
    rules += [Rule(f"{txt}layers.{{i}}.{h}", "language_model/layers/" + j, t, stack=("i",)) for h, j, t in _TEXT_LAYER]
    ignore = []
    if cfg.tie_word_embeddings:
        # A tied checkpoint may still carry a copy of the embedding as the head.
        ignore.append(r"^lm_head\.weight$")
    else:
        rules.append(Rule("lm_head.weight", "lm_head/kernel", TRANSPOSE))
    return Mapping(rules, stack_sizes={"v": cfg.vision.depth, "i": cfg.text.num_hidden_layers}, ignore_hf=ignore)


def config_from_hf(hf: TMapping[str, Any], **overrides) -> Qwen25VLConfig:
    """A `Qwen25VLConfig` from a `config.json` dict: the nested transformers-5 layout, or the flat
    layout of the checkpoints on the Hub (`rope_scaling` / `in_chans`), read through transformers'
    own config class so that every legacy spelling is understood as `from_pretrained` does."""
    from transformers import Qwen2_5_VLConfig

    hf = copy.deepcopy(dict(hf))  # transformers' config class rewrites nested dicts (rope_scaling) in place
    if hf.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
        raise ConfigError(f"config.json model_type is {hf.get('model_type')!r}, expected 'qwen2_5_vl'")
    try:
        c = Qwen2_5_VLConfig(**hf)
    except Exception as e:  # strict dataclass validation in transformers
        raise ConfigError(f"transformers rejects this Qwen2.5-VL config.json: {e}") from e
    t, v = c.text_config, c.vision_config
    t_rope = dict(t.rope_parameters or {})
    if t_rope.get("rope_type", "default") not in ("default", "mrope"):
        raise ConfigError(
            f"text_config.rope_parameters.rope_type={t_rope.get('rope_type')!r} is not supported "
            "(only the default M-RoPE)"
        )
    if getattr(t, "use_sliding_window", False):
        raise ConfigError("text_config.use_sliding_window=True is not supported (Qwen2.5-VL does not use it)")
    v_rope = dict(getattr(v, "rope_parameters", None) or {})
    if v_rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"vision_config.rope_parameters.rope_type={v_rope.get('rope_type')!r} is not supported")
    patch = v.patch_size
    tpatch = v.temporal_patch_size
    if isinstance(patch, (list, tuple)) or isinstance(tpatch, (list, tuple)):
        raise ConfigError(f"vision_config.patch_size={patch!r} / temporal_patch_size={tpatch!r}: only ints")
    eos = t.eos_token_id
    vision = VisionConfig(
        depth=int(v.depth),
        hidden_size=int(v.hidden_size),
        intermediate_size=int(v.intermediate_size),
        num_heads=int(v.num_heads),
        out_hidden_size=int(v.out_hidden_size),
        in_channels=int(v.in_channels),
        patch_size=int(patch),
        temporal_patch_size=int(tpatch),
        spatial_merge_size=int(v.spatial_merge_size),
        window_size=int(v.window_size),
        fullatt_block_indexes=tuple(int(i) for i in v.fullatt_block_indexes),
        hidden_act=str(v.hidden_act),
        rope_theta=float(v_rope.get("rope_theta", 10000.0)),
        tokens_per_second=int(v.tokens_per_second),
    )
    text = TextConfig(
        vocab_size=int(t.vocab_size),
        hidden_size=int(t.hidden_size),
        intermediate_size=int(t.intermediate_size),
        num_hidden_layers=int(t.num_hidden_layers),
        num_attention_heads=int(t.num_attention_heads),
        num_key_value_heads=int(t.num_key_value_heads or t.num_attention_heads),
        rms_norm_eps=float(t.rms_norm_eps),
        rope_theta=float(t_rope.get("rope_theta", 1000000.0)),
        mrope_section=tuple(int(s) for s in t_rope.get("mrope_section", (16, 24, 24))),
        max_position_embeddings=int(t.max_position_embeddings),
        hidden_act=str(t.hidden_act),
        bos_token_id=t.bos_token_id,
        eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
        pad_token_id=t.pad_token_id,
    )
    kwargs = dict(
        vision=vision,
        text=text,
        image_token_id=int(c.image_token_id),
        video_token_id=int(c.video_token_id),
        vision_start_token_id=int(c.vision_start_token_id),
        vision_end_token_id=int(c.vision_end_token_id),
        tie_word_embeddings=bool(c.tie_word_embeddings),
    )
    kwargs.update(overrides)
    return Qwen25VLConfig(**kwargs)


def config_to_hf(cfg: Qwen25VLConfig) -> dict[str, Any]:
    """The nested `config.json` dict that transformers' `from_pretrained` loads."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "dtype": "float32",
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": list(t.mrope_section),
            },
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": t.pad_token_id,
            "tie_word_embeddings": cfg.tie_word_embeddings,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "out_hidden_size": v.out_hidden_size,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "hidden_act": v.hidden_act,
            "tokens_per_second": v.tokens_per_second,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        },
    }


def read_config(folder: str | os.PathLike, **overrides) -> Qwen25VLConfig:
    """The `Qwen25VLConfig` of a checkpoint folder's config.json."""
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: a Qwen2.5-VL checkpoint folder needs its config.json")
    with open(path) as f:
        return config_from_hf(json.load(f), **overrides)


def load_hf(
    folder: str | os.PathLike, dtype: Any = np.float32, shardings: Any = None, config: Qwen25VLConfig | None = None
) -> tuple[Qwen25VLConfig, dict]:
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


def export_hf(
    folder: str | os.PathLike, cfg: Qwen25VLConfig, params: dict, dtype: Any = None, max_shard_bytes: int = 4 << 30
) -> list[str]:
    """Writes `config.json` (the published flat layout, `published_configs.qwen2_5_vl`) +
    safetensors (sharded with an index above `max_shard_bytes`) that
    `Qwen2_5_VLForConditionalGeneration.from_pretrained` loads. Returns the shard names."""
    from qk_jax.convert import published_configs

    stored = {np.dtype(x.dtype).name for x in jax.tree.leaves(params)}
    dtype_name = np.dtype(dtype).name if dtype is not None else (stored.pop() if len(stored) == 1 else "float32")
    extra = {"config.json": json.dumps(published_configs.qwen2_5_vl(cfg, dtype_name), indent=2)}
    return safetensors_io.save_params(
        folder, params, hf_mapping(cfg), dtype=dtype, extra_files=extra, max_shard_bytes=max_shard_bytes
    )
