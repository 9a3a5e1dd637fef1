"""A convolutional reference generator on the demo's pictures, against which the DiT's budget is read.

    PYTHONPATH=. python benchmarks/conv_reference.py --data_dir DATA --out DIR [--steps 1400]
        [--batch 16] [--learning_rate 1e-3] [--samples 64] [--dit RUN]

The demo's MMDiT draws a mosaic from noise at the budgets its stage 2 gets (BENCHMARKS.md,
"Learning"). Whether that is the budget or the architecture is a question this script answers
without the rest of Query-Kontext: it trains a small U-Net, unconditionally, on the text-to-image
targets of a Kontext-Shapes data folder, in the same latent (the demo's pixel autoencoder: each
4 x 4-pixel cell folded into 48 channels, a 16 x 16 grid) and with the same flow (x_t = (1 - t) x0 +
t eps, the demo's timestep draw for 64 tokens, the clean-latent prediction under the velocity loss,
Adam with warm-up and cosine decay at the demo's learning rate and batch), then samples it from
noise (20 Euler steps on the same shifted schedule) and measures what the pictures hold with the
judge's detector (`qk_jax.eval.detect`), no prompt needed:

- objects: detected objects per picture (shapes the detector fits, at least three quarters of the
  smallest size the data draws; a one-colour 8 x 8-pixel tile of a mosaic is a square to it, a 4 x 4
  speck is too small; the training targets hold 1-4);
- stray: the share of a picture's palette-coloured pixels outside every detected object's fitted
  outline (specks and tiles that are no shape; about 0 on the training targets);
- clean: the share of pictures with 1-4 objects and at most 10% stray pixels.

The same measures are printed for the training targets themselves and, with `--dit RUN`, for a
stage-2 run's unconditional samples from noise (its own sampler and schedule, EMA weights, guidance
0: the condition masked out), so the two generators are compared at the same number of samples seen.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qk_jax import flow, flow_solvers
from qk_jax.data import builders, render, vocab
from qk_jax.data import records as records_lib
from qk_jax.eval import detect
from qk_jax.models.mmdit.blocks import timestep_sinusoid
from qk_jax.models.vae import pixel
from qk_jax.sample import Sampler, save_grid, training_schedule

# The demo's autoencoder: each 4 x 4-pixel cell folded into 48 channels, lossless.
AUTOENCODER = pixel.PixelSpaceAutoencoder(pixel.PixelSpaceConfig(factor=4))


class ResBlock(nn.Module):
    """(B, H, W, C_in), time embedding (B, E) -> (B, H, W, channels): two 3x3 convolutions, the time
    added between them, the second zero-initialised so the block starts as its skip path."""

    channels: int

    @nn.compact
    def __call__(self, x, emb):
        h = nn.Conv(self.channels, (3, 3))(nn.silu(nn.GroupNorm(num_groups=8)(x)))
        h = h + nn.Dense(self.channels)(emb)[:, None, None]
        h = nn.Conv(self.channels, (3, 3), kernel_init=nn.initializers.zeros)(nn.silu(nn.GroupNorm(num_groups=8)(h)))
        skip = x if x.shape[-1] == self.channels else nn.Conv(self.channels, (1, 1))(x)
        return skip + h


class UNet(nn.Module):
    """Latent (B, 16, 16, 48), t (B,) -> clean-latent prediction (B, 16, 16, 48); two resolutions
    below the input's, two residual blocks per level, skip connections (DDPM's layout, small)."""

    widths: tuple[int, ...] = (64, 128, 128)

    @nn.compact
    def __call__(self, x, t):
        emb = nn.Dense(256)(nn.silu(nn.Dense(256)(timestep_sinusoid(t, "flux"))))
        h = nn.Conv(self.widths[0], (3, 3))(x)
        skips = []
        for i, ch in enumerate(self.widths):
            for _ in range(2):
                h = ResBlock(ch)(h, emb)
                skips.append(h)
            if i < len(self.widths) - 1:
                h = nn.avg_pool(h, (2, 2), (2, 2))
        h = ResBlock(self.widths[-1])(h, emb)
        for i, ch in reversed(list(enumerate(self.widths))):
            for _ in range(2):
                h = ResBlock(ch)(jnp.concatenate([h, skips.pop()], -1), emb)
            if i > 0:
                h = jax.image.resize(h, (h.shape[0], h.shape[1] * 2, h.shape[2] * 2, h.shape[3]), "nearest")
        return nn.Conv(x.shape[-1], (3, 3))(nn.silu(nn.GroupNorm(num_groups=8)(h)))


def load_targets(data_dir: str, limit: int | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8: the text-to-image training targets."""
    source = builders.load_source(data_dir, builders.SHAPES_NAME, "t2i", "train")
    n = len(source) if limit is None else min(limit, len(source))
    return np.stack([records_lib.decode_image(records_lib.normalize(source[i])["target"]) for i in range(n)])


# Three quarters of the smallest circumradius the data draws (`vocab.SIZES`, jittered): a 4 x 4-pixel
# speck of one colour (circumradius 0.044 of a 64-pixel side) is no object, its pixels are stray.
MIN_OBJECT_R = 0.75 * min(vocab.SIZES.values()) * (1 - vocab.SIZE_JITTER)


def picture_stats(images: list[np.ndarray]) -> dict[str, float]:
    """objects per picture, stray share, clean share (see the module docstring)."""
    counts, strays, clean = [], [], []
    for img in images:
        dets = [d for d in detect.detect(img) if d.r >= MIN_OBJECT_R]
        labels, _ = detect.label_pixels(detect.as_float_image(img), detect.DetectParams())
        coloured = labels >= 0
        h, w = coloured.shape
        inside = np.zeros((h, w), bool)
        for d in dets:
            r_px = d.r * min(h, w)
            y0, x0, cov, _ = render.object_layers(d.shape, d.cx * w, d.cy * h, r_px, d.rotation, h, w, pad=3)
            inside[y0 : y0 + cov.shape[0], x0 : x0 + cov.shape[1]] |= cov > 0.0
        stray = float((coloured & ~inside).sum() / max(coloured.sum(), 1))
        counts.append(len(dets))
        strays.append(stray)
        clean.append(1 <= len(dets) <= 4 and stray <= 0.1)
    return {"objects": float(np.mean(counts)), "stray": float(np.mean(strays)), "clean": float(np.mean(clean))}


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(np.clip(np.round((im + 1) * 127.5), 0, 255), np.uint8) for im in images]


def train_and_sample(targets: np.ndarray, args) -> tuple[list[np.ndarray], dict]:
    latents = np.asarray(AUTOENCODER.encode(jnp.asarray(targets, jnp.float32) / 127.5 - 1.0))
    model = UNet()
    tcfg = flow.TimestepConfig()
    seq_len = 64  # the demo DiT's token count for these pictures: the same timestep shift
    key = jax.random.key(args.seed)
    params = model.init(key, jnp.zeros((1,) + latents.shape[1:]), jnp.zeros((1,)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    sched = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, max(args.steps // 20, 1), args.steps)
    opt = optax.adamw(sched, weight_decay=0.0)
    state = opt.init(params)
    min_t = 1e-3

    def loss_fn(p, x0, k):
        k_t, k_n = jax.random.split(k)
        t = flow.sample_timesteps(k_t, x0.shape[0], tcfg, image_seq_len=seq_len)
        eps = jax.random.normal(k_n, x0.shape)
        xt = flow.noise_latents(x0, eps, t)
        v_hat = (xt - model.apply(p, xt, t)) / jnp.maximum(t, min_t)[:, None, None, None]
        return jnp.mean(jnp.square(v_hat - flow.velocity_target(x0, eps)))

    @jax.jit
    def step(p, s, x0, k):
        loss, g = jax.value_and_grad(loss_fn)(p, x0, k)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    rng = np.random.default_rng(args.seed)
    losses, start = [], time.time()
    for i in range(args.steps):
        idx = rng.integers(0, len(latents), args.batch)
        params, state, loss = step(params, state, jnp.asarray(latents[idx]), jax.random.fold_in(key, i))
        losses.append(float(loss))
        if (i + 1) % 100 == 0:
            print(f"step {i + 1:5d}  loss {np.mean(losses[-100:]):.4f}  {(time.time() - start) / (i + 1):.3f} s/step")
    step_seconds = (time.time() - start) / args.steps

    # The schedule the demo's sampler takes from these timestep settings (`Sampler.schedule`).
    schedule = training_schedule(tcfg)
    sigmas, timesteps = flow_solvers.flow_schedule(
        args.sample_steps, schedule, sigmas=flow_solvers.pipeline_sigmas(args.sample_steps), image_seq_len=seq_len
    )

    def velocity(x, t):
        return (x - model.apply(params, x, jnp.full((x.shape[0],), t))) / jnp.maximum(t, min_t)

    @jax.jit
    def sample(k):
        noise = jax.random.normal(k, (args.samples,) + latents.shape[1:])
        return flow_solvers.euler_sample(velocity, noise, sigmas, timesteps)

    pictures = to_uint8(np.asarray(AUTOENCODER.decode(sample(jax.random.key(args.seed + 1)))))
    info = {
        "parameters": int(n_params),
        "final_loss": float(np.mean(losses[-200:])),
        "step_seconds": round(step_seconds, 3),
    }
    return pictures, info


def dit_pictures(run: str, n: int, seed: int) -> list[np.ndarray]:
    """A stage-2 run's unconditional samples from noise: its own sampler and schedule, EMA weights,
    guidance 0 (v = v_uncond + 0 (v_cond - v_uncond): the condition masked out, as trained for CFG)."""
    sampler = Sampler.from_checkpoint(run)
    pics = []
    for i in range(0, n, 16):
        recs = sampler.records(["a picture"] * min(16, n - i))
        pics.extend(sampler.generate(recs, seed=seed + i, guidance=0.0))
    return pics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True, help="folder for the sample grids and results.json")
    p.add_argument("--steps", type=int, default=1400, help="U-Net training steps (0: no U-Net)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most this many training targets")
    p.add_argument("--dit", default="", help="a stage-2 run whose samples from noise are measured alike")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    targets = load_targets(args.data_dir, args.limit)
    rows = {"training targets": picture_stats(list(targets[: args.samples]))}
    if args.steps:
        pictures, info = train_and_sample(targets, args)
        rows[f"U-Net, {args.steps} steps of {args.batch}"] = dict(picture_stats(pictures), **info)
        save_grid(np.stack(pictures), os.path.join(args.out, "unet_samples.png"))
    if args.dit:
        dit = dit_pictures(args.dit, args.samples, args.seed)
        rows[f"DiT run {args.dit}"] = picture_stats(dit)
        save_grid(np.stack(dit), os.path.join(args.out, "dit_samples.png"))
    print(f"\n| pictures ({args.samples}) | objects | stray | clean | notes |\n|---|---|---|---|---|")
    for name, r in rows.items():
        extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("objects", "stray", "clean"))
        print(f"| {name} | {r['objects']:.2f} | {r['stray']:.3f} | {r['clean']:.3f} | {extra} |")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
