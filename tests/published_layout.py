"""Tiny random checkpoint folders laid out as the hub publishes them.

`save_pretrained` writes today's layout only; the published folders differ. These helpers
write what a download holds, without `save_pretrained`: the published config.json (key for
key, from tests/fixtures/published/, with tiny values), bfloat16 tensors split over several
`*-0000i-of-0000n.safetensors` shards by `safetensors.torch.save_file`, and a hand-written
`*.safetensors.index.json`. Qwen2.5-VL folders come with the legacy tensor names of the
published checkpoints (`model.layers.*`, `visual.blocks.*`, `lm_head.*`) or with the
current module paths (`model.language_model.*`, `model.visual.*`).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from dit_testing import randomize
from qwen2_5_vl_util import randomize_

PUBLISHED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "published")

# Tiny values for the keys of the published files (every other key keeps its published value).
QWEN_VL_TINY = {
    "bos_token_id": 993,
    "eos_token_id": 994,
    "vision_start_token_id": 995,
    "vision_end_token_id": 996,
    "vision_token_id": 997,
    "image_token_id": 998,
    "video_token_id": 999,
    "hidden_size": 64,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "vocab_size": 1000,
    "vision_config": {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    },
    "rope_scaling": {"mrope_section": [2, 3, 3]},
}
QWEN_IMAGE_TINY = {
    "transformer": {
        "attention_head_dim": 16,
        "axes_dims_rope": [4, 6, 6],
        "in_channels": 16,
        "joint_attention_dim": 24,
        "num_attention_heads": 2,
        "num_layers": 2,
        "out_channels": 4,
        "pooled_projection_dim": 8,
    },
    "vae": {
        "base_dim": 8,
        "dim_mult": [1, 2, 2],
        "latents_mean": [0.1, -0.2, 0.3, 0.0],
        "latents_std": [1.5, 0.8, 2.0, 1.0],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True],
        "z_dim": 4,
    },
}
# FLUX.1-dev's file has no axes_dims_rope: diffusers' default (16, 56, 56) needs 128-wide heads.
FLUX_TINY = {
    "transformer": {
        "attention_head_dim": 128,
        "in_channels": 16,
        "joint_attention_dim": 24,
        "num_attention_heads": 1,
        "num_layers": 1,
        "num_single_layers": 1,
        "pooled_projection_dim": 8,
    },
    "vae": {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 32,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
    },
}


def published_config(*parts: str) -> dict:
    with open(os.path.join(PUBLISHED, *parts)) as f:
        return json.load(f)


def tiny_config(published: dict, tiny: dict) -> dict:
    """`published` with the values of `tiny` (nested dicts merged); the key set stays the published one."""
    out = dict(published)
    for key, value in tiny.items():
        if key not in published:
            raise KeyError(f"{key!r} is not a key of the published config")
        out[key] = tiny_config(published[key], value) if isinstance(value, dict) else value
    return out


def write_shards(
    folder,
    tensors: dict[str, torch.Tensor],
    weights_name: str,
    num_shards: int = 3,
    dtype: torch.dtype = torch.bfloat16,
) -> list[str]:
    """Writes `tensors` (in `dtype`) as `num_shards` safetensors shards plus the index file
    `<weights_name>.index.json`, in the hub's naming; returns the shard file names."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(tensors)
    stem = weights_name[: -len(".safetensors")]
    files = [f"{stem}-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    weight_map, total = {}, 0
    for i, file in enumerate(files):
        part = {n: tensors[n].detach().to(dtype).contiguous() for n in names[i::num_shards]}
        save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    with open(os.path.join(folder, weights_name + ".index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return files


def _write_json(folder, name: str, value: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        json.dump(value, f, indent=2)


def qwen_vl_folder(folder, layout: str = "legacy", seed: int = 0) -> dict:
    """A tiny Qwen2.5-VL-7B-Instruct look-alike: the flat published config.json, its
    preprocessor / generation configs, bfloat16 weights in 3 shards with an index, tensor
    names in the `layout` ("legacy": as published; "module": transformers-5 paths).
    Returns the config.json dict."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = tiny_config(published_config("Qwen2.5-VL-7B-Instruct", "config.json"), QWEN_VL_TINY)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    randomize_(model, seed)
    tensors = dict(model.state_dict())
    if layout == "legacy":
        renamed = {}
        for name, value in tensors.items():
            for current, legacy in (("model.language_model.", "model."), ("model.visual.", "visual.")):
                if name.startswith(current):
                    name = legacy + name[len(current) :]
            renamed[name] = value
        tensors = renamed
    elif layout != "module":
        raise ValueError(f"layout={layout!r}: 'legacy' or 'module'")
    write_shards(folder, tensors, "model.safetensors")
    _write_json(folder, "config.json", config)
    for name in ("preprocessor_config.json", "generation_config.json"):
        _write_json(folder, name, published_config("Qwen2.5-VL-7B-Instruct", name))
    return config


def diffusers_pipeline_folder(folder, name: str, seed: int = 0, tiny: dict | None = None) -> dict[str, dict]:
    """A tiny `Qwen-Image` or `FLUX.1-dev` pipeline folder: `transformer/` and `vae/` with the
    published config.json keys (tiny values; `tiny` changes some, e.g.
    `{"transformer": {"num_layers": 4}}`) and bfloat16 sharded weights + index, and the
    published `scheduler/scheduler_config.json`. Returns {component: config dict}."""
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel, QwenImageTransformer2DModel

    sizes, classes = {
        "Qwen-Image": (QWEN_IMAGE_TINY, (QwenImageTransformer2DModel, AutoencoderKLQwenImage)),
        "FLUX.1-dev": (FLUX_TINY, (FluxTransformer2DModel, AutoencoderKL)),
    }[name]
    configs = {}
    for i, (component, cls) in enumerate(zip(("transformer", "vae"), classes)):
        values = dict(sizes[component], **(tiny or {}).get(component, {}))
        config = tiny_config(published_config(name, component, "config.json"), values)
        torch.manual_seed(seed + i)
        model = randomize(cls.from_config(config), seed + i, norms_only=component == "vae")
        write_shards(
            os.path.join(folder, component),
            dict(model.state_dict()),
            "diffusion_pytorch_model.safetensors",
            num_shards=2,
        )
        _write_json(os.path.join(folder, component), "config.json", config)
        configs[component] = config
    configs["scheduler"] = published_config(name, "scheduler", "scheduler_config.json")
    _write_json(os.path.join(folder, "scheduler"), "scheduler_config.json", configs["scheduler"])
    return configs
