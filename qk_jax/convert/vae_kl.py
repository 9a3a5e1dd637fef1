"""diffusers `AutoencoderKL` <-> `qk_jax.models.vae.kl.AutoencoderKL` parameters.

    config, params = vae_kl.load("FLUX.1-dev/vae")   # or the pipeline folder
    vae_kl.save("out/vae", config, params)

Our module names are diffusers' module paths with `.N` written `_N`, so each rule is
`module kind x module path pattern` (`jaxify` derives the JAX path).
"""

from __future__ import annotations

import re
from typing import Any

from qk_jax.convert import diffusers_io
from qk_jax.convert.diffusers_configs import from_diffusers, to_diffusers
from qk_jax.convert.mapping import CONV, IDENTITY, TRANSPOSE, Mapping, Rule, Transform
from qk_jax.models.vae import abstract_vae_params
from qk_jax.models.vae.kl import AutoencoderKLConfig


def jaxify(hf_module: str) -> str:
    """'encoder.down_blocks.{i}.downsamplers.0.conv' -> 'encoder/down_blocks_{i}/downsamplers_0/conv'."""
    return re.sub(r"\.(\{\w+\}|\d+)", r"_\1", hf_module).replace(".", "/")


# leaf kinds: (hf leaf, jax leaf, transform)
LEAVES: dict[str, tuple[tuple[str, str, Transform], ...]] = {
    "conv": (("weight", "kernel", CONV), ("bias", "bias", IDENTITY)),
    "linear": (("weight", "kernel", TRANSPOSE), ("bias", "bias", IDENTITY)),
    "group_norm": (("weight", "scale", IDENTITY), ("bias", "bias", IDENTITY)),
}


def module_rules(hf_module: str, kind: str, leaves: dict = LEAVES) -> list[Rule]:
    jax = jaxify(hf_module)
    return [Rule(f"{hf_module}.{h}", f"{jax}/{j}", t) for h, j, t in leaves[kind]]


def _resnet(prefix: str) -> list[Rule]:
    rules = []
    for name, kind in (
        ("norm1", "group_norm"),
        ("conv1", "conv"),
        ("norm2", "group_norm"),
        ("conv2", "conv"),
        ("conv_shortcut", "conv"),
    ):
        rules += module_rules(f"{prefix}.{name}", kind)
    return rules


def _mid(prefix: str) -> list[Rule]:
    rules = _resnet(f"{prefix}.resnets.{{j}}")
    rules += module_rules(f"{prefix}.attentions.{{a}}.group_norm", "group_norm")
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        rules += module_rules(f"{prefix}.attentions.{{a}}.{name}", "linear")
    return rules


def mapping(config: AutoencoderKLConfig | None = None) -> Mapping:
    """The mapping does not depend on the config (no stacked layers); the argument is for symmetry."""
    del config
    rules = [
        *module_rules("encoder.conv_in", "conv"),
        *_resnet("encoder.down_blocks.{i}.resnets.{j}"),
        *module_rules("encoder.down_blocks.{i}.downsamplers.0.conv", "conv"),
        *_mid("encoder.mid_block"),
        *module_rules("encoder.conv_norm_out", "group_norm"),
        *module_rules("encoder.conv_out", "conv"),
        *module_rules("quant_conv", "conv"),
        *module_rules("post_quant_conv", "conv"),
        *module_rules("decoder.conv_in", "conv"),
        *_mid("decoder.mid_block"),
        *_resnet("decoder.up_blocks.{i}.resnets.{j}"),
        *module_rules("decoder.up_blocks.{i}.upsamplers.0.conv", "conv"),
        *module_rules("decoder.conv_norm_out", "group_norm"),
        *module_rules("decoder.conv_out", "conv"),
    ]
    return Mapping(rules)


def load(path, *, dtype: Any = None, shardings: Any = None, **runtime) -> tuple[AutoencoderKLConfig, dict]:
    """`(config, params)` from a diffusers AutoencoderKL folder or a pipeline folder with `vae/`."""
    return diffusers_io.load_model(
        path,
        "vae",
        lambda d: from_diffusers(AutoencoderKLConfig, d, **runtime),
        mapping,
        abstract_vae_params,
        dtype=dtype,
        shardings=shardings,
    )


def save(folder, config: AutoencoderKLConfig, params: Any, *, dtype: Any = None) -> list[str]:
    """Exports to a folder `AutoencoderKL.from_pretrained` loads."""
    return diffusers_io.save_tree(folder, params, mapping(config), to_diffusers(config), dtype=dtype)
