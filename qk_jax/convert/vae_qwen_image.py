"""diffusers `AutoencoderKLQwenImage` <-> `qk_jax.models.vae.wan.AutoencoderKLQwenImage` parameters.

    config, params = vae_qwen_image.load("Qwen-Image/vae")   # or the pipeline folder
    vae_qwen_image.save("out/vae", config, params)

Causal 3D convs keep their full (T, H, W, I, O) kernels and the temporal `time_conv`
weights, so the export is the complete video VAE. The encoder's `down_blocks` is a flat
list mixing residual, attention and resample blocks: one rule per leaf kind per slot
covers whichever kind sits at each index.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qk_jax.convert import diffusers_io
from qk_jax.convert.diffusers_configs import from_diffusers, to_diffusers
from qk_jax.convert.mapping import CONV, IDENTITY, Mapping, Rule, Transform
from qk_jax.convert.vae_kl import module_rules
from qk_jax.models.vae import abstract_vae_params
from qk_jax.models.vae.wan import QwenImageVAEConfig


def _gamma(trailing: int) -> Transform:
    """Wan RMS-norm gamma (C, 1, ..., 1) with `trailing` singleton dims <-> (C,)."""
    return Transform(
        f"gamma{trailing}",
        lambda x: np.ascontiguousarray(x.reshape(-1)),
        lambda y: np.ascontiguousarray(y.reshape((-1,) + (1,) * trailing)),
    )


LEAVES: dict[str, tuple[tuple[str, str, Transform], ...]] = {
    "conv": (("weight", "kernel", CONV), ("bias", "bias", IDENTITY)),
    "norm3": (("gamma", "gamma", _gamma(3)),),  # residual / output norms (video layout)
    "norm2": (("gamma", "gamma", _gamma(2)),),  # attention norm (image layout)
}


def _rules(hf_module: str, kind: str) -> list[Rule]:
    return module_rules(hf_module, kind, LEAVES)


def _block(prefix: str) -> list[Rule]:
    """Every leaf a residual, attention or resample block can hold at `prefix`."""
    rules = []
    for name, kind in (
        ("norm1", "norm3"),
        ("conv1", "conv"),
        ("norm2", "norm3"),
        ("conv2", "conv"),
        ("conv_shortcut", "conv"),
        ("norm", "norm2"),
        ("to_qkv", "conv"),
        ("proj", "conv"),
        ("resample.1", "conv"),
        ("time_conv", "conv"),
    ):
        rules += _rules(f"{prefix}.{name}", kind)
    return rules


def mapping(config: QwenImageVAEConfig | None = None) -> Mapping:
    del config
    rules = [
        *_rules("encoder.conv_in", "conv"),
        *_block("encoder.down_blocks.{k}"),
        *_block("encoder.mid_block.resnets.{j}"),
        *_block("encoder.mid_block.attentions.{a}"),
        *_rules("encoder.norm_out", "norm3"),
        *_rules("encoder.conv_out", "conv"),
        *_rules("quant_conv", "conv"),
        *_rules("post_quant_conv", "conv"),
        *_rules("decoder.conv_in", "conv"),
        *_block("decoder.mid_block.resnets.{j}"),
        *_block("decoder.mid_block.attentions.{a}"),
        *_block("decoder.up_blocks.{i}.resnets.{j}"),
        *_block("decoder.up_blocks.{i}.upsamplers.{u}"),
        *_rules("decoder.norm_out", "norm3"),
        *_rules("decoder.conv_out", "conv"),
    ]
    return Mapping(rules)


def load(path, *, dtype: Any = None, shardings: Any = None, **runtime) -> tuple[QwenImageVAEConfig, dict]:
    """`(config, params)` from a diffusers AutoencoderKLQwenImage folder or a Qwen-Image pipeline folder."""
    return diffusers_io.load_model(
        path,
        "vae",
        lambda d: from_diffusers(QwenImageVAEConfig, d, **runtime),
        mapping,
        abstract_vae_params,
        dtype=dtype,
        shardings=shardings,
    )


def save(folder, config: QwenImageVAEConfig, params: Any, *, dtype: Any = None) -> list[str]:
    """Exports to a folder `AutoencoderKLQwenImage.from_pretrained` loads."""
    return diffusers_io.save_tree(folder, params, mapping(config), to_diffusers(config), dtype=dtype)
