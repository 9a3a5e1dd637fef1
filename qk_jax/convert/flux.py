"""diffusers `FluxTransformer2DModel` <-> `MMDiT(family="flux")` parameters.

    config, params = flux.load("FLUX.1-dev/transformer")   # or the pipeline folder
    flux.save("out/transformer", config, params)

Double-stream blocks `transformer_blocks.{i}.*` stack on `double_blocks/*`, single-stream
blocks `single_transformer_blocks.{j}.*` on `single_blocks/*`.
"""

from __future__ import annotations

from typing import Any

from qk_jax.convert import diffusers_io
from qk_jax.convert.diffusers_configs import from_diffusers, to_diffusers
from qk_jax.convert.mapping import Mapping
from qk_jax.convert.qwen_image import joint_attention_rules, linear, norm
from qk_jax.models.mmdit import MMDiTConfig, abstract_params


def mapping(config: MMDiTConfig) -> Mapping:
    if config.family != "flux":
        raise ValueError(f"flux.mapping needs family='flux', got {config.family!r}")
    blk, s = "transformer_blocks.{i}", ("i",)
    single, sj = "single_transformer_blocks.{j}", ("j",)
    rules = [
        *linear("x_embedder", "img_in"),
        *linear("context_embedder", "txt_in"),
        *linear("time_text_embed.timestep_embedder.linear_1", "time_embed/linear_1"),
        *linear("time_text_embed.timestep_embedder.linear_2", "time_embed/linear_2"),
        *linear("time_text_embed.guidance_embedder.linear_1", "guidance_embed/linear_1"),
        *linear("time_text_embed.guidance_embedder.linear_2", "guidance_embed/linear_2"),
        *linear("time_text_embed.text_embedder.linear_1", "pooled_embed/linear_1"),
        *linear("time_text_embed.text_embedder.linear_2", "pooled_embed/linear_2"),
        *linear(f"{blk}.norm1.linear", "double_blocks/img_mod", s),
        *linear(f"{blk}.norm1_context.linear", "double_blocks/txt_mod", s),
        *joint_attention_rules(f"{blk}.attn", "double_blocks/attn", s),
        *linear(f"{blk}.ff.net.0.proj", "double_blocks/img_mlp/fc1", s),
        *linear(f"{blk}.ff.net.2", "double_blocks/img_mlp/fc2", s),
        *linear(f"{blk}.ff_context.net.0.proj", "double_blocks/txt_mlp/fc1", s),
        *linear(f"{blk}.ff_context.net.2", "double_blocks/txt_mlp/fc2", s),
        *linear(f"{single}.norm.linear", "single_blocks/mod", sj),
        *linear(f"{single}.proj_mlp", "single_blocks/mlp_in", sj),
        *linear(f"{single}.proj_out", "single_blocks/out", sj),
        *linear(f"{single}.attn.to_q", "single_blocks/q", sj),
        *linear(f"{single}.attn.to_k", "single_blocks/k", sj),
        *linear(f"{single}.attn.to_v", "single_blocks/v", sj),
        *norm(f"{single}.attn.norm_q", "single_blocks/q_norm", sj),
        *norm(f"{single}.attn.norm_k", "single_blocks/k_norm", sj),
        *linear("norm_out.linear", "norm_out"),
        *linear("proj_out", "proj_out"),
    ]
    return Mapping(rules, stack_sizes={"i": config.num_layers, "j": config.num_single_layers})


def load(path, *, dtype: Any = None, shardings: Any = None, **runtime) -> tuple[MMDiTConfig, dict]:
    """`(config, params)` from a diffusers FLUX transformer folder or a FLUX pipeline folder."""
    return diffusers_io.load_model(
        path,
        "transformer",
        lambda d: from_diffusers(MMDiTConfig, d, **runtime),
        mapping,
        abstract_params,
        dtype=dtype,
        shardings=shardings,
    )


def save(folder, config: MMDiTConfig, params: Any, *, dtype: Any = None, max_shard_bytes: int = 4 << 30) -> list[str]:
    """Exports to a folder `FluxTransformer2DModel.from_pretrained` loads."""
    return diffusers_io.save_tree(
        folder, params, mapping(config), to_diffusers(config), dtype=dtype, max_shard_bytes=max_shard_bytes
    )
