"""The image autoencoders behind one import.

- `kl.py`: `AutoencoderKL` (FLUX / SD3, diffusers' `AutoencoderKL`).
- `wan.py`: `AutoencoderKLQwenImage` (Qwen-Image, the Wan-2.1 family; one-frame causal 3D convs).
- `layers.py`: convolutions, norms, resnet / attention / resample blocks both share.
- `pixel.py`: `PixelSpaceAutoencoder`, the demo's parameter-free pixel-space "VAE".
- `build.py`: named sizes (`vae_config`), `build_vae`, abstract parameters and counts.
"""

from qk_jax.models.vae.build import VAEConfig, abstract_vae_params, build_vae, vae_config, vae_param_count
from qk_jax.models.vae.kl import KL_SIZES, AutoencoderKL, AutoencoderKLConfig
from qk_jax.models.vae.pixel import PixelSpaceAutoencoder, PixelSpaceConfig
from qk_jax.models.vae.wan import QWEN_VAE_SIZES, AutoencoderKLQwenImage, QwenImageVAEConfig

__all__ = [
    "VAEConfig",
    "abstract_vae_params",
    "build_vae",
    "vae_config",
    "vae_param_count",
    "KL_SIZES",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "PixelSpaceAutoencoder",
    "PixelSpaceConfig",
    "QWEN_VAE_SIZES",
    "AutoencoderKLQwenImage",
    "QwenImageVAEConfig",
]
