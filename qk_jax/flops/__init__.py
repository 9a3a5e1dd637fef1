"""Analytic FLOP accounting: what one forward pass and one training step cost, and MFU.

What is counted
---------------
Matmul-class FLOPs only, as 2*M*N*K for every product our code runs (one multiply and
one add per multiply-accumulate):

- every `Dense` / einsum with a weight (`x @ W`), including small ones (the AdaLN
  modulation `Dense(silu(temb))` of every MMDiT block, the timestep / guidance / pooled
  MLP embedders, the LM head when it is run); GQA key/value projections at their real
  (narrower) width; a SwiGLU MLP as its three matmuls; FLUX's single-block output
  projection over the concatenated [attention ; MLP] width;
- convolutions (VAEs) as matmuls over the kernel taps that land on the image:
  zero-padding taps are not counted, as XLA's cost analysis does not count them (for a
  3x3 conv that is 4 / (3 * side) of the taps: 2% at 64x64, 0.3% at 512x512);
  nearest-neighbour upsampling and the pixel-space autoencoder (a reshape) are free;
- attention as the two products QK^T and AV (4 * B * S_q * S_k * heads * head_dim),
  over the FULL score matrix, because that is what our implementation computes:
  the decoder's causal mask does not halve it, and the vision tower's window attention
  (a dense segment mask, `vision_plan.py`) costs P^2 per image and layer in every block,
  windowed or not, in the batched layout Query-Kontext uses (one sequence of P patches
  per image), and N^2 over all N patches of the batch in the flat (HF parity) layout.
  A kernel that skipped masked blocks would do less work; these numbers would then
  over-count it;
- LoRA: training runs the adapters unmerged, `x a (s b)`: 2 * tokens * r * (d_in + d_out)
  per adapted kernel (`flops.kontext.lora_adapter_flops`, per kernel over the tokens that
  kernel sees); `lora_flops` counts the merge `W + s * a @ b` (2 * d_in * r * d_out),
  which sampling and surgery run once.

Not counted: element-wise work (bias adds, activations, residuals, modulation, masks),
norms, softmax, RoPE, embedding lookups (gathers), reductions, the random noise and the
loss. XLA's cost analysis counts those too (one FLOP per element), so for our models
it reports a few percent more than these numbers. `tests/test_flops.py` checks every
count for equality with the products of the traced program (`traced_matmul_flops`) and
against XLA on small matmul-dominated configurations (widths 128-256), where ours/XLA
is 0.97-0.99. Each function counts one forward call at the batch it is given: with
gradient accumulation, multiply by the number of microbatches.

Training step
-------------
`train_step_flops(parts)` adds up the parts of one step (ViT, LLM, connector, DiT, VAE,
LoRA). Each part declares its forward FLOPs (a `MatmulFlops`, which keeps matmuls with a
weight operand apart from products of two activations, such as attention) and what its
backward must compute:

- activation gradients (`backward_through`), needed when gradients must flow through the
  part to something trainable upstream of it (the kontext query embeddings are an input
  of the LLM: training them alone sends gradients through every LLM layer), or inside it
  down to its first trainable layer: one product of the size
  of the forward one per weight matmul (dX = dY W^T), two per activation-activation
  product (dQ and dK, dP and dV; dA and dB for the LoRA factors);
- weight gradients (`weight_grads`): one product of the size of the forward one
  (dW = X^T dY) per matmul whose kernel is trainable. With unmerged LoRA the adapted base
  kernel is frozen (no dW); the factors a and b are the trainable weights of the `lora`
  part, whose matmuls (x a, then (x a) b) get activation and weight gradients like any
  trained layer: ~3x their forward, a few percent of the layer at small ranks.

So a frozen part costs 1x its forward, or ~2x when something trainable sits upstream
(3x for its attention products); a trained part ~3x. This assumes the step takes
gradients with respect to the trainable subset only (or never reads the frozen ones,
so that XLA removes them): a gradient norm over frozen gradients would make XLA compute
them. Model FLOPs (the MFU numerator) do not include rematerialisation; `Part.remat`
reports the recomputed forward matmuls separately (`recompute`, "hardware FLOPs"):
"dots" (dots without batch dimensions are saved) recomputes exactly the attention
products; "full" is counted as the whole forward, an upper bound (JAX skips products
whose outputs the backward never reads, such as each decoder layer's down_proj).

XLA's own `compiled.cost_analysis()["flops"]` is no substitute: it counts the body of a
while loop once, so for our `nn.scan` layer stacks it under-reports by about the depth.
`traced_matmul_flops(fn, *args)` counts the dot/conv products of a traced function
(scans multiplied by their length) for cross-checks.

Typical use (stage 2: frozen VLM with trainable queries upstream, trained DiT)::

    parts = [
        Part("vit", vision_tower_flops(vlm.vision, patches_per_image, num_images)),
        Part("llm", decoder_flops(vlm.text, B, T + K, with_lm_head=False), backward_through=True),
        Part("connector", connector_flops(ccfg, B, T + K), weight_grads=True),
        Part("dit", mmdit_flops(dcfg, B, N, T + K, N), weight_grads=True, remat=dcfg.remat),
        Part("vae", vae_encode_flops(vae_cfg, B, H, W)),
    ]
    step = train_step_flops(parts)          # step["total"], step["parts"]["dit"], ...
    mfu(step["total"] * accum, step_seconds, jax.device_count(), peak_flops_for())

(On simulated CPU devices, which share one host CPU and its measured peak, count one device.)
"""

from qk_jax.flops.count import MatmulFlops, traced_matmul_flops
from qk_jax.flops.kontext import kontext_train_step_flops, kontext_useful_flops
from qk_jax.flops.models import connector_flops, decoder_flops, lora_flops, mmdit_flops, vision_tower_flops
from qk_jax.flops.step import (
    PEAK_FLOPS,
    Part,
    format_step_flops,
    measure_cpu_matmul_peak,
    mfu,
    peak_flops_for,
    peak_key,
    tflops_per_device,
    train_step_flops,
    xla_flops_per_device,
)
from qk_jax.flops.vae import vae_decode_flops, vae_encode_flops

__all__ = [
    "kontext_train_step_flops",
    "kontext_useful_flops",
    "MatmulFlops",
    "traced_matmul_flops",
    "vision_tower_flops",
    "decoder_flops",
    "connector_flops",
    "mmdit_flops",
    "lora_flops",
    "vae_encode_flops",
    "vae_decode_flops",
    "Part",
    "train_step_flops",
    "format_step_flops",
    "mfu",
    "tflops_per_device",
    "PEAK_FLOPS",
    "peak_key",
    "peak_flops_for",
    "measure_cpu_matmul_peak",
    "xla_flops_per_device",
]
