"""The bf16 stage-2 DiT train step and the sampler of a ~1B MMDiT: ours (JAX) against
diffusers' `QwenImageTransformer2DModel` (PyTorch, `scaled_dot_product_attention`), same
weights, same inputs, one process, on the first GPU when there is one.

  train_step  rectified-flow MSE on the velocity of noisy latents + padded text, backward,
              AdamW on every parameter; float32 master weights, bfloat16 compute (ours:
              `dtype=bfloat16`; diffusers: `torch.autocast(bfloat16)`);
  sample      an N-step Euler run from noise in bfloat16 (ours: `flow_solvers.euler_sample`,
              one jitted `fori_loop`; diffusers: a Python loop over
              `FlowMatchEulerDiscreteScheduler.step`), no guidance, no text encoder / VAE.

Sizes: `1b` is the `head_870m` MMDiT (12 x 128 heads, 3584-d condition tokens) at 12
blocks (~1.03B parameters), 512 px (32 x 32 latent tokens after patching) and 256 text
tokens; `tiny` is the tests' MMDiT at 4 x 4 tokens. `--size 1b` is the default on a GPU,
`tiny` elsewhere.

FLOPs: `qk_jax.flops.mmdit_flops` (every weight matmul and the joint attention);
a train step by `qk_jax.flops.train_step_flops`; sampling = N forwards. MFU = FLOP/s over
the device's bf16 dense peak (`qk_jax.flops.peak_flops_for`; on a CPU, its measured
float32 matmul peak). Before timing, both sides run one float32 forward on the same
inputs: `forward_max_rel_err` says they hold the same weights.

    python benchmarks/gpu.py [--size 1b|tiny] [--batch N] [--steps N] [--repeat N] [--json OUT.jsonl]
"""

from __future__ import annotations

import argparse
import time

try:
    from benchmarks import common
    from benchmarks import mmdit as mmdit_bench
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]
    import mmdit as mmdit_bench  # type: ignore[no-redef]

import numpy as np

from qk_jax import flops

# name -> (MMDiT size, overrides, latent tokens per side, text tokens, batch, sampler steps)
SIZES = {
    "1b": ("head_870m", dict(num_layers=12), 32, 256, 16, 20),
    "tiny": ("tiny", dict(num_layers=1), 4, 8, 2, 2),
}


def build(size: str, batch: int, seed: int = 0):
    """(our float32 config, the diffusers model (float32, CPU), our params, inputs): the
    diffusers model is randomly initialised and its weights converted to ours."""
    torch = common.setup_torch()
    from diffusers import QwenImageTransformer2DModel

    from qk_jax.convert import qwen_image
    from qk_jax.convert.diffusers_configs import to_diffusers
    from qk_jax.models.mmdit import mmdit_config
    from qk_jax.parity.dit_parity import make_inputs
    from qk_jax.tree import unflatten_tree

    name, overrides, side, txt_len, _, _ = SIZES[size]
    cfg = mmdit_config(name, **overrides)
    torch.manual_seed(seed)
    ref = QwenImageTransformer2DModel(**to_diffusers(cfg)).eval()
    state = ((k, v.detach().numpy()) for k, v in ref.state_dict().items())
    params = common.copy_tree(unflatten_tree(dict(qwen_image.mapping(cfg).to_jax(state, dtype=np.float32))))
    inputs = make_inputs(
        cfg, batch=batch, height=side, width=side, txt_len=txt_len, pad=txt_len // 8, condition_segments=0, seed=seed
    )
    return cfg, ref, params, inputs


def velocity_fns(cfg, ref, inputs, device):
    """(ours(params, img, t), diffusers(img, t)) on the fixed text condition."""
    return mmdit_bench.our_velocity(cfg, inputs), mmdit_bench.reference_velocity(ref, inputs, device)


def same_weights_error(cfg, ref, params, inputs, device) -> float:
    """Max relative difference of one float32 forward of both sides."""
    import jax
    import torch

    ours, reference = velocity_fns(cfg, ref, inputs, device)
    img, t = inputs["img"], inputs["timestep"]
    got = np.asarray(jax.jit(ours)(params, img, t))
    with torch.no_grad():
        expected = reference(torch.from_numpy(img).to(device), torch.from_numpy(t).to(device)).float().cpu().numpy()
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def row(name: str, impl: str, seconds: float, samples: int, n_flops: float, peak: float | None) -> dict:
    tflops = n_flops / seconds / 1e12
    return {
        "name": name,
        "impl": impl,
        "step_s": seconds,
        "samples_per_s": samples / seconds,
        "tflops": tflops,
        "mfu": None if not peak else tflops * 1e12 / peak,
        "flops": n_flops,
    }


def bench_train_step(cfg16, ref, params, inputs, device, batch: int, repeat: int, peak) -> list[dict]:
    import jax.numpy as jnp
    import torch

    ours_v, ref_v = velocity_fns(cfg16, ref, inputs, device)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(inputs["img"].shape).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = inputs["timestep"]
    x_t = ((1 - t[:, None, None]) * x0 + t[:, None, None] * noise).astype(np.float32)
    target = (noise - x0).astype(np.float32)

    def loss_fn(params, x_t, t, target):
        return jnp.mean((ours_v(params, x_t, t).astype(jnp.float32) - target) ** 2)

    tx, tt, ttarget = (torch.from_numpy(a).to(device) for a in (x_t, t, target))

    def torch_loss():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = ref_v(tx, tt)
        return torch.mean((v.float() - ttarget) ** 2)

    r = common.compare_train_steps(loss_fn, params, (x_t, t, target), ref, torch_loss, lr=1e-5, repeat=repeat)
    n_tokens = inputs["n_target"]
    forward = flops.mmdit_flops(cfg16, batch, n_tokens, inputs["txt"].shape[1])
    n = float(flops.train_step_flops([flops.Part("dit", forward, weight_grads=True)])["total"])
    return [
        row("train_step", "ours (JAX)", r["ours"].median, batch, n, peak),
        row("train_step", "diffusers (torch SDPA)", r["reference"].median, batch, n, peak),
    ]


def bench_sample(cfg16, ref, params, inputs, device, batch: int, steps: int, repeat: int, peak) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qk_jax.flow_solvers import euler_sample, flow_schedule, pipeline_sigmas

    ours_v, ref_v = velocity_fns(cfg16, ref, inputs, device)
    noise = np.random.default_rng(2).standard_normal(inputs["img"].shape).astype(np.float32)
    sigmas, timesteps = flow_schedule(steps, sigmas=pipeline_sigmas(steps))
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)

    def run(params, x):
        return euler_sample(lambda x, t: ours_v(params, x, jnp.full((batch,), t)), x, sigmas, timesteps)

    compiled = jax.jit(run).lower(params16, noise).compile()
    scheduler = FlowMatchEulerDiscreteScheduler()
    ref16 = ref.to(torch.bfloat16)

    def reference():
        scheduler.set_timesteps(sigmas=pipeline_sigmas(steps))
        x = torch.from_numpy(noise).to(device)
        with torch.no_grad():
            for t in scheduler.timesteps:
                v = ref_v(x.to(torch.bfloat16), (t / 1000).expand(batch).to(device)).float()
                x = scheduler.step(v, t, x, return_dict=False)[0]
        return x

    try:
        ours_t, ref_t = common.compare(lambda: compiled(params16, noise), reference, repeat=repeat)
    finally:
        ref16.float()
    forward = flops.mmdit_flops(cfg16, batch, inputs["n_target"], inputs["txt"].shape[1]).total
    n = float(steps * forward)
    name = f"sample_{steps}_steps"
    return [
        row(name, "ours (JAX)", ours_t.median, batch, n, peak),
        row(name, "diffusers (torch SDPA)", ref_t.median, batch, n, peak),
    ]


def format_table(title: str, rows: list[dict]) -> str:
    fmt_mfu = lambda m: "-" if m is None else f"{100 * m:.1f}%"  # noqa: E731
    cells = [
        [r["name"], r["impl"], f"{r['step_s'] * 1e3:.1f} ms", f"{r['samples_per_s']:.2f}", f"{r['tflops']:.3g}"]
        + [fmt_mfu(r["mfu"])]
        for r in rows
    ]
    return common.table(title, ["program", "implementation", "time", "samples/s", "TFLOP/s", "MFU"], cells)


def run(size: str, batch: int | None = None, steps: int | None = None, repeat: int = 3) -> dict:
    """Builds both models, checks they agree, times both programs; prints and returns the report."""
    import jax
    import torch

    _, _, _, _, default_batch, default_steps = SIZES[size]
    batch, steps = batch or default_batch, steps or default_steps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    cfg, ref, params, inputs = build(size, batch)
    ref = ref.to(device)
    err = same_weights_error(cfg, ref, params, inputs, device)
    cfg16 = cfg.replace(dtype="bfloat16")
    peak = flops.peak_flops_for()
    rows = bench_train_step(cfg16, ref, params, inputs, device, batch, repeat, peak)
    rows += bench_sample(cfg16, ref, params, inputs, device, batch, steps, repeat, peak)
    jax_device = jax.devices()[0]
    title = (
        f"MMDiT {size} ({cfg.num_layers} blocks, "
        f"{cfg.num_heads}x{cfg.head_dim} heads), bf16, batch {batch} x ({inputs['n_target']} image + "
        f"{inputs['txt'].shape[1]} text tokens); JAX on {jax_device.device_kind}, torch on {device}"
    )
    print(format_table(title, rows))
    print(f"\nsame weights: float32 forward max rel err {err:.2e}; total {time.perf_counter() - t0:.0f} s")
    return {
        "size": size,
        "batch": batch,
        "steps": steps,
        "forward_max_rel_err": err,
        "peak_flops": peak,
        "jax_device": jax_device.device_kind,
        "torch_device": str(device),
        "rows": rows,
    }


def main() -> None:
    import json

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 1b on a GPU, else tiny")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="sampler steps")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    a = parser.parse_args()
    size = a.size or ("1b" if torch.cuda.is_available() else "tiny")
    report = run(size, a.batch, a.steps, a.repeat)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
