"""Reading a diffusers `config.json` the way diffusers itself reads it.

diffusers builds a model from the arguments of the class's `__init__`: a key the class
does not take is ignored (diffusers logs "... will be ignored"), a key that is missing
takes the argument's default, and keys starting with `_` (`_class_name`,
`_diffusers_version`, `_name_or_path`) are bookkeeping. Published folders rely on all
three: Qwen-Image's transformer config.json carries `pooled_projection_dim`, which
`QwenImageTransformer2DModel` does not take; FLUX.1-dev's has no `axes_dims_rope` and no
`out_channels`. `reference_arguments` reproduces that, with one warning that lists every
ignored key; each reader in `diffusers_configs.py` then refuses, by name, only the arguments whose value
changes the architecture in a way qk_jax does not implement.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("qk_jax.config")


def reference_arguments(cfg: Mapping[str, Any], class_name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`{argument: value}` for every `__init__` argument of the reference class.

    Args:
      cfg: the config.json dict.
      class_name: the diffusers class (named in the warning).
      defaults: the class's `__init__` arguments and their defaults.
    Returns:
      `defaults` updated with the values `cfg` gives. Keys of `cfg` that are neither
      arguments nor private (`_...`) are dropped, with one warning listing them.
    """
    ignored = sorted(k for k in cfg if not k.startswith("_") and k not in defaults)
    if ignored:
        logger.warning(
            "%s config.json: keys %s are not arguments of %s and are ignored, as diffusers ignores them",
            class_name,
            ignored,
            class_name,
        )
    return {k: cfg.get(k, default) for k, default in defaults.items()}
