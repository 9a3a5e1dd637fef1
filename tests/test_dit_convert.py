"""Converters for the four diffusers models: coverage both ways, diffusers folder -> tree -> diffusers
folder (loads with `from_pretrained`, identical weights and outputs), sharded export, clear errors."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchKL
from diffusers import AutoencoderKLQwenImage as TorchQwenVAE
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
from safetensors.numpy import load_file, save_file

from dit_testing import FLUX_TINY, KL_TINY, QWEN_TINY, QWEN_VAE_TINY, save_tiny, t
from qk_jax.convert import flux, qwen_image, vae_kl, vae_qwen_image
from qk_jax.convert.mapping import MappingError
from qk_jax.convert.safetensors_io import tensor_names
from qk_jax.models.mmdit import abstract_params
from qk_jax.models.vae import abstract_vae_params
from qk_jax.tree import flatten_tree

pytestmark = pytest.mark.slow  # conversion parity against diffusers models

CASES = {
    "qwen_image": (QwenImageTransformer2DModel, QWEN_TINY, qwen_image, abstract_params),
    "flux": (FluxTransformer2DModel, FLUX_TINY, flux, abstract_params),
    "vae": (TorchKL, KL_TINY, vae_kl, abstract_vae_params),
    "qwen_image_vae": (TorchQwenVAE, QWEN_VAE_TINY, vae_qwen_image, abstract_vae_params),
}


def _forward(name, model):
    rng = np.random.default_rng(0)
    with torch.no_grad():
        if name == "qwen_image":
            return model(
                hidden_states=t(rng.standard_normal((1, 8, 16)).astype(np.float32)),
                encoder_hidden_states=t(rng.standard_normal((1, 3, 24)).astype(np.float32)),
                encoder_hidden_states_mask=torch.ones(1, 3, dtype=torch.bool),
                timestep=torch.tensor([0.5]),
                img_shapes=[[(1, 2, 4)]],
            ).sample
        if name == "flux":
            return model(
                hidden_states=t(rng.standard_normal((1, 8, 16)).astype(np.float32)),
                encoder_hidden_states=t(rng.standard_normal((1, 3, 24)).astype(np.float32)),
                pooled_projections=torch.zeros(1, 8),
                timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(8, 3),
                txt_ids=torch.zeros(3, 3),
                guidance=torch.tensor([3.0]),
            ).sample
        x = t(rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32))
        if name == "qwen_image_vae":
            x = x[:, :, None]
        return model(x).sample


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_through_our_tree(name, tmp_path):
    cls, cfg, conv, abstract = CASES[name]
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = save_tiny(cls, src, cfg)
    config, params = conv.load(src)
    mapping = conv.mapping(config)
    mapping.check_coverage(tensor_names(src), flatten_tree(abstract(config)).keys())  # HF -> ours and back
    conv.save(dst, config, params)
    assert sorted(tensor_names(dst)) == sorted(tensor_names(src))
    a, b = (
        load_file(str(src / "diffusion_pytorch_model.safetensors")),
        load_file(str(dst / "diffusion_pytorch_model.safetensors")),
    )
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # both folders through from_pretrained (a freshly built model can differ in the last bit)
    original, exported = cls.from_pretrained(str(src)).eval(), cls.from_pretrained(str(dst)).eval()
    assert torch.equal(_forward(name, original), _forward(name, exported))
    del model


def test_sharded_export_and_pipeline_folder(tmp_path):
    save_tiny(QwenImageTransformer2DModel, tmp_path / "pipe" / "transformer", QWEN_TINY)
    config, params = qwen_image.load(tmp_path / "pipe")  # pipeline folder: finds transformer/
    files = qwen_image.save(tmp_path / "sharded", config, params, max_shard_bytes=20_000)
    assert len(files) > 1 and (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    reloaded = QwenImageTransformer2DModel.from_pretrained(str(tmp_path / "sharded"))
    original = QwenImageTransformer2DModel.from_pretrained(str(tmp_path / "pipe" / "transformer"))
    for (k, v), (k2, v2) in zip(original.state_dict().items(), reloaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_clear_errors(tmp_path):
    save_tiny(QwenImageTransformer2DModel, tmp_path, QWEN_TINY)
    weights = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    # a missing (non-stacked) tensor is named
    broken = dict(weights)
    del broken["proj_out.bias"]
    save_file(broken, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="proj_out/bias"):
        qwen_image.load(tmp_path)
    # a missing layer of a stacked parameter is named
    broken = {k: v for k, v in weights.items() if k != "transformer_blocks.1.img_mod.1.weight"}
    save_file(broken, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(MappingError, match="double_blocks/img_mod/kernel"):
        qwen_image.load(tmp_path)
    # an unknown tensor is named
    save_file(
        dict(weights, **{"extra.weight": np.zeros(2, np.float32)}),
        str(tmp_path / "diffusion_pytorch_model.safetensors"),
    )
    with pytest.raises(MappingError, match="extra.weight"):
        qwen_image.load(tmp_path)
    # a config that disagrees with the weights names the parameter and both shapes
    save_file(weights, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, joint_attention_dim=32)))
    with pytest.raises(ValueError, match="txt_in/kernel has shape"):
        qwen_image.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        qwen_image.load(tmp_path / "nowhere")
