"""Reading and writing diffusers model folders (config.json + safetensors) through a `Mapping`.

A diffusers model folder holds `config.json` and `diffusion_pytorch_model.safetensors`
(or shards + `diffusion_pytorch_model.safetensors.index.json`). A pipeline folder holds
one such folder per component (`transformer/`, `vae/`, ...); `model_folder` accepts both.
Weights stream one tensor at a time (`safetensors_io`), so a 20B transformer is never
held twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from etils import epath

from qk_jax.convert import safetensors_io
from qk_jax.convert.mapping import Mapping
from qk_jax.tree import flatten_tree

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def model_folder(path: str | os.PathLike, subfolder: str) -> epath.Path:
    """`path` itself when it holds config.json, else `path/subfolder` (a pipeline folder)."""
    path = epath.Path(path)
    if (path / "config.json").exists():
        return path
    if (path / subfolder / "config.json").exists():
        return path / subfolder
    raise FileNotFoundError(
        f"{path} holds no config.json (nor {subfolder}/config.json): "
        f"expected a diffusers model folder or a pipeline folder with a {subfolder}/ component"
    )


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = epath.Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_tree(folder, mapping: Mapping, abstract: Any, *, dtype: Any = None, shardings: Any = None) -> dict:
    """Streams a diffusers folder into a nested parameter tree and checks it against `abstract`.

    Raises ValueError naming the first parameter that is missing or has the wrong shape.
    """
    params = safetensors_io.load_params(folder, mapping, dtype=dtype, shardings=shardings)
    got = flatten_tree(params)
    want = flatten_tree(abstract)
    missing = sorted(set(want) - set(got))
    if missing:
        raise ValueError(f"{folder}: {len(missing)} parameters have no tensor in the checkpoint, e.g. {missing[:5]}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise ValueError(f"{folder}: tensors map to parameters the model lacks, e.g. {extra[:5]}")
    for path, value in got.items():
        if tuple(value.shape) != tuple(want[path].shape):
            raise ValueError(
                f"{folder}: parameter {path} has shape {tuple(value.shape)} in the checkpoint, the "
                f"config implies {tuple(want[path].shape)}"
            )
    return params


def save_tree(
    folder,
    params: Any,
    mapping: Mapping,
    diffusers_config: dict[str, Any],
    *,
    dtype: Any = None,
    max_shard_bytes: int = 4 << 30,
    hf_shapes: dict | None = None,
) -> list[str]:
    """Writes `params` as a diffusers model folder (config.json + safetensors, sharded above `max_shard_bytes`)."""
    return safetensors_io.save_params(
        folder,
        params,
        mapping,
        dtype=dtype,
        hf_shapes=hf_shapes,
        weights_name=DIFFUSERS_WEIGHTS,
        max_shard_bytes=max_shard_bytes,
        extra_files={"config.json": json.dumps(diffusers_config, indent=2)},
    )


def load_model(
    path,
    subfolder: str,
    config_from_dict: Callable[[dict], Any],
    mapping_fn: Callable[[Any], Mapping],
    abstract_fn: Callable[[Any], Any],
    *,
    dtype: Any = None,
    shardings: Any = None,
) -> tuple[Any, dict]:
    """`(config, params)` of a diffusers model folder (or pipeline folder + `subfolder`)."""
    folder = model_folder(path, subfolder)
    config = config_from_dict(read_config(folder))
    params = load_tree(folder, mapping_fn(config), abstract_fn(config), dtype=dtype, shardings=shardings)
    return config, params
