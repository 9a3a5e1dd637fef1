"""diffusers `QwenImageTransformer2DModel` <-> `MMDiT(family="qwen_image")` parameters.

    config, params = qwen_image.load("Qwen-Image/transformer")    # or the pipeline folder
    qwen_image.save("out/transformer", config, params)            # loads with from_pretrained

The mapping is declarative (one `Rule` per tensor kind); per-block tensors
`transformer_blocks.{i}.*` stack on axis 0 of the scanned `double_blocks/*` parameters.
"""

from __future__ import annotations

from typing import Any

from qk_jax.convert import diffusers_io
from qk_jax.convert.diffusers_configs import from_diffusers
from qk_jax.convert.mapping import IDENTITY, TRANSPOSE, Mapping, Rule
from qk_jax.models.mmdit import MMDiTConfig, abstract_params


def linear(hf: str, jax: str, stack: tuple[str, ...] = ()) -> list[Rule]:
    """torch Linear `{hf}.weight` (out, in) / `.bias` <-> Dense `{jax}/kernel` (in, out) / `/bias`."""
    return [Rule(f"{hf}.weight", f"{jax}/kernel", TRANSPOSE, stack), Rule(f"{hf}.bias", f"{jax}/bias", IDENTITY, stack)]


def norm(hf: str, jax: str, stack: tuple[str, ...] = ()) -> list[Rule]:
    """RMSNorm `{hf}.weight` <-> `{jax}/scale`."""
    return [Rule(f"{hf}.weight", f"{jax}/scale", IDENTITY, stack)]


def joint_attention_rules(hf: str, jax: str, stack: tuple[str, ...]) -> list[Rule]:
    """The double-stream attention tensors, named identically by Qwen-Image and FLUX."""
    rules = []
    for hf_name, ours in (
        ("to_q", "img_q"),
        ("to_k", "img_k"),
        ("to_v", "img_v"),
        ("add_q_proj", "txt_q"),
        ("add_k_proj", "txt_k"),
        ("add_v_proj", "txt_v"),
        ("to_out.0", "img_out"),
        ("to_add_out", "txt_out"),
    ):
        rules += linear(f"{hf}.{hf_name}", f"{jax}/{ours}", stack)
    for hf_name, ours in (
        ("norm_q", "img_q_norm"),
        ("norm_k", "img_k_norm"),
        ("norm_added_q", "txt_q_norm"),
        ("norm_added_k", "txt_k_norm"),
    ):
        rules += norm(f"{hf}.{hf_name}", f"{jax}/{ours}", stack)
    return rules


def mapping(config: MMDiTConfig) -> Mapping:
    if config.family != "qwen_image":
        raise ValueError(f"qwen_image.mapping needs family='qwen_image', got {config.family!r}")
    blk, s = "transformer_blocks.{i}", ("i",)
    rules = [
        *linear("img_in", "img_in"),
        *norm("txt_norm", "txt_norm"),
        *linear("txt_in", "txt_in"),
        *linear("time_text_embed.timestep_embedder.linear_1", "time_embed/linear_1"),
        *linear("time_text_embed.timestep_embedder.linear_2", "time_embed/linear_2"),
        Rule("time_text_embed.addition_t_embedding.weight", "addition_t_embed"),
        *linear(f"{blk}.img_mod.1", "double_blocks/img_mod", s),
        *linear(f"{blk}.txt_mod.1", "double_blocks/txt_mod", s),
        *joint_attention_rules(f"{blk}.attn", "double_blocks/attn", s),
        *linear(f"{blk}.img_mlp.net.0.proj", "double_blocks/img_mlp/fc1", s),
        *linear(f"{blk}.img_mlp.net.2", "double_blocks/img_mlp/fc2", s),
        *linear(f"{blk}.txt_mlp.net.0.proj", "double_blocks/txt_mlp/fc1", s),
        *linear(f"{blk}.txt_mlp.net.2", "double_blocks/txt_mlp/fc2", s),
        *linear("norm_out.linear", "norm_out"),
        *linear("proj_out", "proj_out"),
    ]
    return Mapping(rules, stack_sizes={"i": config.num_layers})


def load(path, *, dtype: Any = None, shardings: Any = None, **runtime) -> tuple[MMDiTConfig, dict]:
    """`(config, params)` from a diffusers transformer folder or a Qwen-Image pipeline folder.

    `runtime` sets MMDiTConfig runtime fields (dtype, remat, attention_impl).
    """
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
    """Exports to a folder `QwenImageTransformer2DModel.from_pretrained` loads (config.json in
    the published layout, `published_configs.qwen_image_transformer`)."""
    from qk_jax.convert import published_configs

    return diffusers_io.save_tree(
        folder,
        params,
        mapping(config),
        published_configs.qwen_image_transformer(config),
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
    )
