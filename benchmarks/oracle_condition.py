"""The demo's DiT conditioned on what the prompt says exactly: is the generator or the condition the limit?

    PYTHONPATH=. python benchmarks/oracle_condition.py --data_dir DATA --out DIR [--steps 1400]
        [--config configs/stage2.py:demo] [--override FIELD=VALUE ...] [--samples 64] [--guidance 1,4]
        [--judge_train] [--condition prompt|scene] [--one_step_at 1,0.8,0.6,0.4,0.2]
        [--eval_at 1400,5600] [--max_seconds S]

The demo's text-to-image samples do not follow their prompts (BENCHMARKS.md, "Learning"), and the
prompt reaches the DiT through a VLM trained from scratch, K kontext queries and a connector. This
script takes that path out: it trains the stage config's DiT (the same architecture, autoencoder,
flow, loss and its weighting, optimiser, EMA, batch and condition dropout as the stage; the loss is
`QueryKontext.denoising_loss` itself) on the text-to-image training records with condition tokens
read off each record's scene graph instead, a learned embedding per fact the prompt states, one
token per object (shape, colour, size and grid cell, each or "any", + its slot) and one per
relation (the relation + the slots of its two objects), then samples the validation prompts from
noise (Euler on the sampler's schedule, classifier-free guidance) and scores them with the judge,
against their own prompts and against the next record's (chance), as `benchmarks/judge_run.py` does.
`--judge_train` also samples and judges as many training prompts (under "train_prompts" in
`results.json`, `train_samples_guidance_G.png`): whether the DiT fits what it trained on at all, or
draws it and fails only on compositions it has not seen. `--condition scene` tells the DiT the drawn
scene instead (`scene_rows`, `SceneTokens`: every object's shape, colour, exact centre and radius, and
the background): nothing is left to guess, so what it still cannot draw it cannot draw, whatever the
prompt says (`benchmarks/renderer_bound.py` learns the same scene -> picture map without the flow).
Every sample is also compared with its drawn target (PSNR: the fidelity under `--condition scene`,
which fixes the picture), and `--one_step_at` judges the clean picture the DiT predicts in one step
from each validation picture noised to t (`one_step` in `results.json`, `one_step_tT.png`): at which
noise level the outline is drawn, and at t = 1 the renderer's question asked of the flow model.
`--eval_at` judges all of it at several steps of one run (`curve`: the learning curve against the
samples seen), and `--max_seconds` ends a run at a budget of training seconds, judged where it
stopped.

This condition says exactly what the prompt says and nothing else, in a form no encoder has to
learn; if the DiT does not bind it within a budget, no VLM path will at that budget. It is a
diagnostic, not a recipe: the demo's DiT reads the prompt only through the VLM, as the paper does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.conv_reference import picture_stats, to_uint8
from qk_jax import flow_solvers, guidance, optim, sharding
from qk_jax.config import load_config
from qk_jax.data import builders, vocab
from qk_jax.data import records as records_lib
from qk_jax.data.model_inputs import image_ids
from qk_jax.eval import score
from qk_jax.model_config import build_kontext_config
from qk_jax.models.kontext import QueryKontext
from qk_jax.models.vae.kl import AutoencoderKLConfig
from qk_jax.sample import save_grid, training_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_OBJECTS = 4  # Kontext-Shapes text-to-image prompts name one to four objects
RELATION_NAMES = tuple(vocab.RELATIONS)
# Each fact's vocabulary; index 0 of shape, colour, size and cell is "not stated".
FACTS = {
    "shape": ("any",) + vocab.SHAPES,
    "colour": ("any",) + vocab.COLOUR_NAMES,
    "size": ("any",) + vocab.SIZE_NAMES,
    "cell": ("any",) + vocab.CELL_NAMES,
    "slot": tuple(range(MAX_OBJECTS)),
    "relation": RELATION_NAMES,
}


def spec_facts(record: dict) -> np.ndarray:
    """(MAX_OBJECTS + 1, 8) int32 fact indices of a t2i record's prompt (-1: none): per object row
    shape, colour, size, cell, slot; the last row the relation and its two slots (columns 5-7)."""
    spec = json.loads(record["scene"])["spec"]
    out = np.full((MAX_OBJECTS + 1, 8), -1, np.int32)
    if len(spec["objects"]) > MAX_OBJECTS or len(spec["relations"]) > 1:
        raise ValueError(f"record {record['id']}: more than {MAX_OBJECTS} objects or one relation")
    for j, o in enumerate(spec["objects"]):
        out[j, 0] = FACTS["shape"].index(o["shape"] or "any")
        out[j, 1] = FACTS["colour"].index(o["colour"] or "any")
        out[j, 2] = FACTS["size"].index(o["size"] or "any")
        out[j, 3] = FACTS["cell"].index(o["cell"] or "any")
        out[j, 4] = j
    for a, rel, b in spec["relations"]:
        out[MAX_OBJECTS, 5:8] = (RELATION_NAMES.index(rel), a, b)
    return out


class FactTokens(nn.Module):
    """(B, MAX_OBJECTS + 1, 8) fact indices -> condition tokens (B, MAX_OBJECTS + 1, width) and
    their mask (a row with no fact is masked out): each token the sum of its facts' embeddings."""

    width: int

    @nn.compact
    def __call__(self, facts: jax.Array) -> tuple[jax.Array, jax.Array]:
        def embed(name, column, rows):
            table = nn.Embed(len(FACTS[name]), self.width, name=f"{name}_{column}")
            return jnp.where(rows[..., None] >= 0, table(jnp.maximum(rows, 0)), 0.0)

        obj = sum(embed(name, c, facts[..., c]) for c, name in enumerate(("shape", "colour", "size", "cell", "slot")))
        rel = embed("relation", 5, facts[..., 5]) + embed("slot", 6, facts[..., 6]) + embed("slot", 7, facts[..., 7])
        is_rel = jnp.arange(facts.shape[1]) == MAX_OBJECTS
        tokens = jnp.where(is_rel[None, :, None], rel, obj)
        mask = jnp.where(is_rel[None], facts[..., 5] >= 0, facts[..., 0] >= 0)
        return tokens, mask


def scene_rows(record: dict) -> np.ndarray:
    """(MAX_OBJECTS + 1, 6) float32 of a t2i record's drawn scene, everything `render` needs: per
    object row (present, shape index, colour index, cx, cy, r), the last row the plain background
    (1, tone in [-1, 1], tint r, g, b / 10, 0). Only what the demo's data draws is accepted (plain
    backgrounds, unrotated untextured objects, not inverted); anything else is refused by name."""
    graph = json.loads(record["scene"])["target"]
    bg, objects = graph["background"], graph["objects"]
    if bg["kind"] != "plain" or graph.get("inverted") or len(objects) > MAX_OBJECTS:
        raise ValueError(
            f"record {record['id']}: scene tokens cover plain, non-inverted scenes of at most {MAX_OBJECTS} "
            f"objects (background {bg['kind']!r}, inverted {graph.get('inverted')}, {len(objects)} objects)"
        )
    out = np.zeros((MAX_OBJECTS + 1, 6), np.float32)
    for j, o in enumerate(objects):
        if o.get("rotation") or o.get("pattern"):
            raise ValueError(f"record {record['id']}: object {j} is rotated or textured; scene tokens cover neither")
        out[j] = (1.0, vocab.SHAPES.index(o["shape"]), vocab.COLOUR_NAMES.index(o["colour"]), o["cx"], o["cy"], o["r"])
    tint = np.asarray(bg.get("tint", (0, 0, 0)), np.float32) / 10.0
    out[MAX_OBJECTS] = (1.0, bg["tones"][0] / 127.5 - 1.0, *tint, 0.0)
    return out


class SceneTokens(nn.Module):
    """(B, MAX_OBJECTS + 1, 6) `scene_rows` -> condition tokens (B, MAX_OBJECTS + 1, width) and mask:
    an object token is its shape's and colour's embeddings plus a projection of Fourier features
    of its centre and radius; the background token a projection of its tone and tint."""

    width: int
    frequencies: int = 6

    @nn.compact
    def __call__(self, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
        present = rows[..., 0] > 0
        geometry = rows[..., 3:6]  # cx, cy, r in [0, 1]
        angles = geometry[..., None] * (jnp.pi * 2.0 ** jnp.arange(self.frequencies))
        fourier = jnp.concatenate(
            [
                geometry,
                jnp.sin(angles).reshape(*geometry.shape[:-1], -1),
                jnp.cos(angles).reshape(*geometry.shape[:-1], -1),
            ],
            axis=-1,
        )
        obj = (
            nn.Embed(len(vocab.SHAPES), self.width, name="shape")(rows[..., 1].astype(jnp.int32))
            + nn.Embed(len(vocab.COLOUR_NAMES), self.width, name="colour")(rows[..., 2].astype(jnp.int32))
            + nn.Dense(self.width, name="geometry")(fourier)
        )
        background = nn.Dense(self.width, name="background")(rows[..., 1:6])
        is_bg = jnp.arange(rows.shape[1]) == MAX_OBJECTS
        tokens = jnp.where(is_bg[None, :, None], background, obj)
        return jnp.where(present[..., None], tokens, 0.0), present


# What the DiT is told: the prompt's facts (what a VLM could read) or the drawn scene (everything).
CONDITIONS = {"prompt": (spec_facts, FactTokens), "scene": (scene_rows, SceneTokens)}


def load_split(
    data_dir: str, split: str, limit: int | None = None, condition: str = "prompt"
) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(records, targets (N, H, W, 3) float32 in [-1, 1], condition rows (N, MAX_OBJECTS + 1, F):
    `spec_facts` for `condition="prompt"`, `scene_rows` for "scene")."""
    source = builders.load_source(data_dir, builders.SHAPES_NAME, "t2i", split)
    n = len(source) if limit is None else min(limit, len(source))
    recs = [records_lib.normalize(source[i]) for i in range(n)]
    targets = np.stack([records_lib.decode_image(r["target"]) for r in recs]).astype(np.float32) / 127.5 - 1.0
    rows_of = CONDITIONS[condition][0]
    return recs, targets, np.stack([rows_of(r) for r in recs])


class TrainedAutoencoder(NamedTuple):
    """An autoencoder whose latents the DiT models instead of the stage config's (kept frozen), and
    the DiT's patch of latent cells per token."""

    config: AutoencoderKLConfig
    params: dict
    patch_size: int


def train_step(loss_fn, opt, ema_decay: float):
    """jit(step(params, opt_state, ema, i, *batch) -> (params, opt_state, ema, loss)): one step of
    `opt` on loss_fn(params, *batch), then the EMA at step i (the stage's warm-up of the decay)."""

    @jax.jit
    def step(p, s, e, i, *batch):
        loss, g = jax.value_and_grad(loss_fn)(p, *batch)
        upd, s = opt.update(g, s, p)
        p = jax.tree.map(lambda a, u: a + u, p, upd)
        return p, s, optim.ema_update(e, p, optim.ema_decay_at(i, ema_decay)), loss

    return step


def run(args, vae: TrainedAutoencoder | None = None) -> dict:
    """Train, sample and judge (see the module docstring), on `vae`'s latents when given: the DiT's
    patch is then `vae.patch_size` and its input and output channels follow the latent's."""
    config = load_config(
        args.config, [f"train.steps={args.steps}", f"train.warmup_steps={args.warmup}"] + args.override
    )
    kcfg = build_kontext_config(config)
    frozen = {}
    if vae is not None:
        c, patch = vae.config.latent_channels, vae.patch_size
        generator = dataclasses.replace(kcfg.generator, patch_size=patch, in_channels=c * patch**2, out_channels=c)
        kcfg = dataclasses.replace(kcfg, vae=vae.config, generator=generator)
        frozen = {"vae": vae.params}
    model = QueryKontext(kcfg)
    recs, targets, facts = load_split(args.data_dir, "train", args.limit, args.condition)
    val_recs, val_targets, val_facts = load_split(args.data_dir, "validation", args.samples, args.condition)
    h, w = targets.shape[1:3]
    ids = jnp.asarray(image_ids(kcfg, np.zeros(1, np.int32), h, w, 0))  # t2i: the target's grid only

    fact_tokens = CONDITIONS[args.condition][1](kcfg.generator.joint_attention_dim)
    key = jax.random.key(args.seed)
    k_dit, k_emb = jax.random.split(key)
    params = {
        kcfg.generator_key: sharding.unbox_abstract(model.init(k_dit))[kcfg.generator_key],
        "facts": fact_tokens.init(k_emb, jnp.asarray(facts[:1]))["params"],
    }
    opt = optim.make_optimizer(config.train)
    opt_state = opt.init(params)
    ema = params
    uncond = kcfg.dropout.uncond + kcfg.dropout.no_text  # without input images both drop text and kontext

    def loss_fn(p, target, fact_rows, rng):
        k_drop, k_time, k_noise = jax.random.split(rng, 3)
        cond, mask = fact_tokens.apply({"params": p["facts"]}, fact_rows)
        dropped = jax.random.uniform(k_drop, (target.shape[0],)) < uncond
        mask = mask & ~dropped[:, None]
        batch = {"target": target, "img_ids": jnp.broadcast_to(ids, (target.shape[0],) + ids.shape[1:])}
        return model.denoising_loss({**p, **frozen}, batch, cond, mask, None, k_time, k_noise)[0]

    step = train_step(loss_fn, opt, config.train.ema_decay)

    n_tokens = ids.shape[1]
    sigmas, timesteps = flow_solvers.flow_schedule(
        args.sample_steps,
        training_schedule(kcfg.timesteps),
        sigmas=flow_solvers.pipeline_sigmas(args.sample_steps),
        image_seq_len=n_tokens,
    )

    @jax.jit
    def sample(p, fact_rows, noise, scale):
        cond, mask = fact_tokens.apply({"params": p["facts"]}, fact_rows)
        b = fact_rows.shape[0]
        img_ids = jnp.broadcast_to(ids, (b,) + ids.shape[1:])

        def velocity(x, t):
            tt = jnp.full((b,), t)
            v_c = model.velocity(p, x, None, img_ids, cond, mask, tt)
            v_u = model.velocity(p, x, None, img_ids, cond, jnp.zeros_like(mask), tt)
            return guidance.cfg(v_c, v_u, scale)

        tokens = flow_solvers.euler_sample(velocity, noise, sigmas, timesteps)
        return model.decode({**p, **frozen}, tokens, h, w)

    @jax.jit
    def predict_clean(p, target, fact_rows, noise, t):
        """The clean picture predicted in one step from `target` noised to t (the condition on)."""
        cond, mask = fact_tokens.apply({"params": p["facts"]}, fact_rows)
        b = target.shape[0]
        tt = jnp.full((b,), t)
        x_t = model.noised({**p, **frozen}, model.encode({**p, **frozen}, target), noise, tt, h, w)
        v = model.velocity(p, x_t, None, jnp.broadcast_to(ids, (b,) + ids.shape[1:]), cond, mask, tt)
        return model.decode({**p, **frozen}, x_t - tt[:, None, None] * v, h, w)

    def noise_for(i, n):
        return jax.random.normal(jax.random.key(args.seed + 1 + i), (n, n_tokens, kcfg.generator.in_channels))

    def sample_and_judge(p, recs, fact_rows, targets, scale, grid):
        pictures = pictures_of(
            lambda i, s: sample(p, jnp.asarray(fact_rows[s]), noise_for(i, len(fact_rows[s])), jnp.float32(scale)),
            len(recs),
        )
        return judged_with_psnr(recs, pictures, targets, os.path.join(args.out, grid))

    def one_step_judged(p, t):
        pictures = pictures_of(
            lambda i, s: predict_clean(
                p,
                jnp.asarray(val_targets[s]),
                jnp.asarray(val_facts[s]),
                noise_for(i, len(val_targets[s])),
                jnp.float32(t),
            ),
            len(val_recs),
        )
        return judged_with_psnr(val_recs, pictures, val_targets, os.path.join(args.out, f"one_step_t{t:g}.png"))

    def evaluate(p) -> dict:
        """Samples (each guidance scale), training prompts (--judge_train) and one-step predictions
        of the weights p, judged."""
        out = {"guidance": {}}
        n_train = len(val_recs)  # as many training prompts as validation ones, the first of the split
        for scale in args.guidance:
            out["guidance"][f"{scale:g}"] = sample_and_judge(
                p, val_recs, val_facts, val_targets, scale, f"samples_guidance_{scale:g}.png"
            )
            if args.judge_train:
                out.setdefault("train_prompts", {})[f"{scale:g}"] = sample_and_judge(
                    p,
                    recs[:n_train],
                    facts[:n_train],
                    targets[:n_train],
                    scale,
                    f"train_samples_guidance_{scale:g}.png",
                )
        out["one_step"] = {f"{t:g}": one_step_judged(p, t) for t in args.one_step_at}
        return out

    result = {
        "samples": len(val_recs),
        "condition": args.condition,
        "steps": args.steps,
        "batch_size": config.train.batch_size,
        "curve": [],
    }
    data_rng = np.random.default_rng(args.seed)

    def step_once(i):
        nonlocal params, opt_state, ema
        idx = data_rng.integers(0, len(targets), config.train.batch_size)
        params, opt_state, ema, loss = step(
            params, opt_state, ema, i, jnp.asarray(targets[idx]), jnp.asarray(facts[idx]), jax.random.fold_in(key, i)
        )
        return loss

    for n_steps, losses, train_seconds in train_judged(step_once, args.steps, args.eval_at, args.max_seconds):
        # the result's own evaluation is the last point's; results.json is rewritten at each point,
        # so a run cut short keeps its curve
        point = {
            "step": n_steps,
            "samples_seen": n_steps * config.train.batch_size,
            "loss": float(np.mean(losses[-200:])),
            "train_seconds": round(train_seconds, 1),
            **evaluate(ema),
        }
        result["curve"].append(point)
        result.update({k: point[k] for k in ("guidance", "train_prompts", "one_step") if k in point})
        result.update(steps_run=n_steps, final_loss=point["loss"], step_seconds=round(train_seconds / n_steps, 4))
        report_point(point)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def train_judged(step_once, steps: int, eval_at: set[int], max_seconds: float | None = None):
    """Runs step_once(i) -> loss for i = 0..steps - 1, printing the mean loss and the time a step
    takes every 100 steps, and yields (steps done, losses so far, seconds spent in the steps) to be
    judged after each step in eval_at, after the last, and once the steps' time reaches max_seconds
    (then stops)."""
    losses, train_seconds = [], 0.0
    for i in range(steps):
        t0 = time.time()
        losses.append(float(step_once(i)))
        train_seconds += time.time() - t0
        if (i + 1) % 100 == 0:
            print(f"step {i + 1:5d}  loss {np.mean(losses[-100:]):.4f}  {train_seconds / (i + 1):.3f} s/step")
        out_of_time = max_seconds is not None and train_seconds >= max_seconds
        if i + 1 in eval_at or i + 1 == steps or out_of_time:
            yield i + 1, losses, train_seconds
        if out_of_time:
            return


def pictures_of(make, n: int, batch: int = 32) -> list[np.ndarray]:
    """uint8 pictures of make(i, slice(i, i + batch)) -> (b, H, W, 3) in [-1, 1] over records 0..n."""
    pictures = []
    for i in range(0, n, batch):
        pictures.extend(to_uint8(np.asarray(make(i, slice(i, min(i + batch, n))))))
    return pictures


def judged_with_psnr(recs: list[dict], pictures: list[np.ndarray], targets: np.ndarray, grid_path: str) -> dict:
    """`judged` plus "psnr", the pictures' mean PSNR to targets (N, H, W, 3) in [-1, 1]; the pictures
    are also saved as a grid. Under the scene condition (or for a renderer) the targets are the one
    right answer, so this is the fidelity; under the prompt's facts a faithful sample may still differ
    from the drawn target (place, size)."""
    save_grid(np.stack(pictures), grid_path)
    out = judged(recs, pictures)
    out["psnr"] = float(np.mean([score.psnr(a, b) for a, b in zip(pictures, to_uint8(targets))]))
    return out


def judged(recs: list[dict], pictures: list[np.ndarray]) -> dict:
    """{"judge", "chance" (each picture against the next record's prompt), "checks", "pictures"} of
    one picture per record; "pictures": what the detector finds whatever the prompt (objects per
    picture, stray palette pixels, clean share: `conv_reference.picture_stats`)."""
    own = [score.score_sample(r, im) for r, im in zip(recs, pictures)]
    other = score.against_next_prompts(recs, pictures)
    checks = sorted({c for r in own for c in r["checks"]})
    return {
        "judge": float(np.mean([r["score"] for r in own])),
        "chance": float(np.mean([r["score"] for r in other])),
        # each check over the prompts that have it (counts only where a prompt states one)
        "checks": {c: float(np.mean([r["checks"][c] for r in own if c in r["checks"]])) for c in checks},
        "pictures": picture_stats(pictures),
    }


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True, help="folder for samples_guidance_G.png and results.json")
    p.add_argument(
        "--config",
        default=os.path.join(ROOT, "configs", "stage2.py") + ":demo",
        help="the stage config whose DiT and recipe train (default: the demo's stage 2)",
    )
    p.add_argument("--override", action="append", default=[], help="FIELD=VALUE of that config (repeatable)")
    p.add_argument("--steps", type=int, default=1400, help="training steps (the learning rate's cosine runs over them)")
    p.add_argument("--warmup", type=int, default=70)
    p.add_argument(
        "--eval_at",
        type=lambda v: {int(x) for x in v.split(",") if x},
        default=set(),
        help="steps at which the EMA weights are also sampled and judged, comma-separated (`curve` in "
        "results.json; the last step always is)",
    )
    p.add_argument(
        "--max_seconds",
        type=float,
        default=None,
        help="stop training once its steps have taken this long (evaluation not counted), judge, and "
        "report the step reached as `steps_run` (the schedule stays that of --steps)",
    )
    p.add_argument("--samples", type=int, default=64, help="validation prompts sampled and judged")
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument(
        "--guidance",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[4.0],
        help="classifier-free guidance scales, comma-separated (the demo samples with 4; 1: none)",
    )
    p.add_argument(
        "--condition",
        choices=sorted(CONDITIONS),
        default="prompt",
        help="prompt: the facts the prompt states (default); scene: the drawn scene's every object and "
        "its exact place and radius, and the background (nothing left to guess)",
    )
    p.add_argument(
        "--one_step_at",
        type=lambda v: [float(x) for x in v.split(",") if x],
        default=[1.0, 0.8, 0.6, 0.4, 0.2],
        help="noise levels t at which the validation pictures, noised, are predicted clean in one step "
        "and judged (comma-separated; empty: none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most this many training records")
    p.add_argument(
        "--judge_train",
        action="store_true",
        help="also sample and judge as many training prompts as --samples (fit against held-out)",
    )
    return p


def parse_checked(p: argparse.ArgumentParser) -> argparse.Namespace:
    """p's arguments, with the training budget checked: a bad one is refused by its flag's name
    before any data is read or anything compiled."""
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps must be at least 1, not {args.steps}")
    beyond = sorted(s for s in args.eval_at if not 1 <= s <= args.steps)
    if beyond:
        p.error(f"--eval_at steps {beyond} lie outside 1..--steps ({args.steps})")
    if args.max_seconds is not None and args.max_seconds < 0:
        p.error(f"--max_seconds must be at least 0, not {args.max_seconds}")
    return args


def report_point(point: dict) -> None:
    """One line per judged point of the curve."""
    judged = ", ".join(
        f"guidance {g} {r['judge']:.3f} (chance {r['chance']:.3f})" for g, r in point["guidance"].items()
    )
    print(f"  step {point['step']} ({point['samples_seen']} samples, loss {point['loss']:.4f}): {judged}")


def report(result: dict) -> None:
    print(
        f"\n{result['steps_run']} of {result['steps']} steps, final loss {result['final_loss']:.4f}, "
        f"{result['step_seconds']} s/step"
    )
    for scale, r in result["guidance"].items():
        print(
            f"guidance {scale}: judge {r['judge']:.3f} against the next record's prompt (chance) "
            f"{r['chance']:.3f}; checks passed: " + ", ".join(f"{k} {v:.3f}" for k, v in r["checks"].items())
        )
        print("  pictures: " + ", ".join(f"{k} {v:.3f}" for k, v in r["pictures"].items()))
    for scale, r in result.get("train_prompts", {}).items():
        print(f"guidance {scale}, training prompts: judge {r['judge']:.3f} (chance {r['chance']:.3f})")
    for t, r in result.get("one_step", {}).items():
        print(f"one step from t = {t}: judge {r['judge']:.3f} (chance {r['chance']:.3f}), {r['psnr']:.1f} dB")


def main() -> None:
    args = parse_checked(parser())
    os.makedirs(args.out, exist_ok=True)
    result = run(args)
    report(result)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
