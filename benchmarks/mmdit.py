"""Our MMDiT (Qwen-Image family) against diffusers' `QwenImageTransformer2DModel` (float32,
same weights, same inputs, one process):

  forward     the velocity of the target tokens for a batch of noisy latents + text;
  train_step  rectified-flow MSE on the velocity, backward, AdamW on every parameter;
  sample      an N-step Euler run from noise (ours: `flow_solvers.euler_sample`, one jitted
              `fori_loop`; reference: a Python loop over `FlowMatchEulerDiscreteScheduler.step`
              calling the transformer, as the diffusers pipelines do, without text encoder
              and VAE). Both use the pipelines' sigmas `linspace(1, 1/N, N)`.

FLOPs: `qk_jax.flops.mmdit_flops` (every weight matmul incl. the AdaLN modulation and the
embedders, joint attention over text + image tokens); a train step by
`qk_jax.flops.train_step_flops` (~3x the forward); sampling = N forwards.

    python benchmarks/mmdit.py [--quick]
"""

from __future__ import annotations

import dataclasses
import time

try:
    from benchmarks import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

import numpy as np

from qk_jax import flops


@dataclasses.dataclass(frozen=True)
class Setup:
    heads: int = 8
    head_dim: int = 64
    layers: int = 4
    latent_channels: int = 16
    txt_dim: int = 512
    height: int = 16  # image tokens per side (a 256x256 image: VAE /8, patch 2)
    width: int = 16
    txt_len: int = 64
    batch: int = 2
    steps: int = 8
    repeat: int = 5
    sample_repeat: int = 3


FULL = Setup()
QUICK = Setup(
    heads=2,
    head_dim=16,
    layers=1,
    latent_channels=4,
    txt_dim=32,
    height=4,
    width=4,
    txt_len=8,
    steps=2,
    repeat=1,
    sample_repeat=1,
)


def diffusers_config(s: Setup) -> dict:
    third = s.head_dim // 8 * 2  # RoPE axes (frame, height, width), summing to head_dim
    return dict(
        patch_size=2,
        in_channels=4 * s.latent_channels,
        out_channels=s.latent_channels,
        num_layers=s.layers,
        attention_head_dim=s.head_dim,
        num_attention_heads=s.heads,
        joint_attention_dim=s.txt_dim,
        axes_dims_rope=(s.head_dim - 2 * third, third, third),
    )


def build(s: Setup, seed: int = 0):
    """(our config, torch model, our params, inputs) with identical weights on both sides."""
    torch = common.setup_torch()
    from diffusers import QwenImageTransformer2DModel

    from qk_jax.convert import qwen_image
    from qk_jax.convert.diffusers_configs import from_diffusers
    from qk_jax.models.mmdit import MMDiTConfig
    from qk_jax.parity.dit_parity import make_inputs
    from qk_jax.tree import unflatten_tree

    torch.manual_seed(seed)
    ref = QwenImageTransformer2DModel(**diffusers_config(s)).eval()
    cfg = from_diffusers(MMDiTConfig, dict(ref.config))
    state = ((k, v.detach().numpy()) for k, v in ref.state_dict().items())
    params = common.copy_tree(unflatten_tree(dict(qwen_image.mapping(cfg).to_jax(state, dtype=np.float32))))
    inputs = make_inputs(
        cfg,
        batch=s.batch,
        height=s.height,
        width=s.width,
        txt_len=s.txt_len,
        pad=s.txt_len // 4,
        condition_segments=0,
        seed=seed,
    )
    return cfg, ref, params, inputs


def our_velocity(cfg, inputs):
    """`velocity(params, img, timestep)` of our MMDiT on the fixed text condition."""
    import jax.numpy as jnp

    from qk_jax.models.mmdit import MMDiT

    model = MMDiT(cfg)
    fixed = {k: jnp.asarray(inputs[k]) for k in ("img_ids", "txt", "txt_mask", "txt_ids")}

    def velocity(params, img, timestep):
        return model.apply(
            {"params": params},
            img,
            fixed["img_ids"],
            fixed["txt"],
            fixed["txt_mask"],
            timestep,
            txt_ids=fixed["txt_ids"],
            num_target_tokens=inputs["n_target"],
        )

    return velocity


def reference_velocity(ref, inputs, device=None):
    """`velocity(img, timestep)` of the diffusers transformer on the same condition (torch
    tensors, on `device` when given)."""
    import torch

    txt, mask = torch.from_numpy(inputs["txt"]), torch.from_numpy(inputs["txt_mask"])
    if device is not None:
        txt, mask = txt.to(device), mask.to(device)

    def velocity(img, timestep):
        return ref(
            hidden_states=img,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=mask,
            timestep=timestep,
            img_shapes=inputs["img_shapes"],
            return_dict=False,
        )[0]

    return velocity


def bench_forward(cfg, ref, params, inputs, s: Setup, peak: dict) -> dict:
    import jax
    import torch

    ours_v, ref_v = our_velocity(cfg, inputs), reference_velocity(ref, inputs)
    img, t = inputs["img"], inputs["timestep"]
    t0 = time.perf_counter()
    compiled = jax.jit(ours_v).lower(params, img, t).compile()
    compile_s = time.perf_counter() - t0
    t_img, t_t = torch.from_numpy(img), torch.from_numpy(t)
    with torch.no_grad():
        ours_t, ref_t = common.compare(lambda: compiled(params, img, t), lambda: ref_v(t_img, t_t), repeat=s.repeat)
        expected = ref_v(t_img, t_t).numpy()
    got = np.asarray(compiled(params, img, t))
    err = float(np.abs(got - expected).max() / np.abs(expected).max())
    n = float(flops.mmdit_flops(cfg, s.batch, s.height * s.width, s.txt_len))
    return common.comparison(
        "mmdit/forward", ours_t, ref_t, flops=n, peak=peak, compile_s=compile_s, output_max_rel_err=err
    )


def bench_train_step(cfg, ref, params, inputs, s: Setup, peak: dict, lr: float = 1e-5) -> dict:
    """Loss: mean squared error between the predicted velocity and noise - x0 at x_t."""
    import jax.numpy as jnp
    import torch

    ours_v, ref_v = our_velocity(cfg, inputs), reference_velocity(ref, inputs)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(inputs["img"].shape).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = inputs["timestep"]
    x_t = ((1 - t[:, None, None]) * x0 + t[:, None, None] * noise).astype(np.float32)
    target = (noise - x0).astype(np.float32)

    def loss_fn(params, x_t, t, target):
        return jnp.mean((ours_v(params, x_t, t) - target) ** 2)

    tx, tt, ttarget = torch.from_numpy(x_t), torch.from_numpy(t), torch.from_numpy(target)
    r = common.compare_train_steps(
        loss_fn,
        params,
        (x_t, t, target),
        ref,
        lambda: torch.mean((ref_v(tx, tt) - ttarget) ** 2),
        lr=lr,
        repeat=s.repeat,
    )
    forward = flops.mmdit_flops(cfg, s.batch, s.height * s.width, s.txt_len)
    n = float(flops.train_step_flops([flops.Part("dit", forward, weight_grads=True)])["total"])
    return common.comparison(
        "mmdit/train_step",
        r["ours"],
        r["reference"],
        flops=n,
        peak=peak,
        compile_s=r["compile_s"],
        params=r["params"],
        first_loss_ours=r["first_loss_ours"],
        first_loss_reference=r["first_loss_reference"],
    )


def bench_sample(cfg, ref, params, inputs, s: Setup, peak: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qk_jax.flow_solvers import euler_sample, flow_schedule, pipeline_sigmas

    ours_v, ref_v = our_velocity(cfg, inputs), reference_velocity(ref, inputs)
    noise = np.random.default_rng(2).standard_normal(inputs["img"].shape).astype(np.float32)
    sigmas, timesteps = flow_schedule(s.steps, sigmas=pipeline_sigmas(s.steps))
    b = s.batch

    def run(params, x):
        return euler_sample(lambda x, t: ours_v(params, x, jnp.full((b,), t)), x, sigmas, timesteps)

    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(params, noise).compile()
    compile_s = time.perf_counter() - t0
    scheduler = FlowMatchEulerDiscreteScheduler()

    def reference():
        scheduler.set_timesteps(sigmas=pipeline_sigmas(s.steps))
        x = torch.from_numpy(noise)
        with torch.no_grad():
            for t in scheduler.timesteps:
                v = ref_v(x, (t / 1000).expand(b))
                x = scheduler.step(v, t, x, return_dict=False)[0]
        return x

    ours_t, ref_t = common.compare(lambda: compiled(params, noise), reference, repeat=s.sample_repeat)
    expected = reference().numpy()
    err = float(np.abs(np.asarray(compiled(params, noise)) - expected).max() / np.abs(expected).max())
    n = float(s.steps * flops.mmdit_flops(cfg, b, s.height * s.width, s.txt_len).total)
    return common.comparison(
        f"mmdit/sample_{s.steps}_steps",
        ours_t,
        ref_t,
        flops=n,
        peak=peak,
        compile_s=compile_s,
        sample_max_rel_err=err,
        steps=s.steps,
    )


def run(quick: bool = False, peak: dict | None = None) -> list[dict]:
    """All MMDiT benchmarks; prints their table and returns the records."""
    s = QUICK if quick else FULL
    peak = peak or common.default_peak(quick)
    cfg, ref, params, inputs = build(s)
    setup = (
        f"{s.layers} double blocks, {s.heads}x{s.head_dim} heads, batch {s.batch} x ({s.height}x{s.width} "
        f"image + {s.txt_len} text tokens)"
    )
    records = [
        bench_forward(cfg, ref, params, inputs, s, peak),
        bench_sample(cfg, ref, params, inputs, s, peak),
        bench_train_step(cfg, ref, params, inputs, s, peak),
    ]
    return common.report(
        f"MMDiT (Qwen-Image family), float32, ours vs diffusers: {setup}", records, setup, reference="diffusers"
    )


if __name__ == "__main__":
    common.script_main(run, __doc__)
