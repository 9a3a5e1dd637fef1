"""Can the train -> sample path reproduce images it has memorised, and does it read unseen prompts?

    PYTHONPATH=. python benchmarks/memorisation.py --workdir DIR [--steps 600] [--records 8]
        [--heldout 32] [--config configs/stage2.py:demo] [--override model.timesteps.method=uniform ...]

Builds a Kontext-Shapes set of `--records` text-to-image and reconstruction records (the stage's
image size, plain backgrounds) under DIR/data, and `--heldout` validation records per task (the
builder's validation split: other random draws of the same distribution), trains the stage from
scratch on the training records for `--steps` steps (DIR/run; a finished run is reused), then, on
the first `--eval-records` (32) training text-to-image records:

- the clean-latent error of one prediction from the image noised to t, with the record's own
  condition, with none (masked out) and with another record's (the batch rolled by one),
  against the latents' variance: a memorising model predicts its image from its prompt alone at
  t = 1, where sampling starts;
- the PSNR of samples drawn from pure noise (Euler, 20 and 50 steps, guidance 1 and 4) against
  the record's own target. A healthy recipe reproduces memorised images; one whose prediction
  is poor where sampling starts does not, however low its training loss;
- the judge (`qk_jax.eval.score`) on the 20-step, guidance-1 samples;
- along a sampled trajectory (20 steps, guidance 1), the error of the prediction the sampler
  steps with against the one from the point a perfect sampler would be at: whether the later
  steps correct the first ones.

and on the held-out text-to-image records (less any whose prompt is a training prompt) the same
prediction errors (content gain: 1 - own / none) and the judge on samples from pure noise (20
steps, guidance 1): where memorising a prompt -> image table turns into reading the prompt.
Ends with a one-row markdown summary and what the judge saw (shapes detected per sample against
those asked, the share holding every asked shape and colour). Writes DIR/grid_g<guidance>.png
(prompt | sample | target, training records) and DIR/grid_heldout.png. Numbers: BENCHMARKS.md,
"Memorised images".
"""

from __future__ import annotations

import argparse
import ast
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.config import load_config
from qk_jax.data import builders
from qk_jax.data import records as records_lib

TIMESTEPS = (0.3, 0.6, 0.8, 0.9, 0.95, 1.0)


def build_data(data_dir: str, records: int, heldout: int, side: int) -> None:
    """`records` train and `heldout` validation records per task (validation: other random draws)."""
    builders.build_shapes(
        data_dir, tasks=("t2i", "reconstruction"), num=records, num_eval=heldout, height=side, plain_background=1.0
    )


def train_run(config_arg: str, data_dir: str, run_dir: str, steps: int, overrides: list[str]) -> None:
    from qk_jax.train import train

    fields = [o for o in overrides if not o.startswith("model.generator.overrides.")]
    config = load_config(
        config_arg,
        [
            f"data.data_dir={data_dir}",
            f"train.steps={steps}",
            f"train.log_every={max(1, steps // 10)}",
            f"train.checkpoint_every={steps}",
            f"train.warmup_steps={max(1, min(20, steps // 10))}",
            "train.sample_images=0",
            "train.signal.samples=0",
            *fields,
        ],
    )
    with config.unlocked():  # generator overrides are a free-form dict: set them one by one
        for o in overrides:
            if o.startswith("model.generator.overrides."):
                key, value = o[len("model.generator.overrides.") :].split("=", 1)
                config.model.generator.overrides[key] = ast.literal_eval(value)
    train(config, run_dir)


def prediction_errors(sampler, batch) -> list[tuple[float, float, float, float]]:
    """(t, error own, error none, error other) of one clean-latent prediction per timestep."""
    model, params = sampler.model, sampler.params
    cond, mask, _ = sampler._condition(params, batch)
    x0 = model.encode(params, batch["target"])
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    hw = batch["target"].shape[1:3]
    rows = []
    for t in TIMESTEPS:
        tt = jnp.full((x0.shape[0],), t)
        xt = model.noised(params, x0, noise, tt, *hw)
        errs = []
        for c, m in ((cond, mask), (cond, jnp.zeros_like(mask)), (jnp.roll(cond, 1, 0), jnp.roll(mask, 1, 0))):
            v = model.velocity(params, xt, None, batch["img_ids"], c, m, tt)
            errs.append(float(jnp.mean(jnp.square(xt - t * v - x0))))
        rows.append((t, *errs))
    return rows


def trajectory_errors(sampler, batch, steps: int) -> list[tuple[int, float, float, float]]:
    """(step, t, error along the sampled trajectory, error from the ideal x_t) per Euler step.

    Samples from pure noise with the record's own condition (guidance 1) and, at every step,
    compares the clean-latent prediction the sampler acts on with the one from the point a
    perfect sampler would have reached with the same noise, (1 - t) x0 + t noise (with `model.blur`,
    (1 - t) B_t x0 + t noise, stepped by DDIM): where the first
    stays at its value from t = 1 while the second falls, the later steps do not correct what
    the first ones committed to."""
    from qk_jax import flow_solvers

    model, params = sampler.model, sampler.params
    cond, mask, _ = sampler._condition(params, batch)
    x0 = model.encode(params, batch["target"])
    sigmas, timesteps = flow_solvers.flow_schedule(
        steps, sampler.schedule(), sigmas=flow_solvers.pipeline_sigmas(steps), image_seq_len=x0.shape[1]
    )
    velocity = jax.jit(lambda x, t: model.velocity(params, x, None, batch["img_ids"], cond, mask, t))
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    hw = batch["target"].shape[1:3]
    degrade = model.degrader(params, *hw)
    x, rows = noise, []
    for i, t in enumerate(np.asarray(timesteps, np.float64)):
        tt = jnp.full((x0.shape[0],), t, jnp.float32)
        v = velocity(x, tt)
        ideal = model.noised(params, x0, noise, tt, *hw)
        ideal_error = float(jnp.mean(jnp.square(ideal - t * velocity(ideal, tt) - x0)))
        rows.append((i, float(t), float(jnp.mean(jnp.square(x - t * v - x0))), ideal_error))
        s = float(sigmas[i + 1])
        if degrade is None:
            x = x + (s - t) * v
        else:
            x = flow_solvers.blurred_step(x, v, t, s, degrade, model.config.min_t)
    return rows


def generate(sampler, recs: list[dict], steps: int, guidance: float) -> list[np.ndarray]:
    """Samples from pure noise for `recs` in their order (`Sampler.generate` takes one input count at a time)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(recs):
        groups.setdefault(records_lib.num_inputs(r), []).append(i)
    images: list = [None] * len(recs)
    for idx in groups.values():
        for i, image in zip(idx, sampler.generate([recs[i] for i in idx], steps=steps, seed=0, guidance=guidance)):
            images[i] = image
    return images


def judge(recs: list[dict], images: list[np.ndarray]) -> dict:
    """The judge's pass rate, and what it saw on the way: shapes detected per sample against the
    objects the prompts ask for, and the share of samples holding every asked shape in its
    asked colour wherever it is (the judge's `present` check): whether the model draws shapes
    at all, then the right ones, then in the right places and sizes."""
    from qk_jax.eval import score

    results = [score.score_sample(r, im) for r, im in zip(recs, images)]
    asked = [len(json.loads(r["scene"])["spec"]["objects"]) for r in recs]
    return {
        "scores": [x["score"] for x in results],
        "judge": float(np.mean([x["score"] for x in results])),
        "drawn": float(np.mean([len(x["detections"]) for x in results])),
        "asked": float(np.mean(asked)),
        "present": float(np.mean([x["checks"]["present"] for x in results])),
    }


def print_errors(title: str, rows, x0_var: float) -> dict[float, float]:
    """Prints the error table; returns {t: own / none}."""
    print(f"{title}: clean-latent error of one prediction (latents' variance {x0_var:.4f})")
    print("| t | own condition | none | another record's | content gain 1 - own/none |\n|---|---|---|---|---|")
    for t, own, none, other in rows:
        print(f"| {t} | {own:.4f} | {none:.4f} | {other:.4f} | {1 - own / none:+.1%} |")
    return {t: own / none for t, own, none, _ in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="configs/stage2.py:demo")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--records", type=int, default=8)
    parser.add_argument("--heldout", type=int, default=32, help="validation t2i records to measure unseen prompts on")
    parser.add_argument("--eval-records", type=int, default=32, help="training t2i records measured (the first ones)")
    parser.add_argument("--override", action="append", default=[], help="a config override FIELD=VALUE")
    parser.add_argument(
        "--weights", choices=("ema", "raw"), default="ema", help="measure the EMA weights or the optimiser's own"
    )
    args = parser.parse_args()
    for name in ("steps", "records", "heldout", "eval_records"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    from qk_jax.demo import write_grid
    from qk_jax.eval import score
    from qk_jax.sample import Sampler

    data_dir, run_dir = os.path.join(args.workdir, "data"), os.path.join(args.workdir, "run")
    side = int(round(load_config(args.config).data.area ** 0.5))  # the stage's target size
    build_data(data_dir, args.records, args.heldout, side)
    if not os.path.isdir(os.path.join(run_dir, "checkpoints", str(args.steps))):
        train_run(args.config, data_dir, run_dir, args.steps, args.override)
    sampler = Sampler.from_checkpoint(run_dir, use_ema=args.weights == "ema")
    tag = "" if args.weights == "ema" else "_raw"

    def load(split: str) -> list[dict]:
        source = builders.load_source(data_dir, builders.SHAPES_NAME, "t2i", split)
        return [records_lib.normalize(source[i]) for i in range(len(source))]

    train_all = load("train")
    recs = train_all[: args.eval_records]
    seen = {r["prompt"] for r in train_all}
    validation = load("validation")
    heldout = [r for r in validation if r["prompt"] not in seen]  # the same prompt drawn again is not unseen
    if not heldout:
        raise SystemExit(f"all {len(validation)} validation prompts are training prompts: raise --heldout")
    targets = [records_lib.decode_image(r["target"]) for r in recs]
    batch, heldout_batch = sampler.model_batch(recs), sampler.model_batch(heldout)
    with jax.set_mesh(sampler.mesh):
        x0_var = float(jnp.var(sampler.model.encode(sampler.params, batch["target"])))
        rows = prediction_errors(sampler, batch)
        heldout_rows = prediction_errors(sampler, heldout_batch)
    print(f"{args.records} training records per task, {args.steps} steps, {args.weights} weights")
    train_ratio = print_errors(f"the first {len(recs)} training t2i records", rows, x0_var)
    print(f"\n{len(heldout)} validation t2i records ({len(validation) - len(heldout)} left out: a training prompt)")
    heldout_ratio = print_errors("held out", heldout_rows, x0_var)
    with jax.set_mesh(sampler.mesh):
        trajectory = trajectory_errors(sampler, batch, 20)
    print("\nalong a sampled trajectory (20 Euler steps, own condition, guidance 1): clean-latent error of")
    print("the prediction the sampler steps with, and of the one from the ideal point (1 - t) x0 + t noise")
    print("| step | t | sampled | ideal |\n|---|---|---|---|")
    for i, t, sampled, ideal in trajectory:
        if i % 3 == 0 or i == len(trajectory) - 1:
            print(f"| {i} | {t:.3f} | {sampled:.4f} | {ideal:.4f} |")
    print("\nsamples from pure noise, PSNR to the record's own target (mean / min, dB)")
    print("| guidance | 20 steps | 50 steps |\n|---|---|---|")
    for guidance in (1.0, 4.0):
        cells = []
        for steps in (20, 50):
            images = generate(sampler, recs, steps, guidance)
            psnrs = [score.psnr(a, b) for a, b in zip(images, targets)]
            cells.append(f"{np.mean(psnrs):.1f} / {np.min(psnrs):.1f}")
            if steps == 20:
                rows_out = [("t2i", r, im, p) for r, im, p in zip(recs, images, psnrs)]
                write_grid(rows_out[:12], os.path.join(args.workdir, f"grid{tag}_g{guidance:g}.png"))
                if guidance == 1.0:
                    train_psnr, train_judge = np.mean(psnrs), judge(recs, images)
        print(f"| {guidance:g} | {cells[0]} | {cells[1]} |")
    heldout_images = generate(sampler, heldout, 20, 1.0)
    heldout_judge = judge(heldout, heldout_images)
    rows_out = [("t2i", r, im, s) for r, im, s in zip(heldout, heldout_images, heldout_judge["scores"])]
    write_grid(rows_out[:12], os.path.join(args.workdir, f"grid{tag}_heldout.png"))

    print("\nsummary (20 Euler steps, CFG 1; judge: fraction of samples passing `qk_jax.eval.score`)")
    print(
        "| records | steps | train PSNR | train own/none t = 1.0 | t = 0.8 | train judge "
        "| held-out own/none t = 1.0 | t = 0.8 | held-out judge |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.records} | {args.steps} | {train_psnr:.1f} dB | {train_ratio[1.0]:.3f} | {train_ratio[0.8]:.3f} "
        f"| {train_judge['judge']:.2f} ({len(recs)}) | {heldout_ratio[1.0]:.3f} | {heldout_ratio[0.8]:.3f} "
        f"| {heldout_judge['judge']:.2f} ({len(heldout)}) |"
    )
    print("\nwhat the judge saw: shapes detected per sample / objects asked, share with every asked shape and colour")
    print("| samples | shapes drawn / asked | asked shapes present | judge |\n|---|---|---|---|")
    for name, j in (("training prompts", train_judge), ("held-out prompts", heldout_judge)):
        print(f"| {name} | {j['drawn']:.2f} / {j['asked']:.2f} | {j['present']:.2f} | {j['judge']:.2f} |")


if __name__ == "__main__":
    main()
