"""Pretrained weights for a fresh run: the config's `model.{vlm,generator,vae}.checkpoint`.

A real stage-1 run starts from a pretrained Qwen2.5-VL and a pretrained VAE (and stage 2
from a large pretrained DiT, usually grafted by `qk-jax surgery --dit`). Each path is a
HF / diffusers safetensors folder (converted through `qk_jax.convert.registry`, streamed
and placed on the run's shardings tensor by tensor) or the Orbax params checkpoint
`qk-jax convert --to-orbax` wrote from one (restored onto the run's shardings), see
`qk_jax.convert.sources`. The checkpoint's own config must
describe the same architecture as the stage config (a mismatch is an error naming the
fields), and every tensor must have the shape the model expects (an error names the path).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from qk_jax import model_config
from qk_jax.config import ConfigError
from qk_jax.convert import sources as weight_sources
from qk_jax.models.vae.pixel import PixelSpaceConfig
from qk_jax.tree import flatten_tree


def sources(config, kcfg) -> list[tuple[str, str, str, str]]:
    """(params key, folder, registry model name, config field) for every checkpoint set."""
    m = config.model
    out = []
    if m.vlm.get("checkpoint"):
        out.append(("vlm", m.vlm.checkpoint, "qwen2_5_vl", "model.vlm.checkpoint"))
    if m.generator.get("checkpoint"):
        name = "flux" if kcfg.generator.family == "flux" else "qwen_image"
        out.append((kcfg.generator_key, m.generator.checkpoint, name, "model.generator.checkpoint"))
    if m.vae.get("checkpoint"):
        if isinstance(kcfg.vae, PixelSpaceConfig):
            raise ConfigError("config field model.vae.checkpoint is set but model.vae.kind='pixel' has no weights")
        name = "vae" if m.vae.kind == "kl" else "qwen_image_vae"
        out.append(("vae", m.vae.checkpoint, name, "model.vae.checkpoint"))
    return out


def expected_config(kcfg, key: str):
    if key == "vlm":
        return kcfg.vlm
    if key == "vae":
        return kcfg.vae
    return kcfg.generator


def load_pretrained(params: Mapping[str, Any], config, kcfg, shardings: Mapping[str, Any]) -> tuple[dict, dict]:
    """`params` with the sub-trees named by the config's checkpoint fields replaced by the
    converted pretrained weights; returns (params, {key: folder})."""
    params = dict(params)
    loaded = {}
    for key, folder, name, field in sources(config, kcfg):
        try:
            found = weight_sources.read_config(name, folder)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"config field {field}={folder}: {e}") from None
        diffs = model_config.architecture_differences(found, expected_config(kcfg, key))
        if diffs:
            raise ConfigError(
                f"config field {field}={folder}: the checkpoint's architecture differs from the stage "
                f"config: " + "; ".join(diffs[:6])
            )
        _, sub = weight_sources.load(name, folder, dtype=np.float32, shardings=shardings[key])
        want = flatten_tree(params[key])
        got = flatten_tree(sub)
        missing = sorted(set(want) - set(got))
        if missing:
            raise ConfigError(f"{field}={folder} lacks parameters {key}/{missing[0]} ({len(missing)} missing)")
        for path, value in got.items():
            if path not in want:
                raise ConfigError(f"{field}={folder} has a parameter {key}/{path} the model does not have")
            if tuple(value.shape) != tuple(want[path].shape):
                raise ConfigError(
                    f"{field}={folder}: {key}/{path} has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(want[path].shape)}"
                )
        params[key] = jax.tree.map(lambda v, w: v.astype(w.dtype), sub, params[key])
        loaded[key] = folder
    return params, loaded
