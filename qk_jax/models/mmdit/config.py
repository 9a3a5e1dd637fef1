"""`MMDiTConfig`: one frozen config for every rectified-flow MMDiT qk_jax builds.

The config covers two diffusers families through a handful of switches:

- `family="qwen_image"` — `QwenImageTransformer2DModel`: double-stream blocks only, an
  RMSNorm on the incoming condition tokens, MSRoPE positions (image centred, text on the
  diagonal), timestep embedding `sin/cos(1000 * (t * f))`.
- `family="flux"` — `FluxTransformer2DModel`: double- then single-stream blocks, 3-axis
  RoPE ids, optional guidance embedding, pooled projection, timestep embedding
  `sin/cos((1000 * t) * f)`.

Everything else (widths, depths, heads, RoPE axes, channels) is a plain field, so a
checkpoint of any size converts as long as its config.json reads into this class
(`qk_jax/convert/diffusers_configs.py` translates config.json dicts in both directions).

Timestep convention: the model always takes `timestep` in [0, 1] (= the flow sigma, the
noise fraction of x_t = (1 - t) x0 + t eps), exactly the value both diffusers pipelines
pass to the transformer (`scheduler.timesteps / 1000`). FLUX's `guidance` is the guidance
scale itself (e.g. 3.5); both are multiplied by 1000 inside, as diffusers does.
"""

from __future__ import annotations

import dataclasses

from qk_jax.models.layers import ATTENTION_IMPLS, REMAT_POLICIES

FAMILIES = ("qwen_image", "flux")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """Architecture + runtime settings of an `MMDiT` (see the module docstring).

    Shapes: `inner_dim = num_heads * head_dim`; image tokens enter with `in_channels`
    features (a 2x2 patch of C latent channels = 4C) and leave with
    `patch_size**2 * out_channels` features.
    """

    family: str = "qwen_image"
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16  # None: same as in_channels (FLUX)
    num_layers: int = 60  # double-stream blocks
    num_single_layers: int = 0  # single-stream blocks (FLUX)
    num_heads: int = 24
    head_dim: int = 128
    joint_attention_dim: int = 3584  # width of the condition tokens `txt`
    pooled_projection_dim: int | None = None  # FLUX pooled text vector; None: no pooled input
    guidance_embeds: bool = False  # FLUX guidance-distilled models
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0
    mlp_ratio: float = 4.0
    eps: float = 1e-6
    zero_cond_t: bool = False  # Qwen-Image-Edit-2511: condition segments modulated with t = 0
    use_additional_t_cond: bool = False  # Qwen-Image-Layered: a 2-entry embedding added to temb
    # Not in Qwen-Image or FLUX (RoPE only): a fixed 2-D sin-cos embedding of each image token's
    # (row, col) added after img_in, so a token knows where it is before any attention (see
    # `positions.absolute_embedding`). For models trained from scratch; off for converted ones.
    absolute_positions: bool = False
    # Not in Qwen-Image or FLUX: a depthwise 3x3 convolution over the noisy target's token grid
    # inside the image stream's feed-forward of every double-stream block (SANA's Mix-FFN, added
    # residually and zero-initialised), so a token mixes with its eight neighbours in every block
    # instead of only through attention (see `blocks.FeedForward`, `positions.grid_neighbours`).
    # For models trained from scratch; off for converted ones.
    local_mixing: bool = False
    # Not in Qwen-Image or FLUX: each image token is projected to this many features before
    # `img_in` widens it to the stream (JiT's bottleneck patch embedding, Li & He 2025), for
    # pixel tokens wider than the stream, on the premise that a clean-image prediction needs
    # far fewer directions than a token has (on the demo's 8x8-pixel tokens k = 64 loses the
    # shapes' edges: BENCHMARKS.md). None: `img_in` alone. For models trained from scratch;
    # off for converted ones.
    patch_bottleneck: int | None = None
    # Not in Qwen-Image or FLUX: convolutions of this width at the latent-cell scale (before
    # patching) around the transformer, as U-ViT and HDiT have: a stem of `patch_size` 3x3
    # convolutions over the noisy target's cells added to `img_in`'s output, and a head of as
    # many over the cells after the last block (fed by the stream and the stem's cells, a U-Net
    # skip) added to `proj_out`'s output; both start at zero (see `cell_conv.py`). None: off.
    # For models trained from scratch; off for converted ones.
    cell_conv_width: int | None = None
    # The condition tokens' RoPE ids: "family" (Qwen-Image: a diagonal after the image grid, so
    # a word's rotation depends on its place in the prompt; FLUX: zeros) or "zeros" (every
    # condition token at the origin, as FLUX: a word is matched by content alone, and each
    # image token's offset to the stream is its own place in the image).
    txt_positions: str = "family"
    use_layer3d_rope: bool = False  # Qwen-Image-Layered position scheme (affects only the id helpers)
    # runtime (not part of the diffusers config)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "xla"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"MMDiTConfig.family={self.family!r}; expected one of {FAMILIES}")
        if self.txt_positions not in ("family", "zeros"):
            raise ValueError(f"MMDiTConfig.txt_positions={self.txt_positions!r}; expected 'family' or 'zeros'")
        if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"MMDiTConfig.axes_dims_rope={self.axes_dims_rope}: need three even sizes")
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(
                f"MMDiTConfig.axes_dims_rope={self.axes_dims_rope} sums to {sum(self.axes_dims_rope)}, "
                f"but head_dim={self.head_dim}: RoPE must cover the whole head"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"MMDiTConfig.remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"MMDiTConfig.attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if self.num_layers < 0 or self.num_single_layers < 0 or self.num_layers + self.num_single_layers == 0:
            raise ValueError(
                f"MMDiTConfig: num_layers={self.num_layers}, num_single_layers="
                f"{self.num_single_layers}: need at least one block"
            )
        if self.local_mixing and not self.num_layers:
            raise ValueError(
                "MMDiTConfig.local_mixing=True needs double-stream blocks (num_layers > 0): the "
                "convolution lives in their image-stream feed-forward"
            )
        if self.patch_bottleneck is not None and not 0 < self.patch_bottleneck < self.in_channels:
            raise ValueError(
                f"MMDiTConfig.patch_bottleneck={self.patch_bottleneck}: must be in [1, in_channels="
                f"{self.in_channels}) (None: no bottleneck)"
            )
        if self.cell_conv_width is not None and self.cell_conv_width < 1:
            raise ValueError(f"MMDiTConfig.cell_conv_width={self.cell_conv_width}: must be positive (None: off)")
        if self.cell_conv_width and (self.in_channels % self.patch_size**2):
            raise ValueError(
                f"MMDiTConfig.cell_conv_width needs tokens of whole cells: in_channels={self.in_channels} is "
                f"not a multiple of patch_size**2={self.patch_size**2}"
            )
        if self.family == "qwen_image" and self.guidance_embeds:
            raise ValueError(
                "MMDiTConfig.guidance_embeds=True with family='qwen_image': diffusers' "
                "QwenImageTransformer2DModel builds no guidance embedder, so no checkpoint has one"
            )
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))

    # ------------------------------------------------------------------ derived

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def out_features(self) -> int:
        """Features per output token: patch_size**2 * out_channels (64 for both FLUX and Qwen-Image)."""
        return self.patch_size**2 * (self.out_channels or self.in_channels)

    @property
    def txt_id_scheme(self) -> str:
        """The condition tokens' RoPE ids when none are passed (`positions.default_txt_ids`):
        "zeros" for FLUX or `txt_positions="zeros"`, else Qwen-Image's "diagonal"."""
        return "zeros" if self.txt_positions == "zeros" or self.family == "flux" else "diagonal"

    def replace(self, **changes) -> MMDiTConfig:
        return dataclasses.replace(self, **changes)


# Named sizes. `head_870m` and `dit_10b` use the Qwen-Image layout (double-stream blocks,
# 3584-d condition tokens = Qwen2.5-VL-7B's width), so the kontext connector output can feed
# the stage-1 head and the stage-2 DiT alike, and both export as QwenImageTransformer2DModel.
# - head_870m: inner 1536 (12 x 128 heads), 10 blocks -> ~0.86B parameters, the paper's
#   "lightweight" stage-1 head.
# - dit_10b: Qwen-Image's width (24 x 128 heads, MSRoPE 16/56/56) at half its depth (30 of
#   60 blocks) -> ~10.2B, the paper's in-house scale; same width means Qwen-Image weights seed
#   it: `qk-jax surgery --dit QWEN_IMAGE_DIR --dit-layers every_other` (see qk_jax/dit_seeding.py).
SIZES: dict[str, MMDiTConfig] = {
    "tiny": MMDiTConfig(
        family="qwen_image",
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        num_heads=2,
        head_dim=16,
        joint_attention_dim=24,
        axes_dims_rope=(4, 6, 6),
    ),
    "tiny_flux": MMDiTConfig(
        family="flux",
        patch_size=1,
        in_channels=16,
        out_channels=None,
        num_layers=1,
        num_single_layers=2,
        num_heads=2,
        head_dim=16,
        joint_attention_dim=24,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    "head_870m": MMDiTConfig(family="qwen_image", num_layers=10, num_heads=12, head_dim=128),
    "dit_10b": MMDiTConfig(family="qwen_image", num_layers=30, num_heads=24, head_dim=128),
    "qwen_image_20b": MMDiTConfig(family="qwen_image"),
    "flux_12b": MMDiTConfig(
        family="flux",
        patch_size=1,
        in_channels=64,
        out_channels=None,
        num_layers=19,
        num_single_layers=38,
        num_heads=24,
        head_dim=128,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
    ),
}


def mmdit_config(name: str, **overrides) -> MMDiTConfig:
    """A named size (`tiny`, `tiny_flux`, `head_870m`, `dit_10b`, `qwen_image_20b`, `flux_12b`) with overrides."""
    if name not in SIZES:
        raise ValueError(f"unknown MMDiT size {name!r}; known: {sorted(SIZES)}")
    return dataclasses.replace(SIZES[name], **overrides)
