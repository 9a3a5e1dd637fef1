"""Qwen2.5-VL configuration: frozen dataclasses, validation, named sizes.

HF config.json dicts translate to and from these classes in `qk_jax.convert.qwen2_5_vl`
(`config_from_hf`, `config_to_hf`).

Named sizes (`get_config(name)`): `tiny` (tests), `demo` (a small CPU model that fits the
`qk_jax.data.tokenizer` vocabulary), `3b` and `7b` (Qwen2.5-VL-3B/7B-Instruct).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from qk_jax.models.layers import ATTENTION_IMPLS, REMAT_POLICIES

# Activations of the HF `ACT2FN` table that the MLPs may name.
SUPPORTED_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu", "quick_gelu")


class ConfigError(ValueError):
    """An invalid or unsupported Qwen2.5-VL configuration (the message names the field)."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower (ViT with window attention and a spatial patch merger).

    `window_size` is in pixels: a window spans `window_size // spatial_merge_size //
    patch_size` merged tokens per side. Blocks listed in `fullatt_block_indexes` attend
    over the whole image, the others within windows.
    """

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    tokens_per_second: int = 2
    rms_norm_eps: float = 1e-6  # HF hard-codes 1e-6 for every vision norm

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LM token (`spatial_merge_size ** 2`)."""
        return self.spatial_merge_size**2

    @property
    def patch_dim(self) -> int:
        """Flattened pixels of one patch: C * temporal_patch * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merger_window(self) -> int:
        """Window side in merged tokens."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder (GQA with q/k/v biases, RMSNorm, SwiGLU, M-RoPE)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        # HF's attention uses hidden // heads whatever `head_dim` a config.json may carry.
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    """The whole VLM plus run-time switches (attention kernel, rematerialisation)."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    # Run-time switches (not part of the HF config): `layers.dot_product_attention` impl
    # ("xla" | "dot_product" | "cudnn" | "splash") and the remat policy of both layer scans
    # (`layers.REMAT_POLICIES`).
    attention_impl: str = "xla"
    remat: str = "none"

    def __post_init__(self):
        validate(self)

    def with_special_tokens(self, ids: Mapping[str, int]) -> Qwen25VLConfig:
        """The config with token ids taken from a tokenizer's special-token table.

        `ids` maps token strings to ids, e.g. the dict `qk_jax.data.tokenizer.build_tokenizer`
        returns (`{"<|image_pad|>": 474, ...}`).
        """
        text = dataclasses.replace(
            self.text,
            eos_token_id=ids.get("<|im_end|>", self.text.eos_token_id),
            bos_token_id=ids.get("<|endoftext|>", self.text.bos_token_id),
            pad_token_id=ids.get("<|endoftext|>", self.text.pad_token_id),
        )
        return dataclasses.replace(
            self,
            text=text,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )

    def replace(self, **changes) -> Qwen25VLConfig:
        return dataclasses.replace(self, **changes)


def validate(cfg: Qwen25VLConfig) -> None:
    """Raises ConfigError naming the field of an inconsistent configuration."""
    v, t = cfg.vision, cfg.text
    if v.hidden_size % v.num_heads:
        raise ConfigError(f"vision_config.hidden_size={v.hidden_size} is not divisible by num_heads={v.num_heads}")
    if v.head_dim % 4:
        raise ConfigError(f"vision head_dim={v.head_dim} must be a multiple of 4 (2D rotary over h and w)")
    if bad := [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]:
        raise ConfigError(f"vision_config.fullatt_block_indexes {bad} are outside 0..depth-1={v.depth - 1}")
    if v.merger_window < 1:
        raise ConfigError(
            f"vision_config.window_size={v.window_size} is smaller than one merged token "
            f"(spatial_merge_size * patch_size = {v.spatial_merge_size * v.patch_size} px)"
        )
    if t.hidden_size % t.num_attention_heads:
        raise ConfigError(
            f"text_config.hidden_size={t.hidden_size} is not divisible by num_attention_heads={t.num_attention_heads}"
        )
    if t.num_attention_heads % t.num_key_value_heads:
        raise ConfigError(
            f"text_config.num_attention_heads={t.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={t.num_key_value_heads}"
        )
    if len(t.mrope_section) != 3 or sum(t.mrope_section) != t.head_dim // 2:
        raise ConfigError(
            f"text_config mrope_section={list(t.mrope_section)} must have 3 entries summing to "
            f"head_dim / 2 = {t.head_dim // 2}"
        )
    for name, act in (("vision_config.hidden_act", v.hidden_act), ("text_config.hidden_act", t.hidden_act)):
        if act not in SUPPORTED_ACTS:
            raise ConfigError(f"{name}={act!r} is not supported; use one of {SUPPORTED_ACTS}")
    if cfg.attention_impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl={cfg.attention_impl!r}: use one of {ATTENTION_IMPLS}")
    if cfg.remat not in REMAT_POLICIES:
        raise ConfigError(f"remat={cfg.remat!r}: use one of {REMAT_POLICIES}")
    for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
        if not 0 <= getattr(cfg, name) < t.vocab_size:
            raise ConfigError(f"{name}={getattr(cfg, name)} is outside the vocabulary (vocab_size={t.vocab_size})")


# ----------------------------------------------------------------------- named sizes

# Special-token ids of `qk_jax.data.tokenizer.build_tokenizer()` with its default corpus
# (the demo/tiny configs use that tokenizer); `with_special_tokens` re-targets them.
_SMALL_TOKENS = dict(image_token_id=474, video_token_id=475, vision_start_token_id=471, vision_end_token_id=472)


def _tiny() -> Qwen25VLConfig:
    return Qwen25VLConfig(
        vision=VisionConfig(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=(1,),
        ),
        text=TextConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            mrope_section=(2, 3, 3),
            max_position_embeddings=4096,
            bos_token_id=462,
            eos_token_id=464,
            pad_token_id=462,
        ),
        **_SMALL_TOKENS,
    )


def _demo() -> Qwen25VLConfig:
    return Qwen25VLConfig(
        vision=VisionConfig(
            depth=4,
            hidden_size=128,
            intermediate_size=256,
            num_heads=4,
            out_hidden_size=256,
            window_size=56,
            fullatt_block_indexes=(1, 3),
        ),
        text=TextConfig(
            vocab_size=1000,
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            mrope_section=(8, 12, 12),
            max_position_embeddings=8192,
            bos_token_id=462,
            eos_token_id=464,
            pad_token_id=462,
        ),
        tie_word_embeddings=True,
        **_SMALL_TOKENS,
    )


def _qwen_7b() -> Qwen25VLConfig:
    return Qwen25VLConfig(vision=VisionConfig(out_hidden_size=3584), text=TextConfig())


def _qwen_3b() -> Qwen25VLConfig:
    return Qwen25VLConfig(
        vision=VisionConfig(out_hidden_size=2048),
        text=TextConfig(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
        ),
        tie_word_embeddings=True,
    )


SIZES = {"tiny": _tiny, "demo": _demo, "3b": _qwen_3b, "7b": _qwen_7b}


def get_config(name: str, **overrides) -> Qwen25VLConfig:
    """A named size (`tiny`, `demo`, `3b`, `7b`) with optional top-level field overrides."""
    if name not in SIZES:
        raise ConfigError(f"unknown Qwen2.5-VL size {name!r}; known: {sorted(SIZES)}")
    return SIZES[name]().replace(**overrides) if overrides else SIZES[name]()
