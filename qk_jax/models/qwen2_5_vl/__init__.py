"""Qwen2.5-VL in Flax Linen (parity with `transformers.Qwen2_5_VLForConditionalGeneration`).

- `config.py`: `Qwen25VLConfig` (+ `VisionConfig`, `TextConfig`), HF config.json round trips, sizes.
- `vision_plan.py`: host-side window/segment/rotary index arrays of the vision tower.
- `vision.py`, `text.py`: the two towers; `model.py`: the assembled `Qwen25VL` module.
- `rope.py`: M-RoPE, 2D RoPE and the host-side 3D position ids (HF `get_rope_index`).
- `processor.py`: chat template, image preprocessing, token expansion and padding.
- `generate.py`: KV-cache generation (greedy / sampled, batched, left padding).
"""

from qk_jax.models.qwen2_5_vl.config import SIZES, ConfigError, Qwen25VLConfig, TextConfig, VisionConfig, get_config
from qk_jax.models.qwen2_5_vl.model import Qwen25VL, dummy_inputs, init_params, param_count, prepare_inputs
from qk_jax.models.qwen2_5_vl.rope import extend_position_ids, get_rope_index, text_position_ids
from qk_jax.models.qwen2_5_vl.text import init_cache
from qk_jax.models.qwen2_5_vl.vision_plan import (
    VisionPlan,
    build_image_plan,
    build_vision_plan,
    pad_patches,
    shares_one_grid,
)

__all__ = [
    "SIZES",
    "ConfigError",
    "Qwen25VLConfig",
    "TextConfig",
    "VisionConfig",
    "get_config",
    "Qwen25VL",
    "dummy_inputs",
    "init_params",
    "param_count",
    "prepare_inputs",
    "extend_position_ids",
    "get_rope_index",
    "text_position_ids",
    "init_cache",
    "VisionPlan",
    "build_vision_plan",
    "build_image_plan",
    "pad_patches",
    "shares_one_grid",
]
