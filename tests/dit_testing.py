"""Tiny random diffusers models (transformers and VAEs) for the DiT / VAE / flow tests.

Transformers: every parameter is re-drawn (weights ~ N(0, 0.1^2), norm scales ~ 1 + noise)
so no gate or modulation starts at zero and every path of the forward matters.
VAEs (`norms_only=True`): diffusers' own conv init is kept and only norm scales / biases are
perturbed — fully random conv stacks with per-pixel channel normalisation on 4-8 channels
are ill-conditioned enough to amplify float32 rounding to ~1e-4 on their own.
"""

from __future__ import annotations

import numpy as np
import torch

QWEN_TINY = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(4, 6, 6),
)
FLUX_TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=8,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
KL_TINY = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    scaling_factor=0.36,
    shift_factor=0.11,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
QWEN_VAE_TINY = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True],
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[1.5, 0.8, 2.0, 1.0],
)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1, norms_only: bool = False) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name
            if norms_only and not is_norm:
                continue
            noise = torch.randn(p.shape, generator=gen) * scale
            is_norm_scale = is_norm and (name.endswith("weight") or name.endswith("gamma"))
            p.copy_(noise + (1.0 if is_norm_scale else 0.0))
    return model.eval()


def save_tiny(cls, path, config: dict, seed: int = 0, scale: float = 0.1, norms_only: bool = False) -> torch.nn.Module:
    """Builds `cls(**config)` with random weights, saves it to `path` (diffusers folder), returns it."""
    torch.manual_seed(seed)  # diffusers' own init, for whatever `randomize` leaves alone
    model = randomize(cls(**config), seed, scale, norms_only)
    model.save_pretrained(str(path))
    return model


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))
