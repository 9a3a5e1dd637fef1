"""Our Qwen2.5-VL against `transformers.Qwen2_5_VLForConditionalGeneration` (float32, same
weights, same inputs, same machine, one process):

  forward     logits of a batch of image + text prompts;
  train_step  forward + backward + AdamW update of every parameter (ours: one jitted
              step with donated buffers; torch: `loss.backward()` + `torch.optim.AdamW.step()`);
  generate    greedy generation of N tokens with a KV cache (ours: `Generator`, a jitted
              prefill + one jitted decode step per token; HF: `generate`).

The reference uses transformers' default attention (`sdpa`). Both sides get the same
weights (ours converted from the torch state dict through the converter's mapping), and
the records carry a parity check (logits max relative error, identical greedy tokens).

FLOPs: `qk_jax.flops` (matmul-class FLOPs, 2 per multiply-add: every weight matmul of
both towers and the LM head, and the attention products over the full score matrices
our implementation computes: T x T in the decoder, N x N patches in the vision tower;
not counted: norms, RoPE, softmax, embeddings, the loss and the optimizer update). A
train step is forward + activation and weight gradients of every part (~3x the
forward). Generation counts the prefill (logits of the last position only) and each
decode step's matmuls and its attention over the allocated cache.

    python benchmarks/vlm.py [--quick]
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import common  # type: ignore[no-redef]

import numpy as np

from qk_jax import flops
from qk_jax.flops import MatmulFlops


@dataclasses.dataclass(frozen=True)
class Setup:
    """Sizes of one benchmark run."""

    text_hidden: int = 512
    text_mlp: int = 1408
    text_layers: int = 6
    text_heads: int = 8
    text_kv_heads: int = 2
    vocab: int = 8192
    vision_hidden: int = 256
    vision_mlp: int = 688
    vision_depth: int = 4
    vision_heads: int = 4
    image: tuple[int, int] = (112, 112)
    prompt_tokens: int = 256
    batch: int = 2
    new_tokens: int = 32
    repeat: int = 5
    gen_repeat: int = 3


FULL = Setup()
QUICK = Setup(
    text_hidden=64,
    text_mlp=128,
    text_layers=2,
    text_heads=4,
    text_kv_heads=2,
    vocab=1024,
    vision_hidden=32,
    vision_mlp=64,
    vision_depth=2,
    vision_heads=2,
    prompt_tokens=48,
    new_tokens=3,
    repeat=1,
    gen_repeat=1,
)


def make_config(s: Setup):
    from qk_jax.models.qwen2_5_vl import Qwen25VLConfig, TextConfig, VisionConfig

    hd = s.text_hidden // s.text_heads
    section = (hd // 2 - 2 * (3 * hd // 16), 3 * hd // 16, 3 * hd // 16)  # (8, 12, 12) for head_dim 64
    v = s.vocab
    return Qwen25VLConfig(
        vision=VisionConfig(
            depth=s.vision_depth,
            hidden_size=s.vision_hidden,
            intermediate_size=s.vision_mlp,
            num_heads=s.vision_heads,
            out_hidden_size=s.text_hidden,
            window_size=112,
            fullatt_block_indexes=tuple(range(1, s.vision_depth, 2)),
        ),
        text=TextConfig(
            vocab_size=v,
            hidden_size=s.text_hidden,
            intermediate_size=s.text_mlp,
            num_hidden_layers=s.text_layers,
            num_attention_heads=s.text_heads,
            num_key_value_heads=s.text_kv_heads,
            mrope_section=section,
            max_position_embeddings=4096,
            bos_token_id=v - 8,
            eos_token_id=v - 7,
            pad_token_id=v - 8,
        ),
        image_token_id=v - 4,
        video_token_id=v - 3,
        vision_start_token_id=v - 2,
        vision_end_token_id=v - 1,
    )


# ----------------------------------------------------------------------------- FLOPs
# Counted by `qk_jax.flops` (matmuls and attention products as our implementation runs
# them: full T x T decoder scores, all N x N patch pairs in the vision tower).


def forward_flops(cfg, batch: int, tokens: int, num_patches: int) -> MatmulFlops:
    """One forward with logits on every position."""
    return flops.vision_tower_flops(cfg.vision, num_patches) + flops.decoder_flops(cfg, batch, tokens, True)


def train_flops(cfg, batch: int, tokens: int, num_patches: int) -> int:
    """Forward + backward with every parameter trained (the rule of `qk_jax.flops.step`)."""
    parts = [
        flops.Part("vit", flops.vision_tower_flops(cfg.vision, num_patches), weight_grads=True),
        flops.Part("llm", flops.decoder_flops(cfg, batch, tokens, True), weight_grads=True),
    ]
    return flops.train_step_flops(parts)["total"]


def generate_flops(cfg, batch: int, tokens: int, new_tokens: int, num_patches: int) -> int:
    """Prefill (logits of the last position only), then `new_tokens - 1` decode steps, each
    attending over the whole allocated cache (tokens + new_tokens slots, as `Generator` does)."""
    t = cfg.text
    head = 2 * batch * t.hidden_size * t.vocab_size
    prefill = flops.vision_tower_flops(cfg.vision, num_patches) + flops.decoder_flops(t, batch, tokens, False)
    step_weights = flops.decoder_flops(cfg, batch, 1, True).weights
    cache = tokens + new_tokens
    step_attention = 4 * t.num_hidden_layers * batch * cache * t.num_attention_heads * t.head_dim
    return int(prefill) + head + (new_tokens - 1) * (step_weights + step_attention)


# ----------------------------------------------------------------------------- models


def build(s: Setup, seed: int = 0):
    """(config, torch model, our params, inputs) with identical weights on both sides."""
    torch = common.setup_torch()
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from qk_jax.convert.qwen2_5_vl import config_to_hf, hf_mapping
    from qk_jax.parity.qwen2_5_vl import make_inputs
    from qk_jax.tree import unflatten_tree

    cfg = make_config(s)
    torch.manual_seed(seed)
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config_to_hf(cfg))).eval()
    state = ((k, v.detach().numpy()) for k, v in hf.state_dict().items())
    params = unflatten_tree(dict(hf_mapping(cfg, "module").to_jax(state, dtype=np.float32)))
    params = common.copy_tree(params)  # own the memory (torch's storage is updated in place by its optimizer)
    inputs = make_inputs(cfg, [s.image], s.prompt_tokens, s.batch, "left", seed=seed)
    return cfg, hf, params, inputs


def torch_inputs(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}


# ----------------------------------------------------------------------------- benchmarks


def bench_forward(cfg, hf, params, inputs, s: Setup, peak: dict) -> dict:
    import jax
    import torch

    from qk_jax.models.qwen2_5_vl import Qwen25VL, prepare_inputs

    model = Qwen25VL(cfg)
    t0 = time.perf_counter()
    host = prepare_inputs(cfg, inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"])
    host_s = time.perf_counter() - t0
    args = (
        inputs["input_ids"].astype(np.int32),
        host["position_ids"],
        inputs["attention_mask"].astype(np.int32),
        inputs["pixel_values"],
        host["vision_plan"],
    )
    fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a)["logits"])
    t0 = time.perf_counter()
    compiled = fwd.lower(params, *args).compile()
    compile_s = time.perf_counter() - t0
    t_in = torch_inputs(inputs)
    with torch.no_grad():
        ours_t, ref_t = common.compare(lambda: compiled(params, *args), lambda: hf(**t_in).logits, repeat=s.repeat)
        ref_logits = hf(**t_in).logits.numpy()
    ours_logits = np.asarray(compiled(params, *args))
    valid = inputs["attention_mask"].astype(bool)
    err = float(np.abs(ours_logits[valid] - ref_logits[valid]).max() / np.abs(ref_logits[valid]).max())
    n = float(forward_flops(cfg, s.batch, s.prompt_tokens, inputs["pixel_values"].shape[0]))
    return common.comparison(
        "vlm/forward",
        ours_t,
        ref_t,
        flops=n,
        peak=peak,
        compile_s=compile_s,
        host_prepare_s=host_s,
        logits_max_rel_err=err,
    )


def _labels(inputs) -> np.ndarray:
    """Next-token labels: the input ids, -100 on padding (HF's ignore index)."""
    return np.where(inputs["attention_mask"] > 0, inputs["input_ids"], -100).astype(np.int64)


def bench_train_step(cfg, hf, params, inputs, s: Setup, peak: dict, lr: float = 1e-5) -> dict:
    """Loss: HF's causal-LM loss (logits[:, :-1] against labels[:, 1:], mean over labels != -100)."""
    import jax.numpy as jnp
    import optax
    import torch

    from qk_jax.models.qwen2_5_vl import Qwen25VL, prepare_inputs

    model = Qwen25VL(cfg)
    host = prepare_inputs(cfg, inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"])
    labels = _labels(inputs)
    batch = (
        inputs["input_ids"].astype(np.int32),
        host["position_ids"],
        inputs["attention_mask"].astype(np.int32),
        inputs["pixel_values"],
        host["vision_plan"],
        labels.astype(np.int32),
    )

    def loss_fn(params, ids, pos, mask, pixels, plan, labels):
        logits = model.apply({"params": params}, ids, pos, mask, pixels, plan)["logits"][:, :-1]
        target = labels[:, 1:]
        valid = target != -100
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, target, 0))
        return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(valid.sum(), 1)

    t_in = dict(torch_inputs(inputs), labels=torch.from_numpy(labels))
    r = common.compare_train_steps(loss_fn, params, batch, hf, lambda: hf(**t_in).loss, lr=lr, repeat=s.repeat)
    n = float(train_flops(cfg, s.batch, s.prompt_tokens, inputs["pixel_values"].shape[0]))
    return common.comparison(
        "vlm/train_step",
        r["ours"],
        r["reference"],
        flops=n,
        peak=peak,
        compile_s=r["compile_s"],
        params=r["params"],
        first_loss_ours=r["first_loss_ours"],
        first_loss_reference=r["first_loss_reference"],
    )


def bench_generate(cfg, hf, params, inputs, s: Setup, peak: dict) -> dict:
    import torch

    from qk_jax.models.qwen2_5_vl import Qwen25VL
    from qk_jax.models.qwen2_5_vl.generate import Generator

    gen = Generator(Qwen25VL(cfg))
    args = (params, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"])
    kw = dict(max_new_tokens=s.new_tokens, eos_token_id=-1, pad_token_id=cfg.text.pad_token_id)
    t0 = time.perf_counter()
    first = gen(*args, **kw)
    first_s = time.perf_counter() - t0
    hf.generation_config.eos_token_id = None  # run the full length on both sides
    t_in = torch_inputs(inputs)
    out = {}

    def reference():
        with torch.no_grad():
            out["ref"] = hf.generate(
                **t_in, max_new_tokens=s.new_tokens, do_sample=False, pad_token_id=cfg.text.pad_token_id
            )
        return out["ref"]

    ours_t, ref_t = common.compare(lambda: gen(*args, **kw), reference, repeat=s.gen_repeat)
    ref_tokens = out["ref"][:, inputs["input_ids"].shape[1] :].numpy()
    n = float(generate_flops(cfg, s.batch, s.prompt_tokens, s.new_tokens, inputs["pixel_values"].shape[0]))
    return common.comparison(
        f"vlm/generate_{s.new_tokens}",
        ours_t,
        ref_t,
        flops=n,
        peak=peak,
        compile_s=max(first_s - ours_t.median, 0.0),
        tokens_equal=bool(np.array_equal(first, ref_tokens)),
        new_tokens=int(first.shape[1]),
        ours_ms_per_token=1e3 * ours_t.median / s.new_tokens,
        reference_ms_per_token=1e3 * ref_t.median / s.new_tokens,
    )


def run(quick: bool = False, peak: dict | None = None) -> list[dict]:
    """All VLM benchmarks; prints their table and returns the records."""
    s = QUICK if quick else FULL
    peak = peak or common.default_peak(quick)
    cfg, hf, params, inputs = build(s)
    setup = {
        "text": f"{s.text_layers}x{s.text_hidden} (mlp {s.text_mlp}, heads {s.text_heads}/{s.text_kv_heads}, "
        f"vocab {s.vocab})",
        "vision": f"{s.vision_depth}x{s.vision_hidden} (mlp {s.vision_mlp})",
        "batch": f"{s.batch} x {s.prompt_tokens} tokens, one {s.image[0]}x{s.image[1]} image per row",
    }
    records = [
        bench_forward(cfg, hf, params, inputs, s, peak),
        bench_generate(cfg, hf, params, inputs, s, peak),
        bench_train_step(cfg, hf, params, inputs, s, peak),
    ]
    return common.report(
        f"Qwen2.5-VL, float32, ours vs transformers (sdpa): text {setup['text']}, vision {setup['vision']}, "
        f"{setup['batch']}",
        records,
        setup,
    )


if __name__ == "__main__":
    common.script_main(run, __doc__)
