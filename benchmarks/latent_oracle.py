"""The oracle-conditioned DiT (`oracle_condition.py`) on the latents of an autoencoder trained on the
pictures first: does a learned latent space, as the paper's generator has, lift the drawing from noise?

    PYTHONPATH=. python benchmarks/latent_oracle.py --data_dir DATA --out DIR [--autoencoder_steps 1200]
        [--channels 16,32,64] [--latent_channels 8] [--edge_weight 0] [--patch_size 2] [--steps 1400]
        [--guidance 1,4] [--autoencoder_only | --autoencoder_from DIR] [oracle_condition.py's flags]

The demo's generator models pixels: its autoencoder is a lossless 4 x 4-pixel reshape
(`model.vae.kind=pixel`), because no pretrained autoencoder of its size exists, where the paper's
DiT (Qwen-Image) models the latents of a pretrained VAE. This script first trains a small
`AutoencoderKL` (the FLUX / SD3 layout of `qk_jax/models/vae/kl.py`: `len(channels) - 1`
downsamplings, no attention) on the text-to-image training pictures (L1 + L2 reconstruction of a
posterior sample, a small KL term; `--edge_weight w` weighs the pixels within one of a colour edge
of the picture 1 + w times, so the few pixels that make a triangle's corner or a star's points count
as much as the background), measures its latents' mean and spread (the `shift_factor` and
`scaling_factor` of its config, so the DiT sees unit-scale latents) and judges its reconstructions of
the validation pictures: the ceiling of anything decoded from its latents. Then it runs the oracle
(the stage config's DiT and recipe on condition tokens read off each prompt's scene graph) in that
latent space, the autoencoder frozen, and judges the samples from noise as `oracle_condition.py`
does. `results.json` holds both, under "autoencoder" and the oracle's keys. The autoencoder is saved
to `autoencoder.msgpack` and `autoencoder.json` in `--out`; `--autoencoder_from DIR` loads one from
there instead of training it, `--autoencoder_only` stops after judging it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from benchmarks import oracle_condition as oracle
from qk_jax.eval import score
from qk_jax.models.vae.kl import AutoencoderKL, AutoencoderKLConfig
from qk_jax.sample import save_grid


def autoencoder_config(channels: tuple[int, ...], latent_channels: int) -> AutoencoderKLConfig:
    """A small AutoencoderKL of the demo's pictures (no mid-block attention: the pictures' parts are
    local), un-normalised until `with_latent_scale`."""
    return AutoencoderKLConfig(
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(8, min(channels)),
        scaling_factor=1.0,
        shift_factor=0.0,
        mid_block_add_attention=False,
        sample_size=64,
    )


def edge_mask(images: jax.Array, threshold: float = 0.1) -> jax.Array:
    """(B, H, W, 1) 1.0 where a pixel's 3 x 3 neighbourhood spans a colour change of more than
    `threshold` (in [-1, 1] units) in some channel: the outline of every object, both sides of it."""
    window = (1, 3, 3, 1)
    high = jax.lax.reduce_window(images, -jnp.inf, jax.lax.max, window, (1, 1, 1, 1), "SAME")
    low = jax.lax.reduce_window(images, jnp.inf, jax.lax.min, window, (1, 1, 1, 1), "SAME")
    return (jnp.max(high - low, axis=-1, keepdims=True) > threshold).astype(images.dtype)


def train_autoencoder(cfg: AutoencoderKLConfig, images: np.ndarray, args) -> tuple[dict, float]:
    """(parameters, seconds) after `args.autoencoder_steps` Adam steps on batches of `images` (N, H, W, 3)
    in [-1, 1]: mean of (1 + `args.edge_weight` x `edge_mask(x)`) (|x - y| + (x - y)^2) of the decoded
    posterior sample y, + `args.kl_weight` x the KL to N(0, 1) summed over channels, averaged over
    positions; the learning rate warms up over min(50, steps / 10) steps and decays along a cosine to
    5% of its peak."""
    model = AutoencoderKL(cfg)
    params = model.init(jax.random.key(args.seed), jnp.zeros((1,) + images.shape[1:]))["params"]
    steps = args.autoencoder_steps
    warmup = min(50, max(steps // 10, 1))
    lr = args.autoencoder_lr
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=0.05 * lr)
    opt = optax.adam(schedule)
    opt_state = opt.init(params)

    def loss_fn(p, x, rng):
        mean, logvar = model.apply({"params": p}, x, method="encode_moments")
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        y = model.apply({"params": p}, z, method="decode_raw")
        weight = 1.0 + args.edge_weight * edge_mask(x)
        reconstruction = jnp.mean(weight * (jnp.abs(y - x) + jnp.square(y - x)))
        kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
        return reconstruction + args.kl_weight * kl, reconstruction

    @jax.jit
    def step(p, s, x, rng):
        (_, reconstruction), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, rng)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, reconstruction

    data_rng = np.random.default_rng(args.seed)
    start, window = time.time(), []
    for i in range(steps):
        idx = data_rng.integers(0, len(images), args.autoencoder_batch)
        params, opt_state, reconstruction = step(
            params, opt_state, jnp.asarray(images[idx]), jax.random.key(args.seed + i)
        )
        window.append(float(reconstruction))
        if (i + 1) % 100 == 0:
            print(f"autoencoder step {i + 1:5d}  reconstruction loss {np.mean(window[-100:]):.4f}")
    return params, time.time() - start


def with_latent_scale(cfg: AutoencoderKLConfig, params: dict, images: np.ndarray) -> AutoencoderKLConfig:
    """`cfg` with shift_factor / scaling_factor = the posterior means' mean and 1 / spread over `images`."""
    model = AutoencoderKL(cfg)
    means = jax.jit(lambda x: model.apply({"params": params}, x, method="encode_moments")[0])
    z = np.concatenate([np.asarray(means(jnp.asarray(images[i : i + 64]))) for i in range(0, len(images), 64)])
    return dataclasses.replace(cfg, shift_factor=float(z.mean()), scaling_factor=1 / float(z.std()))


def reconstructed(cfg: AutoencoderKLConfig, params: dict, images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 decodings of the posterior means of `images` in [-1, 1]."""
    model = AutoencoderKL(cfg)
    fn = jax.jit(
        lambda x: model.apply({"params": params}, model.apply({"params": params}, x, method="encode"), method="decode")
    )
    out = np.concatenate([np.asarray(fn(jnp.asarray(images[i : i + 32]))) for i in range(0, len(images), 32)])
    return np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8)


def save_autoencoder(out: str, cfg: AutoencoderKLConfig, params: dict, info: dict) -> None:
    """`autoencoder.msgpack` (parameters) and `autoencoder.json` (config and what was measured) in `out`."""
    with open(os.path.join(out, "autoencoder.msgpack"), "wb") as f:
        f.write(serialization.to_bytes(params))
    with open(os.path.join(out, "autoencoder.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "measured": info}, f, indent=1)


def load_autoencoder(folder: str) -> tuple[AutoencoderKLConfig, dict, dict]:
    """(config, parameters, what was measured) saved by `save_autoencoder` in `folder`."""
    paths = [os.path.join(folder, name) for name in ("autoencoder.json", "autoencoder.msgpack")]
    for path in paths:
        if not os.path.exists(path):
            name = os.path.basename(path)
            raise FileNotFoundError(f"--autoencoder_from {folder}: no {name} (a --out of this script)")
    with open(paths[0]) as f:
        saved = json.load(f)
    cfg = AutoencoderKLConfig(**saved["config"])
    template = AutoencoderKL(cfg).init(jax.random.key(0), jnp.zeros((1, cfg.sample_size, cfg.sample_size, 3)))
    with open(paths[1], "rb") as f:
        params = serialization.from_bytes(template["params"], f.read())
    return cfg, params, saved["measured"]


def judged_autoencoder(cfg, params, val_recs, val_images, out: str) -> dict:
    """PSNR and judge of the decoded validation pictures (`reconstructions.png` in `out`)."""
    pictures = reconstructed(cfg, params, val_images)
    save_grid(pictures, os.path.join(out, "reconstructions.png"))
    targets = np.round((val_images + 1) * 127.5)
    return {
        "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
        "downsample_factor": cfg.downsample_factor,
        "latent_channels": cfg.latent_channels,
        "psnr_db": float(np.mean([score.psnr(a, b) for a, b in zip(pictures, targets)])),
        "reconstructions": oracle.judged(val_recs, list(pictures)),
    }


def main() -> None:
    p = oracle.parser(__doc__)
    p.add_argument("--autoencoder_steps", type=int, default=1200)
    p.add_argument("--autoencoder_batch", type=int, default=16)
    p.add_argument("--autoencoder_lr", type=float, default=1e-3)
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--edge_weight", type=float, default=0.0, help="extra weight of the pixels at colour edges")
    p.add_argument("--channels", type=lambda v: tuple(int(c) for c in v.split(",")), default=(16, 32, 64))
    p.add_argument("--latent_channels", type=int, default=8)
    p.add_argument("--patch_size", type=int, default=2, help="the DiT's patch of latent cells per token")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--autoencoder_only", action="store_true", help="train and judge the autoencoder, no DiT")
    mode.add_argument("--autoencoder_from", default=None, help="a previous --out whose autoencoder to use")
    args = oracle.parse_checked(p)
    os.makedirs(args.out, exist_ok=True)

    val_recs, val_images, _ = oracle.load_split(args.data_dir, "validation", args.samples)
    if args.autoencoder_from:
        cfg, params, training = load_autoencoder(args.autoencoder_from)
        training = {**training, "from": args.autoencoder_from}
    else:
        # the training pictures are decoded only to train on; the oracle loads its own records
        _, images, _ = oracle.load_split(args.data_dir, "train", args.limit)
        cfg = autoencoder_config(args.channels, args.latent_channels)
        params, seconds = train_autoencoder(cfg, images, args)
        cfg = with_latent_scale(cfg, params, images[:1024])
        training = {"steps": args.autoencoder_steps, "edge_weight": args.edge_weight, "seconds": round(seconds, 1)}
    autoencoder = {**training, **judged_autoencoder(cfg, params, val_recs, val_images, args.out)}
    if not args.autoencoder_from:
        save_autoencoder(args.out, cfg, params, autoencoder)
    r = autoencoder["reconstructions"]
    print(
        f"autoencoder: {autoencoder['parameters']} parameters; validation reconstructions "
        f"{autoencoder['psnr_db']:.1f} dB, judge {r['judge']:.3f} (chance {r['chance']:.3f}); pictures: "
        + ", ".join(f"{k} {v:.3f}" for k, v in r["pictures"].items())
    )
    result = {"autoencoder": autoencoder}
    if not args.autoencoder_only:
        result = {**oracle.run(args, vae=oracle.TrainedAutoencoder(cfg, params, args.patch_size)), **result}
        oracle.report(result)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
