"""How much a run's prediction from pure noise depends on the noise rather than on the prompt.

    PYTHONPATH=. python benchmarks/noise_dependence.py --checkpoint RUN [--step N] [--split validation]
        [--task t2i] [--records 32] [--seeds 4] [--guidance 1] [--data_dir DIR] [--steps 1,2,4,20]

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
prediction.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.judge_run import add_split_arguments, split_records
from qk_jax.data import records as records_lib
from qk_jax.eval import score, signal
from qk_jax.sample import Sampler


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


def psnr_by_steps(sampler: Sampler, recs: list[dict], steps: list[int], guidance: float) -> dict[int, float]:
    """{sampler steps: mean PSNR (dB, capped at 60) of the samples of `recs` to their targets} (seed 0)."""
    targets = [records_lib.decode_image(r["target"]) for r in recs]
    out = {}
    for n in steps:
        images = sampler.generate(recs, steps=n, guidance=guidance, seed=0)
        psnrs = [min(score.psnr(signal.at_target_size(im, tg), tg), signal.PSNR_CAP) for im, tg in zip(images, targets)]
        out[n] = float(np.mean(psnrs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_split_arguments(parser)
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=4, help="noises per record (at least 2)")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--steps", default="1,2,4,20", help="sampler step counts for the PSNR to the targets")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2")
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
    out = noise_dependence(sampler, recs, args.seeds, args.guidance)
    print(
        f"{args.checkpoint} step {sampler.step}: {args.task} / {args.split}, {len(recs)} records x {args.seeds} noises"
    )
    print(
        f"t = 1 prediction: variance across noises {out['across_noise']:.4f}, across records "
        f"{out['across_records']:.4f}, share from the noise {out['noise_share']:.2f}"
    )
    psnr = psnr_by_steps(sampler, recs, steps, args.guidance)
    print("samples from noise, PSNR to the target: " + ", ".join(f"{n} steps {v:.2f} dB" for n, v in psnr.items()))


if __name__ == "__main__":
    main()
