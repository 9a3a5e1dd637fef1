"""Stage config (ml_collections, plain values) -> `KontextConfig` (frozen dataclasses), and
the start-up checks that name the offending field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from qk_jax import flow, optim, paths
from qk_jax.config import ConfigError, check_divisible, get_field, has_field, require
from qk_jax.models import blur as blur_lib
from qk_jax.models.connector import ConnectorConfig
from qk_jax.models.kontext import CondDropout, KontextConfig, LoraConfig
from qk_jax.models.mmdit import mmdit_config
from qk_jax.models.qwen2_5_vl import get_config as vlm_config
from qk_jax.models.vae import vae_config
from qk_jax.models.vae.pixel import PixelSpaceConfig

REQUIRED = (
    "stage",
    "model.vlm.size",
    "model.generator.size",
    "model.generator.key",
    "model.vae.kind",
    "model.num_queries",
    "train.steps",
    "train.batch_size",
    "train.learning_rate",
    "data.max_text_len",
)


def _plain(d) -> dict:
    return d.to_dict() if hasattr(d, "to_dict") else dict(d or {})


def nested_replace(cfg, overrides: Mapping[str, Any], where: str):
    """dataclasses.replace that descends into nested config dataclasses
    (`{"text": {"num_hidden_layers": 2}}`) and names an unknown field."""
    changes = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"config field {where}.{key} does not exist in {type(cfg).__name__}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = nested_replace(current, value, f"{where}.{key}")
        elif isinstance(current, tuple) and isinstance(value, (list, tuple)):
            changes[key] = tuple(value)
        else:
            changes[key] = value
    return dataclasses.replace(cfg, **changes)


def _vlm(config, special_token_ids: Mapping[str, int] | None):
    m = config.model
    vlm = nested_replace(vlm_config(m.vlm.size), _plain(m.vlm.get("overrides", {})), "model.vlm.overrides")
    vlm = vlm.replace(attention_impl=m.attention_impl, remat=m.remat)
    if special_token_ids:
        vlm = vlm.with_special_tokens(dict(special_token_ids))
    return vlm


def _generator(config):
    m = config.model
    g = m.generator
    base = nested_replace(mmdit_config(g.size), _plain(g.get("overrides", {})), "model.generator.overrides")
    return dataclasses.replace(base, dtype=m.dtype, remat=m.remat, attention_impl=m.attention_impl)


def _vae(config):
    v = config.model.vae
    if v.kind == "pixel":
        keep = int(v.get("keep", 0))
        try:
            return PixelSpaceConfig(factor=int(v.factor), keep=keep)
        except ValueError as e:
            raise ConfigError(f"config field model.vae.keep={keep}: {e}") from None
    if v.kind in ("kl", "qwen_image"):
        cfg = vae_config(v.size)
        if cfg.downsample_factor != v.factor:
            raise ConfigError(
                f"config field model.vae.factor={v.factor} but VAE size {v.size!r} downsamples {cfg.downsample_factor}x"
            )
        return cfg
    raise ConfigError(f"config field model.vae.kind={v.kind!r}: use 'pixel', 'kl' or 'qwen_image'")


def build_kontext_config(config, special_token_ids: Mapping[str, int] | None = None) -> KontextConfig:
    """The model of a stage config. ConfigError names the field of any inconsistency."""
    require(config, REQUIRED)
    m = config.model
    vlm = _vlm(config, special_token_ids)
    generator = _generator(config)
    conn = ConnectorConfig(in_dim=vlm.text.hidden_size, dtype=m.dtype, **_plain(m.connector))
    lora = lambda d: LoraConfig(rank=int(d.rank), alpha=float(d.alpha), targets=tuple(d.targets))
    try:
        return KontextConfig(
            vlm=vlm,
            generator=generator,
            vae=_vae(config),
            connector=conn,
            num_queries=int(m.num_queries),
            generator_key=m.generator.key,
            generator_init=m.generator.get("init", "default"),
            low_level=bool(m.low_level),
            position_scheme=m.position_scheme,
            lora_vlm=lora(m.lora_vlm),
            lora_dit=lora(m.lora_dit),
            timesteps=flow.TimestepConfig(**_plain(m.timesteps)),
            blur=blur_lib.BlurConfig(**_plain(m.get("blur", {}))),
            dropout=CondDropout(**_plain(m.dropout)),
            prediction=m.get("prediction", "velocity"),
            sigma_data=float(m.get("sigma_data", 0.5)),
            loss_weighting=m.get("loss_weighting", "velocity"),
            foreground_weight=float(m.get("foreground_weight", 0.0)),
            foreground_max_t=float(m.get("foreground_max_t", 1.0)),
            mean_error_weight=float(m.get("mean_error_weight", 1.0)),
            dtype=m.dtype,
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def divisibility_table(kcfg: KontextConfig) -> tuple[dict[str, tuple[str, ...]], dict[str, int]]:
    """(name -> mesh axes whose product must divide it, the values the model config derives)
    for `check_divisible`: the batch splits over data x fsdp, attention heads over tensor."""
    derived = {
        "model.vlm: num_attention_heads": kcfg.vlm.text.num_attention_heads,
        "model.vlm: num_key_value_heads": kcfg.vlm.text.num_key_value_heads,
        "model.vlm: vision num_heads": kcfg.vlm.vision.num_heads,
        "model.generator: num_heads": kcfg.generator.num_heads,
    }
    return {"train.batch_size": ("data", "fsdp"), **{name: ("tensor",) for name in derived}}, derived


# Fields that are run-time choices, not architecture: ignored when comparing configs. The
# special-token ids come from the run's tokenizer (`Qwen25VLConfig.with_special_tokens`).
RUNTIME_FIELDS = (
    "dtype",
    "param_dtype",
    "remat",
    "attention_impl",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def architecture_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Where the (nested) config dataclasses `a` (a checkpoint's) and `b` (the run's) differ,
    one "field: checkpoint A vs config B" per field, `RUNTIME_FIELDS` left out."""
    out = []
    for f in dataclasses.fields(a):
        if f.name in RUNTIME_FIELDS:
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            out += architecture_differences(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.append(f"{prefix}{f.name}: checkpoint {x!r} vs config {y!r}")
    return out


NONFINITE_MODES = ("stop", "skip_step")  # config field train.nonfinite: what a non-finite step does

# Numeric fields and the interval each must lie in ("[" / "]" include the bound, "(" / ")"
# exclude it). A value outside would not fail at start but mid-run (log_every=0 divides by zero
# at the first log line) or train something other than asked (a negative learning rate ascends,
# an EMA decay of 1 never moves).
RANGES = {
    "train.steps": "[1, inf)",
    "train.batch_size": "[1, inf)",
    "train.grad_accum": "[1, inf)",
    "train.learning_rate": "(0, inf)",
    "train.warmup_steps": "[0, inf)",
    "train.end_lr_ratio": "[0, 1]",
    "train.b1": "[0, 1)",
    "train.b2": "[0, 1)",
    "train.eps": "(0, inf)",
    "train.weight_decay": "[0, inf)",
    "train.grad_clip_norm": "[0, inf)",
    "train.ema_decay": "[0, 1)",
    "train.log_every": "[1, inf)",
    "train.checkpoint_every": "[1, inf)",
    "train.keep_checkpoints": "[1, inf)",
    "train.keep_period": "[0, inf)",
    "train.sample_every": "[0, inf)",
    "train.sample_images": "[0, inf)",
    "train.signal.every": "[0, inf)",
    "train.signal.samples": "[0, inf)",
    "train.signal.noise_seeds": "[1, inf)",
    "train.signal.completion_steps": "[1, inf)",
    "train.signal.judge_samples": "[0, inf)",
    "model.dropout.uncond": "[0, 1]",
    "model.dropout.no_text": "[0, 1]",
    "model.dropout.no_images": "[0, 1]",
    "model.dropout.text": "[0, 1]",
    "model.dropout.kontext": "[0, 1]",
    "sample.steps": "[1, inf)",
    "sample.guidance": "(-inf, inf)",  # any finite scale (1: no guidance)
    "sample.image_guidance": "(-inf, inf)",
}


def in_interval(value: float, interval: str) -> bool:
    """Whether `value` lies in `interval`, written "[low, high)" etc. (inf: unbounded)."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below  # NaN fails both


def check_ranges(config, ranges: Mapping[str, str] = RANGES) -> None:
    """ConfigError naming the first field of `ranges` present in `config` whose value is not a
    number within its interval."""
    for field, interval in ranges.items():
        if not has_field(config, field):
            continue
        value = get_field(config, field)
        try:
            ok = not isinstance(value, bool) and in_interval(float(value), interval)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"config field {field}={value!r} must be a number in {interval}")


def validate(config, num_devices: int, kcfg: KontextConfig | None = None) -> KontextConfig:
    """All start-up checks; returns the model config."""
    check_ranges(config)
    try:
        optim.check_warmup(config.train)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    kcfg = kcfg or build_kontext_config(config)
    check_divisible(config, num_devices, *divisibility_table(kcfg))
    if config.train.batch_size % max(int(config.train.grad_accum), 1):
        raise ConfigError(
            f"config field train.batch_size={config.train.batch_size} is not divisible by "
            f"train.grad_accum={config.train.grad_accum}"
        )
    f = kcfg.downsample
    side = int(round(config.data.area**0.5))
    if config.data.multiple % f:
        raise ConfigError(
            f"config field data.multiple={config.data.multiple} must be a multiple of {f} "
            "(autoencoder factor x DiT patch)"
        )
    if side % f:
        raise ConfigError(f"config field data.area={config.data.area}: side {side} is not a multiple of {f}")
    nonfinite = config.train.get("nonfinite", "stop")
    if nonfinite not in NONFINITE_MODES:
        raise ConfigError(f"config field train.nonfinite={nonfinite!r} must be one of {NONFINITE_MODES}")
    if kcfg.low_level and config.data.image_slots < 1:
        raise ConfigError("config field data.image_slots must be >= 1 when model.low_level is on (stage 3)")
    return kcfg


def read_special_token_ids(processor_dir: str) -> dict[str, int] | None:
    """`special_token_ids.json` of an offline tokenizer folder (see data/tokenizer.py), if present."""
    path = paths.join(processor_dir, "special_token_ids.json")
    if not paths.exists(path):
        return None
    return json.loads(paths.read_text(path))


def describe(kcfg: KontextConfig) -> str:
    """One line per part: what the model is made of."""
    g = kcfg.generator
    v = kcfg.vlm
    vae = kcfg.vae
    return "\n".join(
        [
            f"VLM        Qwen2.5-VL text {v.text.hidden_size}x{v.text.num_hidden_layers}L, vision "
            f"{v.vision.hidden_size}x{v.vision.depth}L; K = {kcfg.num_queries} kontext queries",
            f"connector  {kcfg.connector.kind} {kcfg.connector.in_dim} -> {kcfg.connector.out_dim}",
            f"{kcfg.generator_key:10s} MMDiT ({g.family}) {g.num_heads}x{g.head_dim} heads, {g.num_layers} double + "
            f"{g.num_single_layers} single blocks",
            f"autoencoder {type(vae).__name__} ({kcfg.latent_channels} latent channels, {vae.downsample_factor}x)"
            + ("; low-level path ON (" + kcfg.position_scheme + ")" if kcfg.low_level else ""),
        ]
    )
