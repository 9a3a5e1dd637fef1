"""Loading, overriding and validating ml_collections configs.

Configs live in `configs/<name>.py` as `get_config(arg)` functions; a config is named
`configs/stage1.py:tiny` (file, then the argument). Tools take it through absl
(`--config=configs/stage1.py:tiny --config.train.steps=100`); `load_config` does the
same from Python (tests, notebooks). `validate` runs before anything is built and raises
`ConfigError` naming the offending field.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from qk_jax.sharding import MESH_AXES, mesh_shape_from_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
    """An invalid config; the message names the field."""


def resolve_config_path(path: str) -> str:
    """A config file path, tried as given, then relative to the repository root."""
    if os.path.exists(path):
        return path
    candidate = os.path.join(REPO_ROOT, path)
    if os.path.exists(candidate):
        return candidate
    raise ConfigError(f"config file {path!r} does not exist (also looked in {REPO_ROOT})")


def load_config(spec: str, overrides: Sequence[str] | Mapping[str, Any] = ()) -> ml_collections.ConfigDict:
    """`load_config("configs/stage1.py:tiny", ["train.steps=10"])` -> ConfigDict."""
    path, _, arg = spec.partition(":")
    path = resolve_config_path(path)
    module_spec = importlib.util.spec_from_file_location(f"_qk_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    return apply_overrides(config, overrides)


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str] | Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """Sets each `field.path=value` (a Python literal, else the text) or mapping item on `config`."""
    items = overrides.items() if isinstance(overrides, Mapping) else (_split_override(o) for o in overrides)
    for key, value in items:
        set_field(config, key, value)
    return config


def load_sibling(config_file: str, name: str):
    """Imports `<name>.py` from the folder of `config_file` (config files share pieces this way
    without being a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_qk_config_{name}_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r} must look like field.path=value")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.removeprefix("config.").removeprefix("--config."), parsed


def get_field(config: ml_collections.ConfigDict, path: str) -> Any:
    node = config
    for part in path.split("."):
        if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
            node = node[part]
        else:
            raise ConfigError(f"config field {path} is missing")
    return node


def has_field(config, path: str) -> bool:
    try:
        get_field(config, path)
        return True
    except ConfigError:
        return False


def set_field(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = config
    for part in parts[:-1]:
        if part not in node:
            raise ConfigError(f"config field {path}: {part!r} does not exist")
        node = node[part]
    if parts[-1] not in node:
        if len(parts) > 1 and parts[-2] == "overrides":
            # A size's overrides are partial: they may name any field of the model config they
            # change, which `model_config.nested_replace` checks (and names when unknown).
            with node.unlocked() if hasattr(node, "unlocked") else _null():
                node[parts[-1]] = value
            return
        raise ConfigError(f"config field {path} does not exist")
    old = node[parts[-1]]
    if isinstance(old, float) and isinstance(value, int):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    with node.unlocked() if hasattr(node, "unlocked") else _null():
        node[parts[-1]] = value


# Fields added to the run config after runs were first saved, each with the value under which
# the code that wrote such a run's checkpoint behaved. A saved config that lacks one gets that
# value, never today's default, which may change what the model was trained to see.
ADDED_FIELDS = {
    "data.text_buckets": 1,  # every batch padded to data.max_text_len
    "data.drop_template_prefix": False,  # the chat template's prefix in the DiT's condition stream
}


def saved_run_config(item: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The config a checkpoint step saved (its `config` item), with any of `ADDED_FIELDS` it
    predates set to the value it was written under."""
    config = ml_collections.ConfigDict(item)
    for path, value in ADDED_FIELDS.items():
        section, name = path.rsplit(".", 1)
        if has_field(config, section) and not has_field(config, path):
            get_field(config, section)[name] = value  # a fresh ConfigDict: not locked
    return config


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def require(config, fields: Iterable[str]) -> None:
    """Raises ConfigError naming the first missing (or None / empty) required field."""
    for field in fields:
        value = get_field(config, field)
        if value is None or (isinstance(value, str) and not value):
            raise ConfigError(f"config field {field} is required but not set")


def mesh_shape(config, num_devices: int) -> tuple[int, ...]:
    """The mesh shape of `config.mesh`, ConfigError naming the field when it does not fit."""
    require(config, [f"mesh.{a}" for a in MESH_AXES])
    try:
        return mesh_shape_from_config({a: config.mesh[a] for a in MESH_AXES}, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_divisible(
    config, num_devices: int, table: Mapping[str, Sequence[str]], values: Mapping[str, int] | None = None
) -> None:
    """Each `name -> mesh axes` pair: the value must be divisible by those axes' product.

    The value is `values[name]` when given there (a size the model config derives, such as
    the VLM's head count), else the config field `name` (skipped when absent or None).
    e.g. `{"model.num_heads": ("tensor",), "train.batch_size": ("data", "fsdp")}`.
    """
    shape = dict(zip(MESH_AXES, mesh_shape(config, num_devices)))
    values = values or {}
    for name, axes in table.items():
        if name in values:
            value, what = values[name], f"config {name}"
        elif has_field(config, name):
            value, what = get_field(config, name), f"config field {name}"
        else:
            continue
        if value is None:
            continue
        size = math.prod(shape[a] for a in axes)
        if int(value) % size:
            raise ConfigError(
                f"{what}={value} is not divisible by mesh axes {'x'.join(axes)} = {size} "
                f"(mesh {shape}); change {name} or config field mesh.{axes[0]}"
            )
