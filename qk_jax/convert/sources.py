"""One way in for a user's weights: a HF / diffusers folder, or the Orbax params checkpoint
that `qk-jax convert --to-orbax` wrote from one.

    cfg = sources.read_config("qwen_image", path)                  # config.json, or the checkpoint's config item
    cfg, params = sources.load("qwen_image", path, shardings=tree)  # streamed / restored onto `tree`

A path is a converted Orbax checkpoint when it holds no config.json (nor a pipeline
component's) and its newest step has the `config` item `qk-jax convert` writes
(`{"model", "dtype", "source", "hf_config"}`); otherwise it is read as a HF / diffusers
folder through `registry`. `model.{vlm,generator,vae}.checkpoint` and `qk-jax surgery --dit`
take either.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from qk_jax.convert import registry
from qk_jax.tree import flatten_tree

# The pipeline component each model's weights live in (a diffusers pipeline folder holds several).
_SUBFOLDER = {"qwen_image": "transformer", "flux": "transformer", "vae": "vae", "qwen_image_vae": "vae"}


def _is_hf_folder(path: str, model: str) -> bool:
    sub = _SUBFOLDER.get(model)
    return os.path.isfile(os.path.join(path, "config.json")) or bool(
        sub and os.path.isfile(os.path.join(path, sub, "config.json"))
    )


def converted_step(path: str | os.PathLike, model: str) -> tuple[Any, int, dict] | None:
    """`(Checkpointer, step, config item)` when `path` is an Orbax checkpoint written by
    `qk-jax convert --to-orbax`, None when it is a HF / diffusers folder.

    Raises FileNotFoundError naming the path when it is neither, and ValueError when the
    checkpoint holds another model.
    """
    from qk_jax import checkpoint as ckpt_lib

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"weights folder {path} does not exist")
    if _is_hf_folder(path, model):
        return None
    reader = ckpt_lib.Checkpointer(path, create=False)
    step = reader.latest_step()
    if step is None or "config" not in reader.items_in(step):
        reader.close()
        raise FileNotFoundError(
            f"{path} is neither a HF / diffusers folder (no config.json) nor an Orbax params "
            f"checkpoint written by `qk-jax convert --to-orbax`"
        )
    item = ckpt_lib.read_json_item(path, step, "config")
    if item.get("model") != model:
        reader.close()
        raise ValueError(f"{path} step {step} holds converted {item.get('model')!r} weights, not {model!r}")
    return reader, step, item


def read_config(model: str, path: str | os.PathLike) -> Any:
    """The model config of a HF / diffusers folder or of a converted Orbax checkpoint."""
    spec = registry.get_model(model)
    found = converted_step(path, model)
    if found is None:
        return spec.read_config(os.fspath(path))
    reader, _, item = found
    reader.close()
    return spec.config_from_dict(item["hf_config"])


def load(model: str, path: str | os.PathLike, *, dtype: Any = np.float32, shardings: Any = None) -> tuple[Any, dict]:
    """`(config, params)` from a HF / diffusers folder (streamed) or a converted Orbax checkpoint
    (restored). `shardings` is a tree of `jax.sharding.Sharding` shaped like the params (None:
    the first device); `dtype` None keeps the stored dtype."""
    spec = registry.get_model(model)
    found = converted_step(path, model)
    if found is None:
        # Activation constraints off: the converters trace their own abstract trees, and a
        # caller's activation rules (the trainer's, the sampler's) would constrain the
        # concrete constants some inits compute (the Qwen-Image VAE's) against a mesh.
        with nn.logical_axis_rules(()):
            return spec.load(os.fspath(path), dtype=dtype, shardings=shardings)
    reader, step, item = found
    cfg = spec.config_from_dict(item["hf_config"])
    with reader:
        stored = reader.abstract_item(step, "params")
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, stored)
        want, got = flatten_tree(shardings), flatten_tree(stored)
        if set(want) != set(got):
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            raise ValueError(
                f"{path} step {step}: the stored parameters do not fit the {model} tree (missing "
                f"{missing[:3]}, unexpected {extra[:3]})"
            )
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), stored, shardings
        )
        params = reader.restore(step, params=target, json_items=(), fallback=False)["params"]
    return cfg, params
