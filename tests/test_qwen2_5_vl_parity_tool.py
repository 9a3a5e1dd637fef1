"""`qk-jax parity qwen2_5_vl` on tiny random checkpoints of two unlike configurations."""

from __future__ import annotations

import io
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from qk_jax.convert import safetensors_io
from qk_jax.convert.qwen2_5_vl import export_hf, load_hf
from qk_jax.models.qwen2_5_vl import get_config
from qk_jax.parity import qwen2_5_vl as tool
from qwen2_5_vl_util import env_for_subprocess, other_config, save_random_checkpoint

pytestmark = pytest.mark.slow  # parity tool against transformers in a subprocess


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_vl_parity")
    save_random_checkpoint(get_config("tiny"), str(root / "tiny"), seed=3)
    # The second checkpoint is bfloat16 and sharded with an index, as real ones are.
    save_random_checkpoint(other_config(), str(root / "other"), seed=4, dtype=torch.bfloat16, max_shard_size="200KB")
    return root


def test_cli_on_tiny_checkpoint(checkpoints):
    cmd = [
        sys.executable,
        "-m",
        "qk_jax.cli",
        "parity",
        "qwen2_5_vl",
        "--checkpoint",
        str(checkpoints / "tiny"),
        "--image-sizes",
        "56x84,140x84",
        "--prompt-tokens",
        "600",
        "--batch-size",
        "2",
        "--every-n-layers",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_for_subprocess(), timeout=300)
    lines = proc.stdout.strip().splitlines()
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[-1].startswith("PARITY OK"), lines[-1]
    for stage in ("vision tower", "merged input embeddings", "hidden after layer 0", "final-norm hidden", "logits"):
        assert any(line.startswith(stage) for line in lines), stage


def test_other_configuration_in_process_and_failure_exit(checkpoints):
    folder = str(checkpoints / "other")
    out = io.StringIO()
    code = tool.run(
        folder, [(96, 144), (144, 48)], prompt_tokens=520, batch_size=3, padding="right", every_n_layers=2, stream=out
    )
    text = out.getvalue()
    print(text)
    assert code == 0 and text.strip().splitlines()[-1].startswith("PARITY OK"), text
    assert "hidden after layer 1" in text and "hidden after layer 0" not in text  # every 2nd layer + the last
    # An impossible tolerance must fail with exit status 1 and a FAIL verdict.
    out = io.StringIO()
    code = tool.run(folder, [(96, 144)], prompt_tokens=100, batch_size=1, rtol=1e-12, stream=out)
    assert code == 1 and out.getvalue().strip().splitlines()[-1].startswith("PARITY FAIL")


def test_bfloat16_sharded_checkpoint_round_trips_bit_exactly(checkpoints, tmp_path):
    folder = checkpoints / "other"
    assert (folder / "model.safetensors.index.json").exists()
    cfg, params = load_hf(folder, dtype=None)  # keep the file's bfloat16
    assert cfg.tie_word_embeddings and "lm_head" not in params
    assert params["visual"]["blocks"]["attn"]["qkv"]["kernel"].dtype == ml_dtypes.bfloat16
    export_hf(tmp_path / "out", cfg, params, max_shard_bytes=150_000)
    original = dict(safetensors_io.iter_tensors(folder))
    exported = dict(safetensors_io.iter_tensors(tmp_path / "out"))
    assert original.keys() == exported.keys()
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and np.array_equal(
            exported[name].view(np.uint16), value.view(np.uint16)
        ), name
