"""The rectified-flow MMDiT (diffusers' `QwenImageTransformer2DModel` / `FluxTransformer2DModel` by config).

- `config.py`: `MMDiTConfig` (one frozen config for both families) and the named sizes.
- `blocks.py`: timestep embedding, modulation, double- and single-stream blocks, attention.
- `positions.py`: patchify / unpatchify and the host-side RoPE position ids (MSRoPE, FLUX ids).
- `cell_conv.py`: the optional convolutions at the latent-cell scale around the transformer.
- `model.py`: the assembled `MMDiT` module, its scanned block stacks and parameter helpers.
"""

from qk_jax.models.mmdit.config import FAMILIES, SIZES, MMDiTConfig, mmdit_config
from qk_jax.models.mmdit.model import MMDiT, abstract_params, dummy_inputs, init_params, param_count
from qk_jax.models.mmdit.positions import patchify, unpatchify

__all__ = [
    "FAMILIES",
    "SIZES",
    "MMDiTConfig",
    "mmdit_config",
    "MMDiT",
    "abstract_params",
    "dummy_inputs",
    "init_params",
    "param_count",
    "patchify",
    "unpatchify",
]
