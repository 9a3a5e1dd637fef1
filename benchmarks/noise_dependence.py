"""How much a run's prediction from pure noise depends on the noise rather than on the prompt.

    PYTHONPATH=. python benchmarks/noise_dependence.py --checkpoint RUN [--step N] [--split validation]
        [--task t2i] [--records 32] [--seeds 4] [--guidance 1] [--data_dir DIR] [--steps 1,2,4,20] [--plain]
        [--grid PATH]

At t = 1 the noisy image is the noise itself and says nothing of the picture, so the best
clean-image prediction is the prompt's mean image, the same whatever the noise. One sampler step
from sigma = 1 to 0 returns exactly that prediction (x0_hat = x1 - v(x1, 1)); this draws it for
`--records` records with `--seeds` noises each (EMA weights, no guidance unless given) and prints
its variance across the noises of one record, across records (of the mean over noises), and the
share of the first: 0 for a generator that has learnt what pure noise is worth; a generator that
takes the noise for a faint picture scatters objects from it, which the sampler's later steps only
sharpen.

Then it samples the same records from noise with each of `--steps` sampler step counts and prints
the PSNR of the samples to their targets. On a task whose condition holds the target
(`--task reconstruction`, or `edit` in stage 3) a sound generator gets closer to the target with
more steps; one whose denoiser fails along its own trajectory gets further from it than its one-step
prediction. Beside them it prints what a picture of each target's background colour alone (the
per-channel median, no objects) scores: a sample below that has drawn nothing of the objects that
helps the PSNR.

It also predicts the clean image in one step from each target noised to t = 1, 0.9, 0.8, 0.7 and
0.5 (the training pairs, not the sampler's own trajectory) and prints their PSNR to the target:
where that stays at the background-alone PSNR, the condition and the noisy picture have placed no
object at that noise level. Beside them, what a fixed linear denoiser that is told the background
colour makes of the same noisy targets (a Gaussian blur of x_t, its departure from the background
scaled, the best blur and scale per t): the objects the noisy picture shows to a filter.
`--grid PATH` writes those predictions as an image (a row of targets,
then a row per t, top to bottom).

`--plain` replaces each record's target (and source) by such a plain picture of its background
colour: the easiest target there is, whose condition says there is nothing to draw. It also prints
the spread (standard deviation over the image, in 0-255 levels) of the samples' per-token block
means: 0 for a plain picture, larger where the sampler has drawn blocks of its own.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from benchmarks.judge_run import add_split_arguments, split_records
from qk_jax import sharding
from qk_jax.data import records as records_lib
from qk_jax.eval import score, signal
from qk_jax.sample import Sampler, save_grid

PREDICTION_TIMESTEPS = (1.0, 0.9, 0.8, 0.7, 0.5)


def noise_dependence(sampler: Sampler, recs: list[dict], seeds: int, guidance: float) -> dict:
    """{"across_noise", "across_records", "noise_share"}: variances (pixel units in [-1, 1]) of the
    t = 1 clean-image prediction of `recs` (one group), over `seeds` noises."""
    preds = np.stack(
        [sampler.generate(recs, steps=1, guidance=guidance, seed=seed).astype(np.float64) for seed in range(seeds)]
    )  # (seeds, records, H, W, 3)
    preds = preds / 127.5 - 1.0
    across_noise = float(preds.var(axis=0).mean())
    across_records = float(preds.mean(axis=0).var(axis=0).mean())
    return {
        "across_noise": across_noise,
        "across_records": across_records,
        "noise_share": across_noise / max(across_noise + across_records, 1e-12),
    }


def predictions_from_targets(sampler: Sampler, recs: list[dict], timesteps, seed: int = 0) -> dict[float, np.ndarray]:
    """{t: (B, H, W, 3) uint8}: the clean-image prediction from each record's target noised to t."""
    batch = sampler.model_batch(recs)
    h, w = np.shape(batch["target"])[1:3]
    predict = jax.jit(functools.partial(signal.complete_from_targets, sampler.model))
    out = {}
    with jax.set_mesh(sampler.mesh), sharding.activation_rules_context():
        for t in timesteps:
            tokens = predict(sampler.params, batch, jax.random.key(seed), jnp.asarray([t, 0.0], jnp.float32))
            out[t] = sampler.decode_uint8(tokens, h, w)
    return out


def linear_reference(targets: list[np.ndarray], timesteps, seed: int = 0) -> dict[float, float]:
    """{t: mean PSNR}: x0_hat = bg + a * (blur_s(x_t) - (1 - t) bg) / (1 - t) on the (H, W, 3) uint8
    targets noised to t in [-1, 1] pixels, bg each target's background colour, the best of a grid
    of blur widths s and gains a per t (0 and 0: the background alone)."""
    rng = np.random.default_rng(seed)
    clean = [tg.astype(np.float64) / 127.5 - 1.0 for tg in targets]
    backgrounds = [np.median(x0.reshape(-1, 3), axis=0) for x0 in clean]
    out = {}
    for t in timesteps:
        if t >= 1.0:
            continue  # nothing of the target is left to filter
        noisy = [(1 - t) * x0 + t * rng.normal(size=x0.shape) for x0 in clean]
        best = -np.inf
        for width in (0, 1, 2, 3, 4, 6):
            blurred = [ndimage.gaussian_filter(x, (width, width, 0)) if width else x for x in noisy]
            for gain in (0.0, 0.25, 0.5, 0.75, 1.0):
                psnrs = []
                for x0, bg, b in zip(clean, backgrounds, blurred):
                    est = np.clip(bg + gain * (b - (1 - t) * bg) / (1 - t), -1, 1)
                    psnrs.append(min(10 * np.log10(4.0 / max(np.mean((est - x0) ** 2), 1e-12)), signal.PSNR_CAP))
                best = max(best, float(np.mean(psnrs)))
        out[t] = best
    return out


def psnr_to_targets(images: np.ndarray, targets: list[np.ndarray]) -> float:
    """Mean PSNR (dB, capped at 60) of `images` to `targets` (decoded (H, W, 3) uint8)."""
    psnrs = [min(score.psnr(signal.at_target_size(im, tg), tg), signal.PSNR_CAP) for im, tg in zip(images, targets)]
    return float(np.mean(psnrs))


def background(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image -> the same size filled with its per-channel median colour (its
    background, for a Kontext-Shapes picture)."""
    colour = np.median(image.reshape(-1, 3), axis=0)
    return np.broadcast_to(colour, image.shape).astype(np.uint8)


def plain_records(recs: list[dict]) -> list[dict]:
    """The records with target and source replaced by their target's background alone."""
    out = []
    for r in recs:
        plain = records_lib.encode_png(background(records_lib.decode_image(r["target"])))
        out.append(dict(r, target=plain, source=plain) if r.get("source") else dict(r, target=plain))
    return out


def block_spread(images: np.ndarray, block: int) -> float:
    """(B, H, W, 3) uint8 -> the mean over images of the standard deviation (over blocks and
    channels) of the means of their block x block pixel blocks, in 0-255 levels."""
    b, h, w, c = images.shape
    means = images.astype(np.float64).reshape(b, h // block, block, w // block, block, c).mean(axis=(2, 4))
    return float(means.std(axis=(1, 2)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_split_arguments(parser)
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=4, help="noises per record (at least 2)")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--steps", default="1,2,4,20", help="sampler step counts for the PSNR to the targets")
    parser.add_argument("--plain", action="store_true", help="targets and sources: their background colour alone")
    parser.add_argument("--grid", default="", help="write the predictions from the noised targets here (PNG)")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2")
    if args.plain and args.grid:
        parser.error("--grid draws the predictions from the records' own targets; it does not go with --plain")
    try:
        steps = [int(n) for n in args.steps.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--steps {args.steps!r}: expected comma-separated step counts, e.g. 1,2,4,20")
    if not steps or min(steps) < 1:
        parser.error(f"--steps {args.steps!r}: step counts must be >= 1")

    sampler = Sampler.from_checkpoint(args.checkpoint, step=args.step)
    recs = split_records(sampler, args, args.records)
    if len(recs) < 2:
        raise SystemExit(f"need at least 2 {args.task} records in the {args.split} split, found {len(recs)}")
    if args.plain:
        recs = plain_records(recs)
    out = noise_dependence(sampler, recs, args.seeds, args.guidance)
    print(
        f"{args.checkpoint} step {sampler.step}: {args.task} / {args.split}"
        f"{' (plain pictures of their backgrounds)' if args.plain else ''}, {len(recs)} records x {args.seeds} noises"
    )
    print(
        f"t = 1 prediction: variance across noises {out['across_noise']:.4f}, across records "
        f"{out['across_records']:.4f}, share from the noise {out['noise_share']:.2f}"
    )
    targets = [records_lib.decode_image(r["target"]) for r in recs]
    if not args.plain:
        alone = psnr_to_targets(np.stack([background(tg) for tg in targets]), targets)
        print(f"a picture of the target's background alone, PSNR to the target: {alone:.2f} dB")
        predictions = predictions_from_targets(sampler, recs, PREDICTION_TIMESTEPS)
        print(
            "predictions from the target noised to t, PSNR to the target: "
            + ", ".join(f"t = {t:g} {psnr_to_targets(images, targets):.2f} dB" for t, images in predictions.items())
        )
        if sampler.kcfg.blur.enabled:
            print("(no linear-filter reference: it models the unblurred process, and model.blur is on)")
        else:
            reference = linear_reference(targets, PREDICTION_TIMESTEPS)
            print(
                "a linear filter of the same, told the background colour: "
                + ", ".join(f"t = {t:g} {v:.2f} dB" for t, v in reference.items())
            )
        if args.grid:
            rows = [np.stack(targets)]
            rows += [
                np.stack([signal.at_target_size(im, tg) for im, tg in zip(images, targets)])
                for images in predictions.values()
            ]
            save_grid(np.concatenate(rows), args.grid, columns=len(targets))
            ts = ", ".join(f"{t:g}" for t in predictions)
            print(f"wrote {args.grid}: the targets, then the predictions at t = {ts}")
    samples = {n: sampler.generate(recs, steps=n, guidance=args.guidance, seed=0) for n in steps}
    psnr = {n: psnr_to_targets(images, targets) for n, images in samples.items()}
    print("samples from noise, PSNR to the target: " + ", ".join(f"{n} steps {v:.2f} dB" for n, v in psnr.items()))
    if args.plain:
        block = sampler.model.config.downsample
        spread = {n: block_spread(images, block) for n, images in samples.items()}
        print(
            f"samples from noise, spread of their {block}x{block}-pixel block means: "
            + ", ".join(f"{n} steps {v:.1f}" for n, v in spread.items())
        )


if __name__ == "__main__":
    main()
