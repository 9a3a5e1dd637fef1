"""Helpers shared by the Qwen2.5-VL tests: tiny random transformers checkpoints.

Every parameter of the torch model is re-drawn (norm scales around 1, biases non-zero)
so that a transposed bias or a swapped norm cannot hide behind HF's zero/one init.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from cli_env import FAST_COMPILE_FLAGS
from qk_jax.convert.qwen2_5_vl import config_to_hf
from qk_jax.models.qwen2_5_vl import Qwen25VLConfig, TextConfig, VisionConfig


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(std * noise)


def save_random_checkpoint(
    cfg: Qwen25VLConfig,
    folder: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
):
    """Builds `Qwen2_5_VLForConditionalGeneration` for `cfg`, randomises it, saves it to
    `folder` (in `dtype`, sharded when `max_shard_size` is given) and returns it reloaded
    from there (float32, eager attention, eval mode)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config_to_hf(cfg)))
    randomize_(model, seed)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    del model
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def torch_inputs(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def other_config() -> Qwen25VLConfig:
    """A second tiny configuration unlike `tiny` in every structural knob: widths, head
    counts (3 vision heads, 6/3 text heads), patch 16, no temporal patching, merge 3,
    window 96 px, two full-attention blocks, M-RoPE sections (4, 2, 2), tied head,
    tanh-GELU in the vision MLP."""
    return Qwen25VLConfig(
        vision=VisionConfig(
            depth=3,
            hidden_size=48,
            intermediate_size=80,
            num_heads=3,
            out_hidden_size=96,
            patch_size=16,
            temporal_patch_size=1,
            spatial_merge_size=3,
            window_size=96,
            fullatt_block_indexes=(0, 2),
            hidden_act="gelu_pytorch_tanh",
            rope_theta=5000.0,
        ),
        text=TextConfig(
            vocab_size=1100,
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=3,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            mrope_section=(4, 2, 2),
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        image_token_id=1090,
        video_token_id=1091,
        vision_start_token_id=1088,
        vision_end_token_id=1089,
        tie_word_embeddings=True,
    )


def env_for_subprocess() -> dict[str, str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS  # one CPU device is enough for the tool
    return env
