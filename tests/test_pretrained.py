"""A fresh run takes pretrained weights from the config's checkpoint folders (HF / diffusers
safetensors), placed on the run's shardings; mismatched architectures are refused by name."""

import jax
import numpy as np
import pytest

import kontext_util as ku
from qk_jax import sharding
from qk_jax.config import ConfigError
from qk_jax.convert import qwen2_5_vl as vlm_convert
from qk_jax.convert import qwen_image as dit_convert
from qk_jax.models.kontext import QueryKontext
from qk_jax.pretrained import load_pretrained
from qk_jax.tree import flatten_tree


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shapes_dir):
    proc = ku.processor_dir(tmp_path_factory)
    config = ku.stage_config(2, shapes_dir)
    kcfg = ku.model_config(config, proc)
    model = QueryKontext(kcfg)
    mesh = sharding.make_mesh((2, 4, 1))
    with jax.set_mesh(mesh):
        params, shardings, _ = sharding.init_sharded(model.init, mesh, jax.random.key(0))
        other, _, _ = sharding.init_sharded(model.init, mesh, jax.random.key(1))
    folders = tmp_path_factory.mktemp("pretrained")
    vlm_dir, dit_dir = str(folders / "vlm"), str(folders / "dit")
    vlm_convert.export_hf(vlm_dir, kcfg.vlm, jax.device_get(other["vlm"]))
    dit_convert.save(dit_dir, kcfg.generator, jax.device_get(other["dit"]))
    return config, kcfg, params, shardings, other, vlm_dir, dit_dir


def test_checkpoint_folders_replace_their_subtrees(setup):
    config, kcfg, params, shardings, other, vlm_dir, dit_dir = setup
    config = config.copy_and_resolve_references()
    config.model.vlm.checkpoint = vlm_dir
    config.model.generator.checkpoint = dit_dir
    with jax.set_mesh(shardings["vlm"]["language_model"]["norm"]["scale"].mesh):
        new, loaded = load_pretrained(params, config, kcfg, shardings)
    assert loaded == {"vlm": vlm_dir, "dit": dit_dir}
    for key in ("vlm", "dit"):
        for path, value in flatten_tree(new[key]).items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(flatten_tree(other[key])[path]), path)
            assert value.sharding == flatten_tree(shardings[key])[path], path
    np.testing.assert_array_equal(
        np.asarray(new["connector"]["fc1"]["kernel"]), np.asarray(params["connector"]["fc1"]["kernel"])
    )  # untouched


def test_an_architecture_mismatch_names_the_field(setup, tmp_path):
    config, kcfg, params, shardings, other, vlm_dir, _ = setup
    bad = kcfg.vlm.replace(text=kcfg.vlm.text.__class__(**{**kcfg.vlm.text.__dict__, "rope_theta": 123.0}))
    vlm_convert.export_hf(str(tmp_path / "vlm"), bad, jax.device_get(other["vlm"]))
    config = config.copy_and_resolve_references()
    config.model.vlm.checkpoint = str(tmp_path / "vlm")
    with pytest.raises(ConfigError, match=r"model.vlm.checkpoint.*rope_theta: checkpoint 123.0"):
        load_pretrained(params, config, kcfg, shardings)


def test_converted_orbax_checkpoints_are_taken_as_well(setup, tmp_path):
    """`qk-jax convert --to-orbax` output is a valid checkpoint field: same weights, run's shardings."""
    from qk_jax.convert import cli

    config, kcfg, params, shardings, other, vlm_dir, dit_dir = setup
    mesh = shardings["vlm"]["language_model"]["norm"]["scale"].mesh
    for model, src in (("qwen2_5_vl", vlm_dir), ("qwen_image", dit_dir)):
        cli.hf_to_orbax(
            model, src, str(tmp_path / model), mesh_cfg={"data": 1, "fsdp": 8, "tensor": 1}, log=lambda *_: None
        )
    config = config.copy_and_resolve_references()
    config.model.vlm.checkpoint = str(tmp_path / "qwen2_5_vl")
    config.model.generator.checkpoint = str(tmp_path / "qwen_image")
    with jax.set_mesh(mesh):
        new, loaded = load_pretrained(params, config, kcfg, shardings)
    assert loaded == {"vlm": str(tmp_path / "qwen2_5_vl"), "dit": str(tmp_path / "qwen_image")}
    for key in ("vlm", "dit"):
        for path, value in flatten_tree(new[key]).items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(flatten_tree(other[key])[path]), path)
            assert value.sharding == flatten_tree(shardings[key])[path], path
    # a checkpoint of another model, and a folder that is neither, are refused naming the field
    config.model.generator.checkpoint = str(tmp_path / "qwen2_5_vl")
    with pytest.raises(ConfigError, match=r"model.generator.checkpoint=.*'qwen2_5_vl' weights, not 'qwen_image'"):
        load_pretrained(params, config, kcfg, shardings)
    config.model.generator.checkpoint = str(tmp_path)
    with pytest.raises(ConfigError, match=r"model.generator.checkpoint=.*neither a HF / diffusers folder"):
        load_pretrained(params, config, kcfg, shardings)
