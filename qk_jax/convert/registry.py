"""The models `qk-jax convert --model NAME` knows: one `ModelSpec` per name.

A spec bundles what converting a HF / diffusers folder to and from an Orbax checkpoint
needs: read the config, know the parameter tree (shapes and logical axes, to shard it on
a mesh before any weight is read), stream the weights in, write them back out, and turn
the config into JSON for the checkpoint's `config` item and back.

Entries are zero-argument factories so that `qk-jax convert --help` imports no model.
Registering a model is one line in `MODELS`; a diffusers converter module that follows
the `qk_jax.convert` conventions (`load(path, dtype=, shardings=) -> (config, params)`,
`save(folder, config, params, dtype=)`, a config class `diffusers_configs` translates)
goes through `diffusers_model`, e.g.

    "qwen_image": lambda: diffusers_model("qk_jax.convert.qwen_image", "transformer",
                                          "qk_jax.models.mmdit:MMDiTConfig", traced(_MMDIT_INIT), "dit"),
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to convert one model family.

    Attributes:
      read_config: HF folder -> model config (reads config.json only).
      load: `(folder, *, dtype, shardings) -> (config, params)`, streamed; `shardings` is a
        tree of `jax.sharding.Sharding` matching params (each tensor is placed as it arrives).
      export: `(folder, config, params, *, dtype) -> list of files`: a folder that the
        PyTorch class's `from_pretrained` loads.
      config_to_dict / config_from_dict: the HF config.json dict <-> model config (stored
        as the checkpoint's `config` item).
      abstract: config -> `jax.eval_shape` of the *boxed* parameter tree (leaves carry
        logical axis names); unboxed leaves are replicated.
      submodel: which rule table of `qk_jax.sharding.RULES_BY_SUBMODEL` shards it.
    """

    read_config: Callable[[str], Any]
    load: Callable[..., tuple[Any, dict]]
    export: Callable[..., Any]
    config_to_dict: Callable[[Any], dict]
    config_from_dict: Callable[[dict], Any]
    abstract: Callable[[Any], Any]
    submodel: str


def _resolve(ref: Any) -> Any:
    """'package.module:attr' (or an object) -> the object."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def _qwen2_5_vl() -> ModelSpec:
    from qk_jax.convert import qwen2_5_vl as conv
    from qk_jax.models.qwen2_5_vl import Qwen25VL, init_params

    return ModelSpec(
        read_config=conv.read_config,
        load=lambda folder, *, dtype=np.float32, shardings=None: conv.load_hf(folder, dtype=dtype, shardings=shardings),
        export=lambda folder, cfg, params, *, dtype=None: conv.export_hf(folder, cfg, params, dtype=dtype),
        config_to_dict=conv.config_to_hf,
        config_from_dict=conv.config_from_hf,
        abstract=lambda cfg: jax.eval_shape(lambda r: init_params(Qwen25VL(cfg), r), jax.random.key(0)),
        submodel="vlm",
    )


def diffusers_config_path(path: str | os.PathLike, subfolder: str) -> str:
    """config.json of a diffusers model folder, or of `subfolder/` of a pipeline folder."""
    for candidate in (os.path.join(path, "config.json"), os.path.join(path, subfolder, "config.json")):
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(
        f"{path} holds no config.json (nor {subfolder}/config.json): expected a diffusers "
        f"model folder or a pipeline folder with a {subfolder}/ component"
    )


def traced(init_params: Any) -> Callable[[Any], Any]:
    """`config -> jax.eval_shape(init_params(config, rng))`: the boxed abstract tree of an
    `init_params(config, rng)` function (or its 'module:function' name), nothing allocated."""
    return lambda cfg: jax.eval_shape(lambda r: _resolve(init_params)(cfg, r), jax.random.key(0))


def diffusers_model(converter: Any, subfolder: str, config_cls: Any, abstract: Any, submodel: str) -> ModelSpec:
    """A spec for a diffusers converter module following the `qk_jax.convert` conventions.

    Args:
      converter: the module (or its dotted name) with `load(path, *, dtype, shardings)` and
        `save(folder, config, params, *, dtype)`.
      subfolder: the component's folder inside a pipeline ("transformer", "vae").
      config_cls: class (or 'module:Class') that `diffusers_configs.from_diffusers` /
        `to_diffusers` translate.
      abstract: `config -> abstract parameter tree` (or 'module:function'); boxed leaves
        (see `traced`) are sharded by their logical axes, plain ones replicated.
      submodel: rule table key ("dit", "vae", ...).
    """
    from qk_jax.convert.diffusers_configs import from_diffusers, to_diffusers

    def read_config(path):
        config_path = diffusers_config_path(path, subfolder)
        try:
            with open(config_path) as f:
                return from_diffusers(_resolve(config_cls), json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from e

    return ModelSpec(
        read_config=read_config,
        load=lambda folder, *, dtype=None, shardings=None: _resolve(converter).load(
            folder, dtype=dtype, shardings=shardings
        ),
        export=lambda folder, cfg, params, *, dtype=None: _resolve(converter).save(folder, cfg, params, dtype=dtype),
        config_to_dict=lambda cfg: to_diffusers(cfg),
        config_from_dict=lambda d: from_diffusers(_resolve(config_cls), d),
        abstract=lambda cfg: _resolve(abstract)(cfg),
        submodel=submodel,
    )


_MMDIT_INIT = "qk_jax.models.mmdit:init_params"
_VAE_ABSTRACT = "qk_jax.models.vae:abstract_vae_params"  # VAE weights are replicated (VAE_RULES)

# model name -> factory of its spec (imported only when chosen).
MODELS: dict[str, Callable[[], ModelSpec]] = {
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen_image": lambda: diffusers_model(
        "qk_jax.convert.qwen_image", "transformer", "qk_jax.models.mmdit:MMDiTConfig", traced(_MMDIT_INIT), "dit"
    ),
    "flux": lambda: diffusers_model(
        "qk_jax.convert.flux", "transformer", "qk_jax.models.mmdit:MMDiTConfig", traced(_MMDIT_INIT), "dit"
    ),
    "vae": lambda: diffusers_model(
        "qk_jax.convert.vae_kl", "vae", "qk_jax.models.vae.kl:AutoencoderKLConfig", _VAE_ABSTRACT, "vae"
    ),
    "qwen_image_vae": lambda: diffusers_model(
        "qk_jax.convert.vae_qwen_image", "vae", "qk_jax.models.vae.wan:QwenImageVAEConfig", _VAE_ABSTRACT, "vae"
    ),
}


def param_shardings(spec, cfg, mesh) -> Any:
    """NamedShardings of the model's parameter tree on `mesh` (from logical axes; nothing allocated)."""
    from qk_jax import sharding  # imported here: `qk-jax convert --help` imports no model

    boxed = spec.abstract(cfg)
    abstract, logical = sharding.abstract_init(lambda: boxed)
    wrapped = sharding.tree_shardings({spec.submodel: abstract}, {spec.submodel: logical}, mesh)
    return abstract, wrapped[spec.submodel]


def get_model(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"--model={name!r} is not a known model; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]()
