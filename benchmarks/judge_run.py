"""Sample a run's checkpoint on every record of a split and score the samples with the judge.

    PYTHONPATH=. python benchmarks/judge_run.py --checkpoint RUN [--step N] [--split validation]
        [--task t2i] [--limit N] [--steps 20] [--guidance G] [--seed 0] [--data_dir DIR] [--from_t0 T]

The learning signal judges a few validation prompts at the end of a run; this judges a whole split
(one sample per record, the run's sampler and guidance unless given, EMA weights), so that two
recipes can be told apart beyond the noise of 8 or 32 samples (one sample of 64 is 0.016). Prints
the score and the share of samples passing each check of `qk_jax.eval.score`.

With `--from_t0 T` the samples start instead from each record's own target noised to T (the learning
signal's completions, over the whole split: Euler, no guidance). The noisy target fixes the layout
the prompt leaves open, so this scores what the generator draws once where its objects go is given,
a ceiling for the samples from noise at the same weights.

It also scores every sample against the next record's prompt (its neighbour in the split, which
asks for other objects): what the judge passes by chance on images that do not follow their prompt
(scattered blocks of colour fit some shape now and then). The gap between the two scores is what
the samples owe to their own prompt.
"""

from __future__ import annotations

import argparse
import collections
import functools

import jax
import numpy as np

from qk_jax import sharding
from qk_jax.data import builders
from qk_jax.data import records as records_lib
from qk_jax.eval import score, signal
from qk_jax.sample import Sampler

BATCH = 32


def completions(sampler: Sampler, recs: list[dict], t0: float, steps: int, seed: int) -> list[np.ndarray]:
    """(H, W, 3) uint8 pictures: each record's target noised to `t0` and finished by `steps` Euler
    steps without guidance, at the target's size (`signal.completed_pictures`)."""
    complete = jax.jit(functools.partial(signal.complete_from_targets, sampler.model))
    images = []
    for i in range(0, len(recs), BATCH):
        chunk = recs[i : i + BATCH]
        batch = sampler.model_batch(chunk)
        with jax.set_mesh(sampler.mesh), sharding.activation_rules_context():
            images.extend(signal.completed_pictures(sampler, complete, batch, chunk, t0, steps, seed + i))
    return images


def judge_split(
    sampler: Sampler, recs: list[dict], steps: int, guidance: float | None, seed: int, from_t0: float | None = None
) -> dict:
    """{"score", "n", "checks": {check: share passing}, "other_prompt": score against the next
    record's prompt, None for edits} of one sample per record (records of one input count, as a
    split of one task holds); from noise, or with `from_t0` from the records' targets noised to it
    (`completions`)."""
    if from_t0 is not None:
        images = completions(sampler, recs, from_t0, steps, seed)
    else:
        images = []
        for i in range(0, len(recs), BATCH):
            images.extend(sampler.generate(recs[i : i + BATCH], steps=steps, guidance=guidance, seed=seed + i))
    results = [score.score_sample(r, im) for r, im in zip(recs, images)]
    checks = collections.defaultdict(list)
    for r in results:
        for name, passed in r["checks"].items():
            checks[name].append(float(passed))
    return {
        "score": float(np.mean([r["score"] for r in results])),
        "n": len(results),
        "checks": {name: float(np.mean(v)) for name, v in checks.items()},
        "other_prompt": score.chance_level(recs, images),
    }


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """The run and the records a split-wide measurement reads: --checkpoint, --step, --data_dir,
    --split, --task (see `split_records`)."""
    parser.add_argument("--checkpoint", required=True, help="a run workdir or checkpoint folder")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--data_dir", default=None, help="default: the run's data.data_dir")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--task", default="t2i")


def split_records(sampler: Sampler, args: argparse.Namespace, limit: int | None) -> list[dict]:
    """The first `limit` (None: all) records of `args.task` in `args.split` of the run's data (or
    `args.data_dir`), normalised; exits when there are none or they mix input-image counts (one
    sampler call takes one group)."""
    source = builders.load_source(
        args.data_dir or sampler.config.data.data_dir, sampler.config.data.dataset, args.task, args.split
    )
    count = len(source) if limit is None else min(limit, len(source))
    recs = [records_lib.normalize(source[i]) for i in range(count)]
    if not recs:
        raise SystemExit(f"no {args.task} records in the {args.split} split")
    if len({records_lib.num_inputs(r) for r in recs}) > 1:
        raise SystemExit(f"the {args.task} records of {args.split} mix input-image counts; pick one task")
    return recs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="at most this many records")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=None, help="default: the run's sample.guidance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--from_t0", type=float, default=None, help="start from the targets noised to this t (no guidance)"
    )
    args = parser.parse_args()
    if args.from_t0 is not None and not 0.0 < args.from_t0 <= 1.0:
        parser.error(f"--from_t0 must lie in (0, 1], got {args.from_t0}")

    sampler = Sampler.from_checkpoint(args.checkpoint, step=args.step)
    recs = split_records(sampler, args, args.limit)
    out = judge_split(sampler, recs, args.steps, args.guidance, args.seed, args.from_t0)
    checks = ", ".join(f"{k} {v:.3f}" for k, v in out["checks"].items())
    start = "noise" if args.from_t0 is None else f"the targets noised to t = {args.from_t0:g}"
    print(
        f"{args.checkpoint} step {sampler.step}: {args.task} / {args.split}, {out['n']} samples, "
        f"{args.steps} steps from {start}"
    )
    if out["other_prompt"] is not None:
        print(f"against the next record's prompt (chance): judge {out['other_prompt']:.3f}")
    print(f"judge {out['score']:.3f}; checks passed: {checks}")


if __name__ == "__main__":
    main()
