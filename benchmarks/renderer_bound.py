"""Drawing Kontext-Shapes from the exact scene by plain regression: how many samples does it take?

    PYTHONPATH=. python benchmarks/renderer_bound.py --data_dir DATA --out DIR [--generator dit|conv]
        [--steps 5600] [--eval_at 350,700,1400,2800,5600] [--config configs/stage2.py:demo]
        [--override FIELD=VALUE ...] [--edge_weight 0] [--coordinate_head 0] [--samples 64]

The demo's generator, given the prompt's facts exactly, does not draw the shapes it is asked for,
even on its training prompts (BENCHMARKS.md, "Learning"). This script asks the easiest question of
that kind: learn a deterministic renderer, the drawn scene's every object (shape, colour, exact
centre and radius) and its background in, the picture out, under the plain squared error. There is
nothing to guess (no noise, no unstated attribute, no choice among pictures), so a generator that
cannot learn this within a budget cannot learn to draw the same pictures from noise within it, and
the samples this takes are a lower bound on what any recipe on that generator needs.

`--generator dit`: the stage config's DiT (its architecture, autoencoder and `--override`s) as a
one-step renderer: its clean-picture prediction at t = 1 from an all-zero input, conditioned on
`oracle_condition.SceneTokens`. `--generator conv`: a convolutional decoder of about the same size
(`ConvRenderer`), the reference for what a convolutional hierarchy learns from the same tokens.
Both train with the stage's optimiser, learning rate, batch and EMA. At each `--eval_at` step the
EMA weights render the first `--samples` validation scenes and as many training ones, which the
judge scores against their prompts (and against the next record's: chance), with the mean PSNR
against the true pictures: the curve of samples seen against the judge. `--edge_weight w` weighs
the squared error 1 + w times at the pixels on an outline (what the judge reads a shape from).
`--coordinate_head H` adds a per-pixel head of H units to the DiT's output (`CoordinateHead`):
whether drawing is limited by the one linear map from a token to its 8 x 8 pixels.
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

from benchmarks import oracle_condition as oracle
from benchmarks.latent_oracle import edge_mask
from qk_jax import optim, sharding
from qk_jax.config import load_config
from qk_jax.data.model_inputs import image_ids
from qk_jax.model_config import build_kontext_config
from qk_jax.models.kontext import QueryKontext
from qk_jax.models.vae.pixel import PixelSpaceConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConvRenderer(nn.Module):
    """Scene tokens (B, T, D) -> pictures (B, H, W, 3) in [-1, 1]: the tokens, flattened, are projected
    to an (H / 8, W / 8, seed_channels) grid, then two residual 3x3 blocks per scale at widths
    `channels`, doubling the resolution between scales, and a 3x3 convolution to RGB."""

    height: int
    width: int
    seed_channels: int = 32
    channels: tuple[int, ...] = (128, 128, 64, 32)

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        b = tokens.shape[0]
        h, w = self.height // 2 ** (len(self.channels) - 1), self.width // 2 ** (len(self.channels) - 1)
        x = nn.Dense(h * w * self.seed_channels)(tokens.reshape(b, -1)).reshape(b, h, w, self.seed_channels)
        for level, c in enumerate(self.channels):
            if level:
                x = jax.image.resize(x, (b, x.shape[1] * 2, x.shape[2] * 2, x.shape[3]), "nearest")
            x = nn.Conv(c, (3, 3))(x)
            for _ in range(2):
                y = nn.Conv(c, (3, 3))(nn.silu(nn.GroupNorm(min(32, c // 4))(x)))
                x = x + nn.Conv(c, (3, 3))(nn.silu(nn.GroupNorm(min(32, c // 4))(y)))
        return nn.Conv(3, (3, 3))(nn.silu(nn.GroupNorm(8)(x)))


def pixels_to_tokens(pixels: jax.Array, patch_size: int, factor: int) -> jax.Array:
    """(B, N, (patch_size * factor)^2, C) per-pixel values of each token's pixels, row-major over the
    token's square of pixels -> (B, N, C * factor^2 * patch_size^2) in the DiT's token packing of the
    pixel autoencoder's latents: each latent cell holds its factor x factor pixels as (dy, dx, C)
    (`PixelSpaceAutoencoder.encode`), and a token its patch_size^2 cells channel-major (`patchify`)."""
    b, n, _, c = pixels.shape
    p, f = patch_size, factor
    cells = pixels.reshape(b, n, p, f, p, f, c)  # (py, dy, px, dx, C)
    return cells.transpose(0, 1, 3, 5, 6, 2, 4).reshape(b, n, -1)  # (dy, dx, C, py, px)


class CoordinateHead(nn.Module):
    """A per-pixel head on the DiT's last image tokens (B, N, D) -> an addition to its output tokens
    (B, N, 3 * factor^2 * patch_size^2), zero at init: each pixel of a token is
    sum_k m_k gelu(a_k + g_k . u) over `hidden` units, with a_k, g_k (2-D) and m_k (RGB) read off the
    token and u the pixel's place in the token in [-1, 1]^2. Each unit is a soft half-plane the token
    places and orients, so a token can draw an edge through its pixels at any place and angle, where
    the DiT's own head is one linear map from the token to its pixels."""

    hidden: int
    patch_size: int
    factor: int
    channels: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        side = self.patch_size * self.factor
        grid = (jnp.arange(side) + 0.5) / side * 2.0 - 1.0
        u = jnp.stack(jnp.meshgrid(grid, grid, indexing="ij"), -1).reshape(side * side, 2)  # (row, col)
        x = nn.LayerNorm()(x)
        offset = nn.Dense(self.hidden)(x)
        normal = nn.Dense(2 * self.hidden)(x).reshape(b, n, self.hidden, 2)
        weight = nn.Dense(self.hidden * self.channels, kernel_init=nn.initializers.zeros)(x)
        # 4: a unit's ramp spans about a quarter of the token at init (u spans 2)
        units = nn.gelu(offset[:, :, None, :] + 4.0 * jnp.einsum("bnhk,sk->bnsh", normal, u))
        pixels = jnp.einsum("bnsh,bnhc->bnsc", units, weight.reshape(b, n, self.hidden, self.channels))
        return pixels_to_tokens(pixels, self.patch_size, self.factor)


def edge_weighted_error(pictures: jax.Array, target: jax.Array, edge_weight: float) -> jax.Array:
    """The squared error of pictures (B, H, W, 3) against target, averaged with weight 1 + edge_weight
    at the target's outline pixels (`latent_oracle.edge_mask`) and 1 elsewhere."""
    weight = 1.0 + edge_weight * edge_mask(target)
    return jnp.mean(weight * jnp.square(pictures.astype(jnp.float32) - target)) / jnp.mean(weight)


def build_renderer(args, height: int, width: int, rows: np.ndarray):
    """(init params, render(params, rows) -> pictures (B, H, W, 3) in [-1, 1], the stage config)."""
    config = load_config(
        args.config, [f"train.steps={args.steps}", f"train.warmup_steps={args.warmup}"] + args.override
    )
    kcfg = build_kontext_config(config)
    scene_tokens = oracle.SceneTokens(kcfg.generator.joint_attention_dim)
    k_gen, k_emb = jax.random.split(jax.random.key(args.seed))
    params = {"scene": scene_tokens.init(k_emb, jnp.asarray(rows[:1]))["params"]}

    if args.generator == "conv":
        if args.coordinate_head:
            raise ValueError("--coordinate_head is a head on the DiT's tokens: it needs --generator dit")
        decoder = ConvRenderer(height, width)
        params["conv"] = decoder.init(k_gen, jnp.zeros((1,) + rows.shape[1:2] + (scene_tokens.width,)))["params"]

        def render(p, r):
            cond, _ = scene_tokens.apply({"params": p["scene"]}, r)
            return jnp.tanh(decoder.apply({"params": p["conv"]}, cond))  # absent objects' tokens are zero

        return params, render, config

    model = QueryKontext(kcfg)
    params[kcfg.generator_key] = sharding.unbox_abstract(model.init(k_gen))[kcfg.generator_key]
    ids = jnp.asarray(image_ids(kcfg, np.zeros(1, np.int32), height, width, 0))
    n_tokens = ids.shape[1]

    if args.coordinate_head:
        vae = kcfg.vae
        if (
            not isinstance(vae, PixelSpaceConfig)
            or vae.keep
            or kcfg.prediction != "x0"
            or kcfg.generator.num_single_layers
        ):
            raise ValueError(
                "--coordinate_head draws pixels from the last double-stream block: it needs the lossless pixel "
                "autoencoder (model.vae.kind=pixel, keep=0), prediction='x0' and no single-stream blocks, as the "
                f"demo's; the config has {vae}, prediction={kcfg.prediction!r}, "
                f"num_single_layers={kcfg.generator.num_single_layers}"
            )
        head = CoordinateHead(args.coordinate_head, kcfg.generator.patch_size, vae.factor)
        params["coordinate_head"] = head.init(k_emb, jnp.zeros((1, 1, kcfg.generator.inner_dim)))["params"]

        def render_with_head(p, r):
            cond, mask = scene_tokens.apply({"params": p["scene"]}, r)
            b = r.shape[0]
            x0, inter = model.generator.apply(  # prediction "x0": the DiT's output is the clean picture
                model.variables(p, kcfg.generator_key),
                jnp.zeros((b, n_tokens, kcfg.generator.in_channels)),
                jnp.broadcast_to(ids, (b,) + ids.shape[1:]),
                cond,
                mask,
                jnp.ones((b,)),
                num_target_tokens=n_tokens,
                return_intermediates=True,
            )
            x0 = x0 + head.apply({"params": p["coordinate_head"]}, inter["double_img"][-1])
            return model.decode(p, x0, height, width)

        return params, render_with_head, config

    def render(p, r):
        cond, mask = scene_tokens.apply({"params": p["scene"]}, r)
        b = r.shape[0]
        x = jnp.zeros((b, n_tokens, kcfg.generator.in_channels))
        t = jnp.ones((b,))
        v = model.velocity(p, x, None, jnp.broadcast_to(ids, (b,) + ids.shape[1:]), cond, mask, t)
        return model.decode(p, x - v, height, width)  # x0 = x_t - t v, at t = 1

    return params, render, config


def run(args) -> dict:
    recs, targets, rows = oracle.load_split(args.data_dir, "train", args.limit, "scene")
    val_recs, val_targets, val_rows = oracle.load_split(args.data_dir, "validation", args.samples, "scene")
    n_eval = len(val_recs)
    h, w = targets.shape[1:3]
    params, render, config = build_renderer(args, h, w, rows)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    opt = optim.make_optimizer(config.train)
    opt_state = opt.init(params)
    ema = params

    def loss_fn(p, r, target):
        return edge_weighted_error(render(p, r), target, args.edge_weight)

    step = oracle.train_step(loss_fn, opt, config.train.ema_decay)

    render_jit = jax.jit(render)

    def evaluate(p, r, truth, rs, grid):
        images = oracle.pictures_of(lambda _, s: render_jit(p, jnp.asarray(r[s])), len(r))
        return oracle.judged_with_psnr(rs, images, truth, os.path.join(args.out, grid))

    data_rng = np.random.default_rng(args.seed)

    def step_once(i):
        nonlocal params, opt_state, ema
        idx = data_rng.integers(0, len(targets), config.train.batch_size)
        params, opt_state, ema, loss = step(
            params, opt_state, ema, i, jnp.asarray(rows[idx]), jnp.asarray(targets[idx])
        )
        return loss

    curve, start, train_seconds = [], time.time(), 0.0
    for n_steps, losses, seconds in oracle.train_judged(step_once, args.steps, args.eval_at):
        train_seconds = seconds  # the step time reported is over all the steps, the last point's
        point = {
            "step": n_steps,
            "samples_seen": n_steps * config.train.batch_size,
            "loss": float(np.mean(losses[-100:])),
            "validation": evaluate(ema, val_rows, val_targets, val_recs, "validation_renders.png"),
            "train": evaluate(ema, rows[:n_eval], targets[:n_eval], recs[:n_eval], "train_renders.png"),
        }
        curve.append(point)
        print(
            f"  step {point['step']}: validation judge {point['validation']['judge']:.3f} "
            f"(chance {point['validation']['chance']:.3f}) {point['validation']['psnr']:.1f} dB; "
            f"train judge {point['train']['judge']:.3f} {point['train']['psnr']:.1f} dB"
        )
    return {
        "generator": args.generator,
        "parameters": int(n_params),
        "edge_weight": args.edge_weight,
        "coordinate_head": args.coordinate_head,
        "samples": n_eval,
        "step_seconds": round(train_seconds / max(args.steps, 1), 3),
        "wall_seconds": round(time.time() - start),
        "curve": curve,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True, help="folder for results.json and the render grids")
    p.add_argument("--generator", choices=("dit", "conv"), default="dit")
    p.add_argument(
        "--config",
        default=os.path.join(ROOT, "configs", "stage2.py") + ":demo",
        help="the stage config whose DiT (for --generator dit) and optimiser train (default: the demo's stage 2)",
    )
    p.add_argument("--override", action="append", default=[], help="FIELD=VALUE of that config (repeatable)")
    p.add_argument("--steps", type=int, default=5600)
    p.add_argument("--warmup", type=int, default=70)
    p.add_argument(
        "--eval_at",
        type=lambda v: {int(x) for x in v.split(",")},
        default={350, 700, 1400, 2800, 5600},
        help="steps at which to render and judge, comma-separated (the last step always is)",
    )
    p.add_argument(
        "--edge_weight",
        type=float,
        default=0.0,
        help="extra weight of the pixels within one of a colour edge (`latent_oracle.edge_mask`): the "
        "squared error is averaged with weight 1 + w there, 1 elsewhere (default 0: the plain squared error)",
    )
    p.add_argument(
        "--coordinate_head",
        type=int,
        default=0,
        help="units of a per-pixel head added to the DiT's output (`CoordinateHead`; --generator dit on the "
        "pixel autoencoder; default 0: none)",
    )
    p.add_argument("--samples", type=int, default=64, help="validation scenes (and as many training ones) judged")
    p.add_argument("--limit", type=int, default=None, help="at most this many training records")
    p.add_argument("--seed", type=int, default=0)
    return p


def main() -> None:
    args = parser().parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = run(args)
    print(f"\n{result['generator']}: {result['parameters']} parameters, {result['step_seconds']} s/step")
    print("| step | samples seen | loss | validation judge (chance) | PSNR | train judge | PSNR |")
    for c in result["curve"]:
        v, t = c["validation"], c["train"]
        print(
            f"| {c['step']} | {c['samples_seen']} | {c['loss']:.4f} | {v['judge']:.3f} ({v['chance']:.3f}) | "
            f"{v['psnr']:.1f} dB | {t['judge']:.3f} | {t['psnr']:.1f} dB |"
        )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
