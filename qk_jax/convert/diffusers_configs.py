"""diffusers `config.json` dicts <-> qk_jax's configs (`MMDiTConfig`, the two VAE configs,
the sampler's `FlowMatchSchedule`), and the scheduler_config.json reader.

The config dataclasses live with what they configure (`qk_jax.models`, `flow_solvers.py`),
which read no files and know no diffusers key names; this module is the one place that
translates, in both directions: `from_diffusers(config_cls, d)` / `to_diffusers(config)`
dispatch on the class.
Reading follows diffusers (`config_keys.reference_arguments`: missing keys take the class's
defaults, unknown keys are ignored with one warning); each reader then refuses, by name,
only the values qk_jax does not implement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from qk_jax.convert.config_keys import reference_arguments
from qk_jax.flow_solvers import FlowMatchSchedule
from qk_jax.models.mmdit import MMDiTConfig
from qk_jax.models.vae import AutoencoderKLConfig, QwenImageVAEConfig

# ------------------------------------------------------------------ MMDiT

_MMDIT_CLASS = {"qwen_image": "QwenImageTransformer2DModel", "flux": "FluxTransformer2DModel"}

# The `__init__` arguments of the two diffusers classes and their defaults (diffusers 0.35-0.42):
# what a config.json that omits a key means (FLUX.1-dev's has no axes_dims_rope / out_channels).
_MMDIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen_image": dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
        zero_cond_t=False,
        use_additional_t_cond=False,
        use_layer3d_rope=False,
    ),
    "flux": dict(
        patch_size=1,
        in_channels=64,
        out_channels=None,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    ),
}


def mmdit_from_diffusers(cfg: Mapping[str, Any], **runtime) -> MMDiTConfig:
    """Reads a diffusers transformer config.json dict (Qwen-Image or FLUX) as diffusers does.

    The family comes from `_class_name` when present, else from the keys
    (`num_single_layers` only exists in FLUX configs). Missing keys take the diffusers
    class's defaults; keys the class does not take are ignored with one warning
    (`reference_arguments`). `runtime` sets dtype / remat / attention_impl.
    """
    name = cfg.get("_class_name")
    if name == "QwenImageTransformer2DModel" or (name is None and "num_single_layers" not in cfg):
        family = "qwen_image"
    elif name == "FluxTransformer2DModel" or (name is None and "num_single_layers" in cfg):
        family = "flux"
    else:
        raise ValueError(f"config.json _class_name={name!r}: expected one of {sorted(_MMDIT_CLASS.values())}")
    get = reference_arguments(cfg, _MMDIT_CLASS[family], _MMDIT_DEFAULTS[family])
    if family == "qwen_image" and get["guidance_embeds"]:
        raise ValueError(
            "QwenImageTransformer2DModel config.json has guidance_embeds=true: diffusers builds no "
            "guidance embedder for it (its forward fails when guidance is passed); unsupported"
        )
    return MMDiTConfig(
        family=family,
        patch_size=int(get["patch_size"]),
        in_channels=int(get["in_channels"]),
        out_channels=None if get["out_channels"] is None else int(get["out_channels"]),
        num_layers=int(get["num_layers"]),
        num_single_layers=int(get.get("num_single_layers") or 0),
        num_heads=int(get["num_attention_heads"]),
        head_dim=int(get["attention_head_dim"]),
        joint_attention_dim=int(get["joint_attention_dim"]),
        pooled_projection_dim=None if family == "qwen_image" else int(get["pooled_projection_dim"]),
        guidance_embeds=bool(get["guidance_embeds"]),
        axes_dims_rope=tuple(int(a) for a in get["axes_dims_rope"]),
        zero_cond_t=bool(get.get("zero_cond_t", False)),
        use_additional_t_cond=bool(get.get("use_additional_t_cond", False)),
        use_layer3d_rope=bool(get.get("use_layer3d_rope", False)),
        **runtime,
    )


def mmdit_to_diffusers(config: MMDiTConfig) -> dict[str, Any]:
    """The config.json dict diffusers' `from_pretrained` reads for this architecture."""
    common = dict(
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.num_layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.joint_attention_dim,
        guidance_embeds=config.guidance_embeds,
        axes_dims_rope=list(config.axes_dims_rope),
    )
    if config.rope_theta != 10000.0 or config.mlp_ratio != 4.0 or config.eps != 1e-6:
        raise ValueError(
            "MMDiTConfig: diffusers fixes rope_theta=10000, mlp_ratio=4, eps=1e-6; this config "
            f"has {config.rope_theta}, {config.mlp_ratio}, {config.eps} and cannot be exported"
        )
    if (
        config.absolute_positions
        or config.local_mixing
        or config.patch_bottleneck
        or config.cell_conv_width
        or (config.txt_positions == "zeros" and config.family == "qwen_image")
    ):
        raise ValueError(
            "MMDiTConfig: absolute_positions=True (a sin-cos embedding of each image token's place), "
            "local_mixing=True (a 3x3 convolution over the token grid), patch_bottleneck (a narrow "
            "projection before img_in), cell_conv_width (convolutions over the latent cells) and "
            "txt_positions='zeros' on a Qwen-Image DiT have no "
            "diffusers counterpart; such a DiT cannot be exported"
        )
    if config.family == "qwen_image":
        if config.num_single_layers or config.pooled_projection_dim:
            raise ValueError(
                "MMDiTConfig: QwenImageTransformer2DModel has no single-stream blocks and no pooled "
                f"projection (num_single_layers={config.num_single_layers}, "
                f"pooled_projection_dim={config.pooled_projection_dim})"
            )
        return {
            "_class_name": _MMDIT_CLASS["qwen_image"],
            **common,
            "zero_cond_t": config.zero_cond_t,
            "use_additional_t_cond": config.use_additional_t_cond,
            "use_layer3d_rope": config.use_layer3d_rope,
        }
    if config.zero_cond_t or config.use_additional_t_cond or config.use_layer3d_rope:
        raise ValueError(
            "MMDiTConfig: zero_cond_t / use_additional_t_cond / use_layer3d_rope are Qwen-Image "
            "options; FluxTransformer2DModel has none of them"
        )
    if config.pooled_projection_dim is None:
        raise ValueError(
            "MMDiTConfig: FluxTransformer2DModel always has a pooled projection; set pooled_projection_dim"
        )
    return {
        "_class_name": _MMDIT_CLASS["flux"],
        **common,
        "num_single_layers": config.num_single_layers,
        "pooled_projection_dim": config.pooled_projection_dim,
    }


def mmdit_class_name(config: MMDiTConfig) -> str:
    """The diffusers class an `MMDiTConfig` exports as."""
    return _MMDIT_CLASS[config.family]


# ------------------------------------------------------------------ VAEs

# diffusers `AutoencoderKL.__init__` arguments and defaults (what a missing config.json key means).
_KL_DEFAULTS: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
    shift_factor=None,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)


def kl_vae_from_diffusers(cfg: Mapping[str, Any], **runtime) -> AutoencoderKLConfig:
    """Reads an `AutoencoderKL` config.json dict as diffusers does (missing keys take the class's
    defaults, keys it does not take are ignored with one warning); block types other than
    DownEncoderBlock2D / UpDecoderBlock2D and activations other than SiLU are refused by name."""
    get = reference_arguments(cfg, "AutoencoderKL", _KL_DEFAULTS)
    n = len(get["block_out_channels"])
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        got = list(get[key]) if key in cfg else [want] * n
        if got != [want] * n:
            raise ValueError(f"AutoencoderKL config.json {key}={got}: qk_jax implements {n} x {want!r} only")
    if get["act_fn"] != "silu":
        raise ValueError(f"AutoencoderKL config.json act_fn={get['act_fn']!r}: only 'silu' is implemented")
    tup = lambda v: None if v is None else tuple(v)
    return AutoencoderKLConfig(
        in_channels=get["in_channels"],
        out_channels=get["out_channels"],
        block_out_channels=tuple(get["block_out_channels"]),
        layers_per_block=get["layers_per_block"],
        latent_channels=get["latent_channels"],
        norm_num_groups=get["norm_num_groups"],
        scaling_factor=get["scaling_factor"],
        shift_factor=get["shift_factor"],
        use_quant_conv=get["use_quant_conv"],
        use_post_quant_conv=get["use_post_quant_conv"],
        mid_block_add_attention=get["mid_block_add_attention"],
        sample_size=get["sample_size"],
        force_upcast=get["force_upcast"],
        latents_mean=tup(get["latents_mean"]),
        latents_std=tup(get["latents_std"]),
        **runtime,
    )


def kl_vae_to_diffusers(config: AutoencoderKLConfig) -> dict[str, Any]:
    """The `AutoencoderKL` config.json dict."""
    n = len(config.block_out_channels)
    lst = lambda v: None if v is None else list(v)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": config.sample_size,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
        "latents_mean": lst(config.latents_mean),
        "latents_std": lst(config.latents_std),
        "force_upcast": config.force_upcast,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv,
        "mid_block_add_attention": config.mid_block_add_attention,
    }


# `AutoencoderKLQwenImage.__init__` arguments; their defaults are `QwenImageVAEConfig`'s.
_QWEN_VAE_KEYS = (
    "base_dim",
    "z_dim",
    "dim_mult",
    "num_res_blocks",
    "attn_scales",
    "temperal_downsample",
    "dropout",
    "input_channels",
    "latents_mean",
    "latents_std",
)


def qwen_vae_from_diffusers(cfg: Mapping[str, Any], **runtime) -> QwenImageVAEConfig:
    """Reads an `AutoencoderKLQwenImage` config.json dict as diffusers does (missing keys take the
    class's defaults, keys it does not take are ignored with one warning)."""
    defaults = QwenImageVAEConfig()
    values = reference_arguments(cfg, "AutoencoderKLQwenImage", {k: getattr(defaults, k) for k in _QWEN_VAE_KEYS})
    return QwenImageVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}, **runtime)


def qwen_vae_to_diffusers(config: QwenImageVAEConfig) -> dict[str, Any]:
    """The config.json dict in the published layout: Qwen-Image's vae/config.json predates
    `input_channels`, which is written only when it is not diffusers' default of 3."""
    out = {"_class_name": "AutoencoderKLQwenImage"}
    for k in _QWEN_VAE_KEYS:
        v = getattr(config, k)
        if k == "input_channels" and v == 3:
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


# ------------------------------------------------------------------ scheduler

SCHEDULER_CONFIG = "scheduler_config.json"
# diffusers `FlowMatchEulerDiscreteScheduler.__init__` arguments and defaults (0.35-0.42).
_SCHEDULER_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=False,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    invert_sigmas=False,
    shift_terminal=None,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    time_shift_type="exponential",
    stochastic_sampling=False,
)


# scheduler options that change the schedule in ways qk_jax does not implement
_SCHEDULER_UNSUPPORTED = (
    "invert_sigmas",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
)


def schedule_from_diffusers(cfg: Mapping[str, Any]) -> FlowMatchSchedule:
    """Reads a `scheduler_config.json` dict as diffusers does (missing keys take the scheduler's
    defaults, keys it does not take are ignored with one warning); options that change the
    schedule in a way qk_jax does not implement are refused by name."""
    if cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(
            f"scheduler config _class_name={cfg['_class_name']!r}: qk_jax implements the "
            "FlowMatchEulerDiscreteScheduler schedule only"
        )
    get = reference_arguments(cfg, "FlowMatchEulerDiscreteScheduler", _SCHEDULER_DEFAULTS)
    on = [k for k in _SCHEDULER_UNSUPPORTED if get[k]]
    if on:
        raise ValueError(
            f"scheduler config sets {on}: qk_jax implements the plain (optionally shifted) "
            "FlowMatchEulerDiscreteScheduler schedule only"
        )
    if get["time_shift_type"] not in ("exponential", "linear"):
        raise ValueError(f"scheduler config time_shift_type={get['time_shift_type']!r}: use 'exponential' or 'linear'")
    _check_schedule_values(get)
    names = {f.name for f in dataclasses.fields(FlowMatchSchedule)}
    return FlowMatchSchedule(**{k: v for k, v in get.items() if k in names})


def _check_schedule_values(get: Mapping[str, Any]) -> None:
    """ValueError naming the key of a value the schedule cannot use (a string, a NaN, a shift of
    0): it would fail inside the sampler's arithmetic, or draw NaNs, without naming the file."""

    def number(key: str) -> float:
        value = get[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"scheduler config {key}={value!r}: must be a finite number")
        return float(value)

    if number("num_train_timesteps") < 1 or number("shift") <= 0:
        raise ValueError(
            f"scheduler config num_train_timesteps={get['num_train_timesteps']!r}, shift={get['shift']!r}: "
            "need num_train_timesteps >= 1 and shift > 0"
        )
    if not isinstance(get["use_dynamic_shifting"], bool):
        dynamic = get["use_dynamic_shifting"]
        raise ValueError(f"scheduler config use_dynamic_shifting={dynamic!r}: must be true or false")
    if get["use_dynamic_shifting"]:
        for key in ("base_shift", "max_shift"):
            number(key)
        if number("base_image_seq_len") == number("max_image_seq_len"):
            raise ValueError(
                f"scheduler config base_image_seq_len and max_image_seq_len are both {get['max_image_seq_len']!r}: "
                "the dynamic shift interpolates between them"
            )
    if get["shift_terminal"] is not None and not 0 <= number("shift_terminal") < 1:
        raise ValueError(f"scheduler config shift_terminal={get['shift_terminal']!r}: must lie in [0, 1)")


def schedule_to_diffusers(schedule: FlowMatchSchedule) -> dict[str, Any]:
    """The `scheduler_config.json` dict of a schedule."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", **dataclasses.asdict(schedule)}


def find_scheduler_config(path: str | os.PathLike) -> str | None:
    """The `scheduler_config.json` that belongs to `path`, or None.

    `path` may be the file itself, a scheduler folder, a diffusers pipeline folder (its
    `scheduler/`), or a component folder of a pipeline such as `Qwen-Image/transformer`
    (the pipeline's `scheduler/`).
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    for candidate in (
        os.path.join(path, SCHEDULER_CONFIG),
        os.path.join(path, "scheduler", SCHEDULER_CONFIG),
        os.path.join(os.path.dirname(os.path.abspath(path)), "scheduler", SCHEDULER_CONFIG),
    ):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_schedule(path: str | os.PathLike) -> FlowMatchSchedule:
    """The `FlowMatchSchedule` of a scheduler_config.json, a scheduler folder or a pipeline folder;
    FileNotFoundError / ValueError naming the path."""
    found = find_scheduler_config(path)
    if found is None:
        raise FileNotFoundError(
            f"{path} is not a {SCHEDULER_CONFIG}, nor a folder holding one (or scheduler/"
            f"{SCHEDULER_CONFIG}, as a diffusers pipeline folder does)"
        )
    try:
        with open(found) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{found} is not valid JSON: {e}") from e
    try:
        return schedule_from_diffusers(raw)
    except ValueError as e:
        raise ValueError(f"{found}: {e}") from None


# config class -> (config.json dict -> config, config -> config.json dict)
_CODECS: dict[type, tuple[Callable[..., Any], Callable[[Any], dict[str, Any]]]] = {
    MMDiTConfig: (mmdit_from_diffusers, mmdit_to_diffusers),
    AutoencoderKLConfig: (kl_vae_from_diffusers, kl_vae_to_diffusers),
    QwenImageVAEConfig: (qwen_vae_from_diffusers, qwen_vae_to_diffusers),
    FlowMatchSchedule: (schedule_from_diffusers, schedule_to_diffusers),
}


def _codec(config_cls: type):
    if config_cls not in _CODECS:
        raise TypeError(
            f"no diffusers config.json translation for {config_cls.__name__}; known: "
            f"{sorted(c.__name__ for c in _CODECS)}"
        )
    return _CODECS[config_cls]


def from_diffusers(config_cls: type, cfg: Mapping[str, Any], **runtime):
    """A `config_cls` instance from a diffusers config.json dict; `runtime` sets dtype / remat / ..."""
    return _codec(config_cls)[0](cfg, **runtime)


def to_diffusers(config) -> dict[str, Any]:
    """The diffusers config.json dict of a model config."""
    return _codec(type(config))[1](config)
