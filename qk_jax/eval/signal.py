"""The learning signal: does the model use its condition, and does it finish a picture?

A falling training loss says little about a conditional generator: most of it is
denoising, which a model learns long before it learns to draw what the prompt asks. This
module measures, on a fixed set of validation records per task, three things that move
only when the condition is used (and stay flat when it is not):

- **condition gain** per timestep: the clean-latent error of the generator with the
  condition, against the same with the condition masked out (the unconditional branch
  of guidance: text and kontext tokens masked, input-image latents zeroed), on records
  whose condition fixes the content (reconstruction; edits; text-to-image prompts that
  state colour, shape and position first, then those that state colour and shape). `gain = 1 - err_with / err_without`.
- **content gain** per timestep: the same error with the record's own condition against
  the condition of another record of the batch (the batch rolled by one). A model can
  learn to tell "conditioned" from "unconditional" (a positive gain) long before it reads
  what the condition says; only the content gain measures the latter. `content = 1 -
  err_with / err_swapped`.
- **completions**: validation targets noised to t0 (0.5 and 0.8) and denoised by the
  plain Euler sampler (no guidance): the judge's score of the finished picture (where the
  records carry a scene graph) and its PSNR against the target. A model that has learnt to
  draw finishes the picture from high t0; one that only denoises does not.
- **judge scores** (Kontext-Shapes records only): full samples (the config's sampler and
  guidance) of a few validation prompts, scored by the judge (`qk_jax.eval.score`), and
  beside them their chance level: the same samples judged against the next record's prompt
  (`score.against_next_prompts`; not for edits, which are judged against their own source).
  A score at its chance level owes nothing to the prompt.

The tasks measured are those of the stage (`STAGE_TASKS`) that the data folder has a
validation split of; imported real data without scene graphs gets the gains and the
completions' PSNR.

    signal = LearningSignal.from_config(config, processor)
    values = signal.measure(sampler)        # a `qk_jax.sample.Sampler` over the weights to test
    flat = flatten(values)                  # {"gain/t2i@0.9": ..., "judge/t2i": ..., "judge_chance/t2i": ...}
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax import flow_solvers, logs, sharding
from qk_jax.data import buckets, builders
from qk_jax.data import records as records_lib
from qk_jax.eval import score as score_lib

# t = 1 is where sampling starts, from pure noise: the error there is the prompt's alone. In the
# demo's pixel space an object shows through most of the noise (to t ~ 0.9), so what the prompt
# decides is measured only near t = 1.
GAIN_TIMESTEPS = (0.2, 0.5, 0.7, 0.9, 1.0)
COMPLETION_T0 = (0.5, 0.8)
# Tasks of each stage's mixture whose condition fixes the content of the target.
STAGE_TASKS = {1: ("t2i", "reconstruction"), 2: ("t2i", "reconstruction"), 3: ("t2i", "edit", "reconstruction")}


@dataclasses.dataclass(frozen=True)
class SignalConfig:
    """What `LearningSignal` measures (fields of `train.signal`)."""

    samples: int = 8  # validation records per task
    noise_seeds: int = 2  # noise draws per record and timestep for the condition gain
    completion_steps: int = 10  # Euler steps from t0 down to 0
    judge_samples: int = 8  # validation prompts per task sampled in full and judged (0: none)
    timesteps: tuple[float, ...] = GAIN_TIMESTEPS
    completion_t0: tuple[float, ...] = COMPLETION_T0


def fixing_degree(task: str, rec: dict) -> int:
    """How much of the target a record's condition fixes: 2 = everything the judge checks
    (reconstruction and edits; text-to-image prompts that state the colour and shape of every
    object and where it goes), 1 = colour and shape but not the place, 0 = less."""
    if task != "t2i":
        return 2
    spec = json.loads(rec["scene"])["spec"] if rec.get("scene") else {}
    objs = spec.get("objects") or []
    if not objs or not all(o.get("colour") and o.get("shape") for o in objs):
        return 0
    placed = all(o.get("cell") for o in objs) or bool(spec.get("relations"))
    return 2 if placed else 1


def has_scene(rec: dict) -> bool:
    """Whether the judge can score a record: Kontext-Shapes records carry their scene graph,
    imported real data need not."""
    return bool(rec.get("scene"))


def content_fixing(task: str, rec: dict) -> bool:
    """Whether a record's condition fixes its target's content (`fixing_degree` 2)."""
    return fixing_degree(task, rec) == 2


def validation_records(data_dir: str, dataset: str, task: str, n: int, *, fixing: bool = True) -> list[dict]:
    """`n` validation records of `task` with one input-image count (one batch); with `fixing`,
    those whose condition fixes the most of the target first (`fixing_degree`: a split holds
    few text-to-image prompts that fix colour, shape and place of every object)."""
    source = builders.load_source(data_dir, dataset, task, "validation")
    recs = [records_lib.normalize(source[i]) for i in range(len(source))]
    if not recs:
        raise ValueError(f"no validation records of task {task!r} in {data_dir} for the learning signal")
    if fixing:
        recs = sorted(recs, key=lambda r: -fixing_degree(task, r))  # stable: split order within a degree
    n_inputs = records_lib.num_inputs(recs[0])
    return [r for r in recs if records_lib.num_inputs(r) == n_inputs][:n]


def complete_from_targets(model, params, batch, key, sigmas):
    """The batch's targets noised to sigmas[0] and integrated down to 0 by Euler without guidance:
    (B, N, C) target tokens. With `sigmas = [t, 0]` it is the clean-image prediction from x_t."""
    cond, mask, tokens, _, xt = _noised_inputs(model, params, batch, key, sigmas[0])

    def velocity(x, t):
        return model.velocity(params, x, tokens, batch["img_ids"], cond, mask, jnp.full((x.shape[0],), t))

    degrade = model.degrader(params, *batch["target"].shape[1:3])
    return flow_solvers.euler_sample(velocity, xt, sigmas, sigmas[:-1], degrade, model.config.min_t)


class LearningSignal:
    """Fixed validation records per task and the measurements of the module docstring."""

    def __init__(
        self, records: dict[str, list[dict]], judge_records: dict[str, list[dict]], cfg: SignalConfig, seed: int = 0
    ):
        self.records, self.judge_records, self.cfg, self.seed = records, judge_records, cfg, seed
        self._jitted: dict[Any, Any] = {}

    @classmethod
    def from_config(cls, config, stage: int | None = None) -> LearningSignal:
        """The signal of a training config: its stage's tasks, its data folder's validation split."""
        s = config.train.signal
        cfg = SignalConfig(
            samples=int(s.samples),
            noise_seeds=int(s.noise_seeds),
            completion_steps=int(s.completion_steps),
            judge_samples=int(s.judge_samples),
        )
        data_dir, dataset = config.data.data_dir, config.data.dataset
        recs, missing = {}, []
        for task in STAGE_TASKS[int(stage or config.stage)]:  # those the data has a validation split of
            try:
                recs[task] = validation_records(data_dir, dataset, task, cfg.samples)
            except (builders.NotBuiltError, ValueError) as e:
                missing.append(e)
        if not recs:
            raise missing[0]
        if missing:
            logs.info(f"learning signal on {', '.join(recs)} only: " + "; ".join(str(e) for e in missing))
        judged = {}
        for task in recs if cfg.judge_samples else ():
            chosen = validation_records(data_dir, dataset, task, cfg.judge_samples, fixing=False)
            if task != "reconstruction" and all(has_scene(r) for r in chosen):  # the judge reads scene graphs
                judged[task] = chosen
        return cls(recs, judged, cfg, seed=int(config.train.seed))

    # ------------------------------------------------------------------ measurements

    def measure(self, sampler) -> dict[str, Any]:
        """{"gain": {task: {t: {"with", "without", "swapped", "gain", "content"}}}, "completion": {task:
        {t0: {"score", "psnr"}}}, "judge": {task: score}, "judge_chance": {task: score}} for the
        weights of `sampler` (a `qk_jax.sample.Sampler`)."""
        out: dict[str, Any] = {"gain": {}, "completion": {}, "judge": {}, "judge_chance": {}}
        for task, recs in self.records.items():
            batch = sampler.model_batch(recs)
            out["gain"][task] = self._gain(sampler, batch)
            out["completion"][task] = self._completions(sampler, batch, recs)
        for task, recs in self.judge_records.items():
            images = sampler.generate(recs, seed=self.seed)
            out["judge"][task] = float(np.mean([score_lib.score_sample(r, im)["score"] for r, im in zip(recs, images)]))
            if (chance := score_lib.chance_level(recs, images)) is not None:
                out["judge_chance"][task] = chance
        return out

    def _fn(self, sampler, name: str):
        """`_<name>_impl` bound to the sampler's model and jitted once per model config, so the
        measurements of later steps (a new Sampler over new weights) reuse the compilation."""
        key = (sampler.kcfg, name)
        if key not in self._jitted:
            self._jitted[key] = jax.jit(functools.partial(getattr(self, f"_{name}_impl"), sampler.model))
        return self._jitted[key]

    def _gain(self, sampler, batch) -> dict[str, dict[str, float]]:
        errs = {}
        with jax.set_mesh(sampler.mesh), sharding.activation_rules_context():
            for t in self.cfg.timesteps:
                w, wo, sw = [], [], []
                for s in range(self.cfg.noise_seeds):
                    key = jax.random.fold_in(jax.random.key(self.seed), s)
                    e_with, e_without, e_swapped = self._fn(sampler, "x0_errors")(
                        sampler.params, batch, key, jnp.float32(t)
                    )
                    w.append(np.asarray(e_with))
                    wo.append(np.asarray(e_without))
                    sw.append(np.asarray(e_swapped))
                e_w, e_wo, e_sw = float(np.mean(w)), float(np.mean(wo)), float(np.mean(sw))
                errs[f"{t:g}"] = {
                    "with": e_w,
                    "without": e_wo,
                    "swapped": e_sw,
                    "gain": 1.0 - e_w / e_wo if e_wo > 0 else 0.0,
                    "content": 1.0 - e_w / e_sw if e_sw > 0 else 0.0,
                }
        return errs

    @staticmethod
    def _x0_errors_impl(model, params, batch, key, t):
        """Per-sample clean-latent MSE with the record's condition, with it masked out, and with
        the condition of the next record of the batch (rolled by one): three (B,) arrays. The
        condition's image-stream ids stay the record's own (a swapped source keeps its place)."""
        cond, mask, tokens, x0, xt = _noised_inputs(model, params, batch, key, t)
        tb = jnp.full((x0.shape[0],), t, jnp.float32)

        def err(c, m, tok):
            v = model.velocity(params, xt, tok, batch["img_ids"], c, m, tb)
            x0_hat = xt.astype(jnp.float32) - t * v.astype(jnp.float32)
            return jnp.mean(jnp.square(x0_hat - x0.astype(jnp.float32)), axis=(1, 2))

        def roll(x):
            return None if x is None else jnp.roll(x, 1, axis=0)

        return (
            err(cond, mask, tokens),
            err(cond, jnp.zeros_like(mask), None if tokens is None else jnp.zeros_like(tokens)),
            err(roll(cond), roll(mask), roll(tokens)),
        )

    def _completions(self, sampler, batch, recs) -> dict[str, dict[str, float]]:
        out = {}
        with jax.set_mesh(sampler.mesh), sharding.activation_rules_context():
            for t0 in self.cfg.completion_t0:
                images = completed_pictures(
                    sampler, self._fn(sampler, "complete"), batch, recs, t0, self.cfg.completion_steps, self.seed
                )
                psnrs = [
                    min(score_lib.psnr(im, records_lib.decode_image(r["target"])), PSNR_CAP)
                    for r, im in zip(recs, images)
                ]
                out[f"{t0:g}"] = {"psnr": float(np.mean(psnrs))}
                if all(has_scene(r) for r in recs):  # judged only where the judge can read the record
                    scores = [float(score_lib.score_sample(r, im)["score"]) for r, im in zip(recs, images)]
                    out[f"{t0:g}"]["score"] = float(np.mean(scores))
        return out

    _complete_impl = staticmethod(complete_from_targets)


def completed_pictures(sampler, complete, batch, recs, t0: float, steps: int, seed: int) -> list[np.ndarray]:
    """(H, W, 3) uint8 pictures of the batch's records (`recs`, in order), their targets noised to `t0`
    and finished by `steps` Euler steps of `complete` (`complete_from_targets` bound to the sampler's
    model and jitted), each at its target's size. Call within the sampler's mesh context."""
    sigmas = jnp.asarray(np.linspace(t0, 0.0, steps + 1).astype(np.float32))
    tokens = complete(sampler.params, batch, jax.random.key(seed), sigmas)
    images = sampler.decode_uint8(tokens, *np.shape(batch["target"])[1:3])
    return [at_target_size(im, records_lib.decode_image(r["target"])) for r, im in zip(recs, images)]


PSNR_CAP = 60.0  # dB: an exact copy's infinite PSNR, capped so that a mean stays finite


def at_target_size(image: np.ndarray, target: np.ndarray) -> np.ndarray:
    """A sample (H, W, 3) resized and cropped to its target's size, as the judge compares them
    when a run was trained at another size than its data's; unchanged otherwise."""
    return image if image.shape[:2] == target.shape[:2] else buckets.resize_crop(image, target.shape[:2])


def _noised_inputs(model, params, batch, key, t):
    """What both measurements start from: the condition stream and mask, the input images'
    latent tokens (stage 3; else None), the clean target tokens x0 (B, N, C) and x0 noised to t."""
    cond, mask, _ = model.condition(params, batch)
    x0 = model.encode(params, batch["target"])
    tokens = None
    if model.config.low_level and "cond_images" in batch:
        tokens = model.encode_conditions(params, batch["cond_images"])
    noise = jax.random.normal(key, x0.shape, x0.dtype)
    xt = model.noised(params, x0, noise, jnp.full((x0.shape[0],), t, jnp.float32), *batch["target"].shape[1:3])
    return cond, mask, tokens, x0, xt


def flatten(values: dict[str, Any]) -> dict[str, float]:
    """{"gain/t2i@0.9": g, "content/t2i@0.9": c, "err/t2i@0.9": e_with, "err_uncond/t2i@0.9": e_without,
    "err_swapped/t2i@0.9": e_swapped, "completion_score/t2i@0.8": s, "completion_psnr/t2i@0.8": p,
    "judge/t2i": j, "judge_chance/t2i": j_chance}."""
    flat = {}
    for task, per_t in values.get("gain", {}).items():
        for t, v in per_t.items():
            flat[f"gain/{task}@{t}"] = v["gain"]
            flat[f"content/{task}@{t}"] = v["content"]
            flat[f"err/{task}@{t}"] = v["with"]
            flat[f"err_uncond/{task}@{t}"] = v["without"]
            flat[f"err_swapped/{task}@{t}"] = v["swapped"]
    for task, per_t in values.get("completion", {}).items():
        for t, v in per_t.items():
            if "score" in v:
                flat[f"completion_score/{task}@{t}"] = v["score"]
            flat[f"completion_psnr/{task}@{t}"] = v["psnr"]
    for task, v in values.get("judge", {}).items():
        flat[f"judge/{task}"] = v
    for task, v in values.get("judge_chance", {}).items():
        flat[f"judge_chance/{task}"] = v
    return flat


def summary_line(values: dict[str, Any]) -> str:
    """One log line: gains and content gains per timestep, completion scores, judge scores with
    their chance level."""
    parts = []
    for task, per_t in values.get("gain", {}).items():
        gains = " ".join(f"{t}:{100 * v['gain']:.1f}%" for t, v in per_t.items())
        content = " ".join(f"{t}:{100 * v['content']:.1f}%" for t, v in per_t.items())
        parts.append(f"gain[{task}] {gains}  content[{task}] {content}")
    for task, per_t in values.get("completion", {}).items():
        parts.append(
            f"complete[{task}] "
            + " ".join(
                f"{t}:" + (f"{v['score']:.2f}/" if "score" in v else "") + f"{v['psnr']:.1f}dB"
                for t, v in per_t.items()
            )
        )
    if values.get("judge"):
        chance = values.get("judge_chance", {})
        parts.append(
            "judge "
            + " ".join(
                f"{t}={v:.2f}" + (f" (chance {chance[t]:.2f})" if t in chance else "")
                for t, v in values["judge"].items()
            )
        )
    return "  ".join(parts)
