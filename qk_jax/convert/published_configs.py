"""config.json files in the layout the hub publishes, for exported folders.

`save_pretrained` of today's transformers / diffusers writes other layouts than the
published checkpoints carry; an exported folder should look like the one a user downloaded:

- Qwen2.5-VL (Qwen2.5-VL-3B/7B-Instruct): the flat pre-4.50 layout (text fields at the top,
  `rope_scaling: {"type": "mrope", ...}`, `vision_config` with `in_chans` and
  `spatial_patch_size`), which transformers 5 still reads;
- QwenImageTransformer2DModel (Qwen-Image): the published keys, among them
  `pooled_projection_dim`, which diffusers ignores; the options of later Qwen-Image
  releases (`zero_cond_t`, ...) only when they are on.

Keys the published files carry but no architecture depends on take the published values
(Qwen2.5-VL: `attention_dropout`, `initializer_range`, `use_cache`, `use_sliding_window`,
`sliding_window`; `max_window_layers` is the depth, as in the 7B file;
Qwen-Image: `pooled_projection_dim`). Qwen2.5-VL's pad token id is not in its published
config.json (its generation_config.json holds it; a run takes it from its tokenizer); a vision
RoPE theta other than the published 10000 is written under today's `rope_parameters`.
"""

from __future__ import annotations

from typing import Any

# Published in every Qwen-Image transformer config.json; QwenImageTransformer2DModel ignores it.
QWEN_IMAGE_POOLED_PROJECTION_DIM = 768
_QWEN_IMAGE_KEYS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "guidance_embeds",
    "axes_dims_rope",
)
_QWEN_IMAGE_OPTIONS = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


def qwen_image_transformer(cfg) -> dict[str, Any]:
    """The published QwenImageTransformer2DModel config.json of an `MMDiTConfig` (family qwen_image)."""
    from qk_jax.convert.diffusers_configs import to_diffusers

    full = to_diffusers(cfg)  # validates what diffusers can express
    if full["_class_name"] != "QwenImageTransformer2DModel":
        raise ValueError(f"qwen_image_transformer: a {full['_class_name']} config is not a Qwen-Image one")
    out = {
        "_class_name": full["_class_name"],
        **{k: full[k] for k in _QWEN_IMAGE_KEYS},
        "pooled_projection_dim": QWEN_IMAGE_POOLED_PROJECTION_DIM,
    }
    out.update({k: True for k in _QWEN_IMAGE_OPTIONS if full[k]})
    return dict(sorted(out.items()))


def qwen2_5_vl(cfg, dtype_name: str) -> dict[str, Any]:
    """The flat config.json of Qwen2.5-VL-*-Instruct for a `Qwen25VLConfig`; `dtype_name` is
    the dtype of the written tensors (`torch_dtype`)."""
    t, v = cfg.text, cfg.vision
    out = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        # <|vision_pad|> precedes <|image_pad|> in Qwen's special tokens (and the offline tokenizer's)
        "vision_token_id": cfg.image_token_id - 1,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "hidden_act": t.hidden_act,
        "hidden_size": t.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "sliding_window": 32768,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": dtype_name,
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": v.depth,
            "hidden_act": v.hidden_act,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_chans": v.in_channels,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "spatial_patch_size": v.patch_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
            "temporal_patch_size": v.temporal_patch_size,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "vocab_size": t.vocab_size,
    }
    if v.rope_theta != 10000.0:  # not in the published files (all use 10000): today's key for it
        out["vision_config"]["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rope_theta}
    return out
