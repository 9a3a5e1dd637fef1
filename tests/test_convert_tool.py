"""`qk-jax convert`: HF -> Orbax (sharded on a mesh) -> HF is bit-identical and gives identical
transformers logits; bfloat16 storage; bad input folders give errors naming them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qk_jax import checkpoint as ckpt_lib
from qk_jax import sharding
from qk_jax.convert import cli, registry, safetensors_io
from qk_jax.parity.qwen2_5_vl import make_inputs
from qwen2_5_vl_util import env_for_subprocess, other_config, save_random_checkpoint, torch_inputs

pytestmark = pytest.mark.slow  # PyTorch parity and CLI subprocesses: ~40 s of CPU


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random checkpoint (sharded safetensors), converted by the CLI onto a (1, 2, 4) mesh."""
    root = tmp_path_factory.mktemp("convert")
    cfg = other_config()  # tied head, 3 layers, merge 3: not the config the other tests use
    hf = save_random_checkpoint(cfg, str(root / "hf"), seed=3, max_shard_size="300KB")
    env = env_for_subprocess()
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qk_jax.cli",
            "convert",
            "--model",
            "qwen2_5_vl",
            "--from-hf",
            str(root / "hf"),
            "--to-orbax",
            str(root / "orbax"),
            "--mesh",
            "data=1,fsdp=2,tensor=4",
            "--step",
            "3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(root=root, cfg=cfg, hf=hf, log=proc.stdout + proc.stderr)


def test_round_trip_is_bit_identical_with_identical_logits(converted, devices):
    from transformers import Qwen2_5_VLForConditionalGeneration

    root, cfg = converted["root"], converted["cfg"]
    assert "wrote step 3" in converted["log"]
    ck = ckpt_lib.Checkpointer(root / "orbax", create=False)
    assert ck.steps() == [3]
    stored = ckpt_lib.read_json_item(root / "orbax", 3, "config")
    assert stored["model"] == "qwen2_5_vl" and stored["dtype"] == "float32"
    assert registry.get_model("qwen2_5_vl").config_from_dict(stored["hf_config"]) == cfg
    # Restored onto another mesh, then exported.
    cli.orbax_to_hf(str(root / "orbax"), str(root / "back"), mesh_cfg={"data": 2, "fsdp": 4, "tensor": 1})
    original = dict(safetensors_io.iter_tensors(root / "hf"))
    back = dict(safetensors_io.iter_tensors(root / "back"))
    assert len(safetensors_io.safetensors_files(root / "hf")) > 1  # the input was sharded with an index
    assert sorted(back) == sorted(k for k in original if k != "lm_head.weight")  # tied: no separate head
    for name, value in back.items():
        assert value.dtype == original[name].dtype and np.array_equal(value, original[name]), name
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        root / "back", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    inputs = torch_inputs(make_inputs(cfg, [(96, 144)], 80, 2, "left", seed=1))
    with torch.no_grad():
        ref, ours = converted["hf"](**inputs).logits, reloaded(**inputs).logits
    assert torch.equal(ref, ours)


def test_bfloat16_storage(converted, devices):
    root = converted["root"]
    cli.hf_to_orbax(
        "qwen2_5_vl",
        str(root / "hf"),
        str(root / "orbax16"),
        mesh_cfg={"data": 1, "fsdp": 8, "tensor": 1},
        dtype=jnp.bfloat16,
        log=lambda *_: None,
    )
    ck = ckpt_lib.Checkpointer(root / "orbax16", create=False)
    stored = ck.abstract_item(0, "params")
    kernel = stored["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16 and kernel.shape[0] == converted["cfg"].text.num_hidden_layers
    cli.orbax_to_hf(str(root / "orbax16"), str(root / "back16"), log=lambda *_: None)
    original = dict(safetensors_io.iter_tensors(root / "hf"))
    for name, value in safetensors_io.iter_tensors(root / "back16"):
        assert value.dtype == jnp.bfloat16
        np.testing.assert_array_equal(value, original[name].astype(jnp.bfloat16), err_msg=name)


def test_bad_inputs_name_the_folder_or_file(converted, tmp_path, devices):
    root = converted["root"]
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        cli.hf_to_orbax("qwen2_5_vl", str(missing), str(tmp_path / "o"))
    no_config = tmp_path / "no_config"
    shutil.copytree(root / "hf", no_config)
    os.remove(no_config / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        cli.hf_to_orbax("qwen2_5_vl", str(no_config), str(tmp_path / "o"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(root / "hf", corrupt)
    shard = sorted(p for p in os.listdir(corrupt) if p.endswith(".safetensors"))[0]
    data = (corrupt / shard).read_bytes()
    (corrupt / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(safetensors_io.CorruptCheckpointError, match=shard):
        cli.hf_to_orbax("qwen2_5_vl", str(corrupt), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="not a known model"):
        cli.hf_to_orbax("gpt5", str(root / "hf"), str(tmp_path / "o"))
    # Orbax side: a missing directory, and a step whose arrays were deleted.
    with pytest.raises(FileNotFoundError, match=str(missing)):
        cli.orbax_to_hf(str(missing), str(tmp_path / "h"))
    broken = tmp_path / "broken"
    shutil.copytree(root / "orbax", broken)
    shutil.rmtree(broken / "3" / "params")
    with pytest.raises(ckpt_lib.CheckpointError, match=str(broken)):
        cli.orbax_to_hf(str(broken), str(tmp_path / "h"))
    # The command line reports it in one line naming the folder, with a non-zero status.
    proc = subprocess.run(
        [sys.executable, "-m", "qk_jax.cli", "convert", "--from-hf", str(missing), "--to-orbax", str(tmp_path / "o")],
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and f"qk-jax convert: --from-hf folder {missing} does not exist" in proc.stderr


def test_an_export_replaces_only_an_earlier_export(converted, tmp_path, devices):
    """An export replaces its folder whole: a folder holding anything no export writes (a folder
    of models, a downloaded model's README) is refused before any reading, and kept as it was;
    an earlier export is replaced. A --to-orbax step that exists is refused before the reading."""
    root = converted["root"]
    models = tmp_path / "models"
    (models / "mine").mkdir(parents=True)
    (models / "mine" / "weights.bin").write_bytes(b"keep me")
    with pytest.raises(safetensors_io.DestinationError, match=r"--to-hf .*models already holds \['mine/'\]"):
        cli.check_outputs(to_hf=str(models))
    proc = subprocess.run(
        [sys.executable, "-m", "qk_jax.cli", "convert", "--from-orbax", str(root / "orbax"), "--to-hf", str(models)],
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and f"qk-jax convert: --to-hf {models} already holds ['mine/']" in proc.stderr
    assert "restoring" not in proc.stderr and (models / "mine" / "weights.bin").read_bytes() == b"keep me"
    export = tmp_path / "export"
    cli.orbax_to_hf(str(root / "orbax"), str(export), log=lambda *_: None)
    first = sorted(os.listdir(export))
    cli.orbax_to_hf(str(root / "orbax"), str(export), log=lambda *_: None)  # an earlier export: replaced
    assert sorted(os.listdir(export)) == first
    (export / "README.md").write_text("a model card")
    with pytest.raises(safetensors_io.DestinationError, match=r"holds \['README.md'\]"):
        cli.orbax_to_hf(str(root / "orbax"), str(export), log=lambda *_: None)
    assert (export / "README.md").read_text() == "a model card"
    with pytest.raises(cli.ConvertError, match=r"--to-orbax .* already holds step 3"):
        cli.check_outputs(to_orbax=str(root / "orbax"), step=3)
    cli.check_outputs(to_orbax=str(root / "orbax"), step=4)
    with pytest.raises(cli.ConvertError, match="--to-hf gs://bucket/export: give a local folder"):
        cli.check_outputs(to_hf="gs://bucket/export")  # it would make a local folder named gs:


def test_mesh_flag_parsing():
    assert sharding.parse_mesh("fsdp=-1,tensor=2") == {"data": 1, "fsdp": -1, "tensor": 2}
    with pytest.raises(ValueError, match="pipeline"):
        sharding.parse_mesh("pipeline=2")
    with pytest.raises(ValueError, match="int"):
        sharding.parse_mesh("data=two")


@pytest.mark.parametrize("name", ["qwen_image", "flux", "vae", "qwen_image_vae"])
def test_diffusers_models_round_trip(name, tmp_path, devices):
    """Every registered diffusers model: pipeline folder -> Orbax on a mesh -> a folder with
    identical tensors that `from_pretrained` loads."""
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel, QwenImageTransformer2DModel

    from dit_testing import FLUX_TINY, KL_TINY, QWEN_TINY, QWEN_VAE_TINY, save_tiny

    cls, config, component = {
        "qwen_image": (QwenImageTransformer2DModel, QWEN_TINY, "transformer"),
        "flux": (FluxTransformer2DModel, FLUX_TINY, "transformer"),
        "vae": (AutoencoderKL, KL_TINY, "vae"),
        "qwen_image_vae": (AutoencoderKLQwenImage, QWEN_VAE_TINY, "vae"),
    }[name]
    save_tiny(cls, tmp_path / "pipe" / component, config, norms_only=component == "vae")
    cli.hf_to_orbax(
        name,
        str(tmp_path / "pipe"),
        str(tmp_path / "orbax"),
        mesh_cfg={"data": 1, "fsdp": 2, "tensor": 2},
        log=lambda *_: None,
    )
    assert ckpt_lib.read_json_item(tmp_path / "orbax", 0, "config")["model"] == name
    cli.orbax_to_hf(str(tmp_path / "orbax"), str(tmp_path / "back"), log=lambda *_: None)
    original = dict(safetensors_io.iter_tensors(tmp_path / "pipe" / component))
    back = dict(safetensors_io.iter_tensors(tmp_path / "back"))
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert sum(p.numel() for p in cls.from_pretrained(str(tmp_path / "back")).parameters()) == sum(
        int(np.prod(v.shape)) for v in original.values()
    )
