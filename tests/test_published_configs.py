"""The config files of the published checkpoints (tests/fixtures/published/, copies of the hub's
files) parse as transformers / diffusers parse them, and describe models of the published sizes."""

from __future__ import annotations

import json
import logging
import os
import types

import pytest
import torch
from diffusers import AutoencoderKL as TorchKL
from diffusers import AutoencoderKLQwenImage as TorchQwenVAE
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

from qk_jax.convert import registry
from qk_jax.convert.diffusers_configs import from_diffusers, to_diffusers
from qk_jax.convert.qwen2_5_vl import config_from_hf
from qk_jax.data.vlm_inputs import vision_geometry
from qk_jax.flow_solvers import FlowMatchSchedule
from qk_jax.models import mmdit, qwen2_5_vl
from qk_jax.models.mmdit.config import MMDiTConfig
from qk_jax.models.qwen2_5_vl import ConfigError
from qk_jax.models.vae import vae_param_count
from qk_jax.models.vae.kl import AutoencoderKLConfig

PUBLISHED = os.path.join(os.path.dirname(__file__), "fixtures", "published")
VLMS = {"Qwen2.5-VL-7B-Instruct": 8_292_166_656, "Qwen2.5-VL-3B-Instruct": 3_754_622_976}
DITS = {
    "Qwen-Image": ("qwen_image", QwenImageTransformer2DModel, 20_430_401_088),
    "FLUX.1-dev": ("flux", FluxTransformer2DModel, 11_901_408_320),
}
VAES = {"Qwen-Image": ("qwen_image_vae", TorchQwenVAE), "FLUX.1-dev": ("vae", TorchKL)}


def _json(*parts) -> dict:
    with open(os.path.join(PUBLISHED, *parts)) as f:
        return json.load(f)


def _meta_count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize("name", sorted(VLMS))
def test_qwen2_5_vl_config_counts_equal_transformers(name):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = os.path.join(PUBLISHED, name)
    cfg = registry.get_model("qwen2_5_vl").read_config(folder)
    assert qwen2_5_vl.param_count(cfg) == VLMS[name]
    ref = _meta_count(lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**_json(name, "config.json"))))
    assert ref == VLMS[name]
    # the flat pre-4.50 layout (rope_scaling, in_chans) and today's nested one read the same
    assert "rope_scaling" in _json(name, "config.json") and "in_chans" in _json(name, "config.json")["vision_config"]
    nested = Qwen2_5_VLConfig(**_json(name, "config.json")).to_dict()
    assert "text_config" in nested
    assert config_from_hf(nested) == cfg
    assert cfg.vision.tokens_per_second == 2 and cfg.text.mrope_section == (16, 24, 24)


@pytest.mark.parametrize("name", sorted(VLMS))
def test_qwen2_5_vl_processor_and_generation_configs(name):
    from transformers import GenerationConfig, Qwen2VLImageProcessorPil

    folder = os.path.join(PUBLISHED, name)
    geo = vision_geometry(types.SimpleNamespace(image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder)))
    cfg = registry.get_model("qwen2_5_vl").read_config(folder)
    assert (geo["patch_size"], geo["merge_size"], geo["temporal_patch_size"]) == (
        cfg.vision.patch_size,
        cfg.vision.spatial_merge_size,
        cfg.vision.temporal_patch_size,
    )
    assert (geo["min_pixels"], geo["max_pixels"]) == (3136, 12845056)
    assert geo["patch_dim"] == cfg.vision.patch_dim
    gen = GenerationConfig.from_pretrained(folder)
    assert cfg.text.eos_token_id in gen.eos_token_id


@pytest.mark.parametrize("name", sorted(DITS))
def test_dit_config_counts_equal_diffusers(name, caplog):
    model, cls, count = DITS[name]
    with caplog.at_level(logging.WARNING, logger="qk_jax.config"):
        cfg = registry.get_model(model).read_config(os.path.join(PUBLISHED, name))
    assert mmdit.param_count(cfg) == count
    assert _meta_count(lambda: cls.from_config(_json(name, "transformer", "config.json"))) == count
    warnings = [r.getMessage() for r in caplog.records if r.name == "qk_jax.config"]
    if name == "Qwen-Image":  # the published file carries a key QwenImageTransformer2DModel does not take
        assert len(warnings) == 1 and "pooled_projection_dim" in warnings[0], warnings
        assert cfg.pooled_projection_dim is None
    else:  # FLUX.1-dev's file omits axes_dims_rope and out_channels: diffusers' defaults apply
        assert warnings == []
        assert "axes_dims_rope" not in _json(name, "transformer", "config.json")
        assert cfg.axes_dims_rope == (16, 56, 56) and cfg.out_channels is None and cfg.guidance_embeds


@pytest.mark.parametrize("name", sorted(VAES))
def test_vae_config_counts_equal_diffusers(name):
    model, cls = VAES[name]
    cfg = registry.get_model(model).read_config(os.path.join(PUBLISHED, name))
    assert vae_param_count(cfg) == _meta_count(lambda: cls.from_config(_json(name, "vae", "config.json")))


@pytest.mark.parametrize("name", sorted(DITS))
def test_scheduler_configs_parse(name):
    raw = _json(name, "scheduler", "scheduler_config.json")
    sched = from_diffusers(FlowMatchSchedule, raw)
    for key in ("use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"):
        assert getattr(sched, key) == raw[key], key
    assert sched.shift_terminal == raw.get("shift_terminal")


def test_ignored_keys_warn_once_and_unsupported_values_are_named(caplog):
    raw = _json("FLUX.1-dev", "transformer", "config.json")
    with caplog.at_level(logging.WARNING, logger="qk_jax.config"):
        cfg = from_diffusers(MMDiTConfig, {**raw, "foo": 1, "bar": [2]})
    assert cfg == from_diffusers(MMDiTConfig, raw)
    warnings = [r.getMessage() for r in caplog.records if r.name == "qk_jax.config"]
    assert len(warnings) == 1 and "'bar'" in warnings[0] and "'foo'" in warnings[0]
    with pytest.raises(ValueError, match="guidance_embeds"):
        from_diffusers(MMDiTConfig, {**_json("Qwen-Image", "transformer", "config.json"), "guidance_embeds": True})
    with pytest.raises(ValueError, match="act_fn"):
        from_diffusers(AutoencoderKLConfig, {**_json("FLUX.1-dev", "vae", "config.json"), "act_fn": "relu"})
    flat = _json("Qwen2.5-VL-7B-Instruct", "config.json")
    with pytest.raises(ConfigError, match="rope_type"):
        config_from_hf({**flat, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mrope_section": [16, 24, 24]}})
    with pytest.raises(ConfigError, match="use_sliding_window"):
        config_from_hf({**flat, "use_sliding_window": True})


@pytest.mark.parametrize("name", sorted(VLMS))
def test_exported_qwen2_5_vl_config_is_the_published_file(name):
    """What `convert --to-hf` / `--from-run` write for a published VLM is its config.json,
    value for value (less the transformers version and max_window_layers, which the 3B file
    sets to 70 > its depth; neither changes the model while use_sliding_window is false)."""
    from qk_jax.convert import published_configs

    published = _json(name, "config.json")
    cfg = config_from_hf(published)
    exported = published_configs.qwen2_5_vl(cfg, "bfloat16")
    skip = {"transformers_version", "max_window_layers"}
    assert {k: v for k, v in exported.items() if k not in skip} == {k: v for k, v in published.items() if k not in skip}
    assert config_from_hf(exported) == cfg


@pytest.mark.parametrize("model,component", [("qwen_image", "transformer"), ("qwen_image_vae", "vae")])
def test_exported_qwen_image_configs_are_the_published_files(model, component, tmp_path):
    """The Qwen-Image transformer / VAE config.json an export writes equals the published one
    (less `_diffusers_version`, which diffusers' own save_pretrained writes)."""
    from qk_jax.convert import published_configs

    published = _json("Qwen-Image", component, "config.json")
    cfg = registry.get_model(model).config_from_dict(published)
    exported = published_configs.qwen_image_transformer(cfg) if component == "transformer" else to_diffusers(cfg)
    assert exported == {k: v for k, v in published.items() if k != "_diffusers_version"}
