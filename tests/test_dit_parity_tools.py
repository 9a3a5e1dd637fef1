"""`qk-jax parity {qwen_image,flux,vae,qwen_image_vae}` on tiny random checkpoints whose configs differ
from the other tests' (widths, depths, head dims, RoPE axes, channel counts, optional features)."""

import io
import os
import subprocess
import sys

import pytest
from diffusers import AutoencoderKL as TorchKL
from diffusers import AutoencoderKLQwenImage as TorchQwenVAE
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

from dit_testing import save_tiny
from qk_jax.parity import TOOLS
from qk_jax.parity.dit_parity import mmdit_parity
from qk_jax.parity.vae_parity import vae_parity

pytestmark = pytest.mark.slow  # parity tools against diffusers in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QWEN_OTHER = dict(
    patch_size=2,
    in_channels=32,
    out_channels=8,
    num_layers=3,
    attention_head_dim=24,
    num_attention_heads=3,
    joint_attention_dim=40,
    axes_dims_rope=(8, 8, 8),
    use_additional_t_cond=True,
    use_layer3d_rope=True,
)
FLUX_OTHER = dict(
    patch_size=1,
    in_channels=12,
    num_layers=2,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=20,
    pooled_projection_dim=6,
    guidance_embeds=False,
    axes_dims_rope=(2, 2, 4),
)
KL_OTHER = dict(
    block_out_channels=(16, 16, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    latent_channels=8,
    norm_num_groups=8,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=False,
)
QWEN_VAE_OTHER = dict(
    base_dim=4,
    z_dim=6,
    dim_mult=[1, 2, 2, 3],
    num_res_blocks=2,
    temperal_downsample=[True, False, True],
    latents_mean=[0.0, 0.1, -0.1, 0.2, 0.3, -0.3],
    latents_std=[1.0, 2.0, 0.5, 1.5, 1.2, 0.9],
)


def _assert_report_within_tolerance(report, n_rows):
    buf = io.StringIO()
    report.stream = buf
    assert report.print() == 0, buf.getvalue()
    lines = buf.getvalue().strip().splitlines()
    assert lines[-1].startswith("PARITY OK"), lines[-1]
    assert len(report.rows) == n_rows


def test_registered_tools():
    assert {"qwen_image", "flux", "vae", "qwen_image_vae"} <= set(TOOLS)


def test_qwen_image_parity_other_config(tmp_path):
    save_tiny(QwenImageTransformer2DModel, tmp_path / "transformer", QWEN_OTHER, seed=11)
    report = mmdit_parity(tmp_path, "qwen_image", batch=2, height=4, width=6, txt_len=9, pad=3, condition_segments=2)
    _assert_report_within_tolerance(report, 3 * 2 + 1)
    with pytest.raises(ValueError, match="not a flux model"):
        mmdit_parity(tmp_path, "flux")


def test_flux_parity_other_config(tmp_path):
    save_tiny(FluxTransformer2DModel, tmp_path, FLUX_OTHER, seed=12)
    report = mmdit_parity(tmp_path, "flux", batch=2, height=3, width=5, txt_len=8, pad=2, condition_segments=1)
    _assert_report_within_tolerance(report, 2 * 2 + 1 + 1)


def test_qwen_image_vae_parity_other_config(tmp_path):
    save_tiny(TorchQwenVAE, tmp_path / "vae", QWEN_VAE_OTHER, seed=13, norms_only=True)
    report = vae_parity(tmp_path, "qwen_image", height=16, width=24)
    # encoder: 4 levels x 2 res + 3 resamples, mid; decoder: mid + 4 up blocks; + 5 summary rows
    _assert_report_within_tolerance(report, (4 * 2 + 3 + 1) + (1 + 4) + 5)


def test_kl_vae_parity_other_config_and_cli_exit_code(tmp_path):
    save_tiny(TorchKL, tmp_path, KL_OTHER, seed=14, norms_only=True)
    report = vae_parity(tmp_path, "kl", height=16, width=16)
    # encoder 3 blocks + mid, decoder mid + 3 blocks, 5 summary rows
    _assert_report_within_tolerance(report, (3 + 1) + (1 + 3) + 5)
    # through the real entry point (a fresh process): the verdict is last and the exit code is 1 above tolerance
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable,
        "-c",
        "from qk_jax.cli import main; main()",
        "parity",
        "vae",
        "--checkpoint",
        str(tmp_path),
        "--height",
        "16",
        "--width",
        "16",
        "--tolerance",
        "1e-12",
    ]
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = bad.stdout.strip().splitlines()
    assert lines[-1].startswith("PARITY FAIL") and any(line.startswith("encoder/down_blocks_2") for line in lines)
