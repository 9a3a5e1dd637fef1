"""`qk-jax convert` (both ways) and `qk-jax parity` on tiny folders laid out as the hub publishes
Qwen2.5-VL-7B-Instruct, Qwen-Image and FLUX.1-dev: published config keys, bfloat16 weights in
shards with a hand-written index, Qwen2.5-VL's legacy and current tensor names."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cli_env import ROOT, tpu_init_errors, user_env
from published_layout import diffusers_pipeline_folder, published_config, qwen_vl_folder
from qk_jax.convert import cli, registry, safetensors_io
from qk_jax.parity import qwen2_5_vl as vl_tool

pytestmark = pytest.mark.slow  # parity tools against PyTorch in subprocesses

# parity flags that keep the runs short on two CPU cores
DIT_FLAGS = ["--height", "4", "--width", "6", "--txt-len", "8", "--pad", "2"]
VAE_FLAGS = ["--height", "32", "--width", "48"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    configs = {
        "vl_legacy": qwen_vl_folder(root / "vl_legacy", "legacy", seed=1),
        "vl_module": qwen_vl_folder(root / "vl_module", "module", seed=2),
        "Qwen-Image": diffusers_pipeline_folder(root / "Qwen-Image", "Qwen-Image", seed=3),
        "FLUX.1-dev": diffusers_pipeline_folder(root / "FLUX.1-dev", "FLUX.1-dev", seed=4),
    }
    return root, configs


def _qk_jax(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "qk_jax.cli", *args],
        cwd=ROOT,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert tpu_init_errors(proc.stderr) == [], proc.stderr[-2000:]
    return proc


def _assert_same_values(back_folder, original_folder, rename=lambda name: name):
    """Every exported tensor equals the published (bfloat16) one it came from, under its name."""
    original = {rename(k): v for k, v in safetensors_io.iter_tensors(original_folder)}
    back = dict(safetensors_io.iter_tensors(back_folder))
    assert sorted(back) == sorted(original)
    for name, value in back.items():
        assert original[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(
            np.asarray(value, np.float32), np.asarray(original[name], np.float32), err_msg=name
        )


def test_folders_are_laid_out_as_published(folders):
    root, configs = folders
    for name in ("vl_legacy", "vl_module"):
        assert set(configs[name]) == set(published_config("Qwen2.5-VL-7B-Instruct", "config.json"))
        assert configs[name]["rope_scaling"]["type"] == "mrope" and "in_chans" in configs[name]["vision_config"]
        assert (root / name / "model.safetensors.index.json").exists()
        assert len(safetensors_io.safetensors_files(root / name)) == 3
    legacy = safetensors_io.tensor_names(root / "vl_legacy")
    assert "lm_head.weight" in legacy and "visual.blocks.0.attn.qkv.weight" in legacy
    assert "model.layers.0.self_attn.q_proj.weight" in legacy
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in safetensors_io.tensor_names(root / "vl_module")
    for pipeline in ("Qwen-Image", "FLUX.1-dev"):
        for component in ("transformer", "vae"):
            assert set(configs[pipeline][component]) == set(published_config(pipeline, component, "config.json"))
            assert (root / pipeline / component / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert "pooled_projection_dim" in configs["Qwen-Image"]["transformer"]
    assert "axes_dims_rope" not in configs["FLUX.1-dev"]["transformer"]


@pytest.mark.slow
def test_qwen2_5_vl_legacy_names_convert_and_parity_cli(folders):
    root, _ = folders
    src = root / "vl_legacy"
    proc = _qk_jax(
        "parity",
        "qwen2_5_vl",
        "--checkpoint",
        str(src),
        "--image-sizes",
        "56x84,84x56",
        "--prompt-tokens",
        "520",
        "--batch-size",
        "2",
    )
    assert proc.stdout.strip().splitlines()[-1].startswith("PARITY OK"), proc.stdout[-2000:]
    _qk_jax("convert", "--model", "qwen2_5_vl", "--from-hf", str(src), "--to-orbax", str(root / "vl_orbax"))
    _qk_jax("convert", "--from-orbax", str(root / "vl_orbax"), "--to-hf", str(root / "vl_back"))
    _assert_same_values(root / "vl_back", src)  # written back under the published (legacy) names


def test_qwen2_5_vl_current_names_convert_and_parity(folders, devices):
    root, _ = folders
    src = root / "vl_module"
    out = io.StringIO()
    assert vl_tool.run(str(src), [(84, 56)], prompt_tokens=520, batch_size=2, stream=out) == 0, out.getvalue()
    assert out.getvalue().strip().splitlines()[-1].startswith("PARITY OK")
    log = lambda *_: None
    cli.hf_to_orbax(
        "qwen2_5_vl", str(src), str(root / "vlm_orbax"), mesh_cfg={"data": 1, "fsdp": 2, "tensor": 4}, log=log
    )
    cli.orbax_to_hf(str(root / "vlm_orbax"), str(root / "vlm_back"), log=log)
    legacy = lambda n: n.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
    _assert_same_values(root / "vlm_back", src, rename=legacy)  # export writes the published names
    # bfloat16 in Orbax: the published bits come back unchanged
    cli.hf_to_orbax("qwen2_5_vl", str(src), str(root / "vlm_orbax16"), dtype=jnp.bfloat16, log=log)
    cli.orbax_to_hf(str(root / "vlm_orbax16"), str(root / "vlm_back16"), log=log)
    original = {legacy(k): v for k, v in safetensors_io.iter_tensors(src)}
    for name, value in safetensors_io.iter_tensors(root / "vlm_back16"):
        assert value.dtype == ml_dtypes.bfloat16
        assert np.array_equal(value.view(np.uint16), original[name].view(np.uint16)), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "pipeline,component,model,flags",
    [
        ("Qwen-Image", "transformer", "qwen_image", DIT_FLAGS),
        ("Qwen-Image", "vae", "qwen_image_vae", VAE_FLAGS),
        ("FLUX.1-dev", "transformer", "flux", DIT_FLAGS),
        ("FLUX.1-dev", "vae", "vae", VAE_FLAGS),
    ],
)
def test_diffusers_pipeline_folders_convert_and_parity_cli(folders, pipeline, component, model, flags):
    root, configs = folders
    src = root / pipeline  # the pipeline folder, as downloaded: the tools pick the component
    proc = _qk_jax("parity", model, "--checkpoint", str(src), *flags)
    assert proc.stdout.strip().splitlines()[-1].startswith("PARITY OK"), proc.stdout[-2000:]
    orbax, back = root / f"{model}_orbax", root / f"{model}_back"
    _qk_jax("convert", "--model", model, "--from-hf", str(src), "--to-orbax", str(orbax))
    _qk_jax("convert", "--from-orbax", str(orbax), "--to-hf", str(back))
    _assert_same_values(back, src / component)
    spec = registry.get_model(model)
    assert spec.read_config(back) == spec.read_config(src)
    exported = json.loads((back / "config.json").read_text())
    assert exported["_class_name"] == configs[pipeline][component]["_class_name"]
