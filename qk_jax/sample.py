"""`qk-jax sample`: text-to-image, instruction editing, customization, multi-subject generation.

    qk-jax sample --checkpoint RUN --prompt "a red circle left of a blue square" --out out.png
    qk-jax sample --checkpoint RUN --prompt "make the circle green" --source in.png --out edit.png
    qk-jax sample --checkpoint RUN --prompt "the subject on a checkered floor" --reference subj.png --out c.png
    qk-jax sample --checkpoint RUN --prompt "..." --prompt "..." --batch 4 --seed 1 --out grid.png
    qk-jax sample --checkpoint RUN --prompt "a green star" --height 48 --width 96 --out wide.png

The prompt and input images go through exactly the preprocessing of training
(`data.pipeline.collate_records`). The VLM and the connector run once per prompt; the
sampling loop (Euler or Heun, `jax.lax.fori_loop`) runs only the DiT, with all guidance
branches in one batched call per step:
- text guidance (`--guidance`): the condition stream vs. the same stream with text and
  kontext tokens masked out (how training drops them);
- with input images and the stage-3 low-level path, dual guidance (`--image-guidance`):
  InstructPix2Pix's three branches (text + images, images only, neither; "neither" zeroes
  the VAE latents of the inputs, as training drops them).
Several prompts and `--batch` samples per prompt run as one batch; a seed fixes the noise.
The output size is `Sampler.output_size`: the training bucket nearest the source's aspect
ratio, or exactly `--height` x `--width` (whole DiT tokens).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from qk_jax import flow, flow_solvers, paths, run_params, sharding
from qk_jax import guidance as guidance_lib
from qk_jax.config import ConfigError
from qk_jax.convert import diffusers_configs
from qk_jax.data import buckets as data_buckets
from qk_jax.data import pipeline as data_pipeline
from qk_jax.data import records as records_lib
from qk_jax.data import vlm_inputs
from qk_jax.data.model_inputs import place_batch, prepare_batch
from qk_jax.models.kontext import QueryKontext
from qk_jax.models.lora import apply_lora


def load_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8; FileNotFoundError / ValueError naming the file."""
    if not paths.exists(path):
        raise FileNotFoundError(f"input image {path} does not exist")
    try:
        with paths.path(path).open("rb") as f, Image.open(f) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types
        raise ValueError(f"input image {path} cannot be decoded: {e}") from None


def task_for(source: bool, references: int) -> str:
    if source:
        return "edit"
    return {0: "t2i", 1: "customization"}.get(references, "multi_subject")


def training_schedule(t: flow.TimestepConfig) -> flow_solvers.FlowMatchSchedule:
    """The sampling schedule that shifts like the training timesteps `t` (`model.timesteps`)."""
    if t.shift == "dynamic":
        return flow_solvers.FlowMatchSchedule(
            use_dynamic_shifting=True,
            base_shift=t.base_shift,
            max_shift=t.max_shift,
            base_image_seq_len=t.base_seq_len,
            max_image_seq_len=t.max_seq_len,
        )
    return flow_solvers.FlowMatchSchedule(shift=t.static_shift if t.shift == "static" else 1.0)


class Sampler:
    """A trained checkpoint ready to generate. `generate(records)` returns uint8 images."""

    def __init__(self, config, kcfg, params, processor, mesh, *, step: int | None = None, used_ema: bool = False):
        """From parameters in memory (LoRA not yet applied), e.g. during training."""
        self.config, self.kcfg, self.processor, self.mesh = config, kcfg, processor, mesh
        self.model = QueryKontext(kcfg)
        self.params = apply_lora(params, kcfg.lora_scales)
        self.step, self.used_ema = step, used_ema
        self._condition = jax.jit(self.model.condition)
        self._encode = jax.jit(self.model.encode_conditions)
        self._decode = jax.jit(self.model.decode, static_argnums=(2, 3))
        self._loops: dict[Any, Any] = {}

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str, *, use_ema: bool = True, mesh_spec=None, step: int | None = None
    ) -> Sampler:
        """A run workdir (or checkpoint folder): its config, processor and (EMA) weights."""
        run = run_params.restore(checkpoint, use_ema=use_ema, mesh_spec=mesh_spec, step=step)
        if run.processor_dir is None:
            raise FileNotFoundError(f"no processor/ folder next to the checkpoint {run.root}")
        return cls(
            run.config,
            run.kcfg,
            run.params,
            vlm_inputs.load_processor(paths.local_folder(run.processor_dir)),
            run.mesh,
            step=run.step,
            used_ema=run.used_ema,
        )

    # ------------------------------------------------------------------ inputs

    def records(
        self,
        prompts: Sequence[str],
        source: str | None = None,
        references: Sequence[str] = (),
        height: int | None = None,
        width: int | None = None,
    ) -> list[dict]:
        """Records (the data pipeline's format) for prompts sharing the same input images; their
        target is a blank of `output_size(height, width, the source's shape)`."""
        slots = int(self.config.data.image_slots)
        n_inputs = (1 if source else 0) + len(references)
        if n_inputs > slots:
            raise ValueError(
                f"{n_inputs} input images (source + references) but this checkpoint was trained with "
                f"data.image_slots={slots}"
            )
        src = load_image(source) if source else None
        refs = [load_image(r) for r in references]
        height, width = self.output_size(height, width, src.shape[:2] if src is not None else None)
        out = []
        for i, prompt in enumerate(prompts):
            if not prompt or not prompt.strip():
                raise ValueError(f"prompt {i} is empty: every sample needs an instruction or caption")
            out.append(
                {
                    "task": task_for(src is not None, len(refs)),
                    "prompt": prompt,
                    "target": records_lib.encode_png(np.zeros((height, width, 3), np.uint8)),
                    "source": records_lib.encode_png(src) if src is not None else b"",
                    "references": [records_lib.encode_png(r) for r in refs],
                    "scene": "",
                    "category": "",
                    "id": f"sample-{i}",
                }
            )
        return out

    def output_size(
        self, height: int | None = None, width: int | None = None, source_shape: tuple[int, int] | None = None
    ) -> tuple[int, int]:
        """The (height, width) to draw at, from a chosen height and width and the edit source's shape.

        Neither given: the training bucket (`data.area`, `data.ratios`) nearest the source's
        aspect ratio, which is what an edit's target gets in training; square without a source.
        One given: the other follows the source's aspect ratio (square without a source), rounded
        to whole tokens. Both: exactly those. Raises ValueError naming the flag when a side is not
        a positive multiple of the token's side (`downsample`: the autoencoder's downsampling
        times the DiT's patch), the sizes the DiT can draw.
        """
        token = int(self.kcfg.downsample)
        for flag, side in (("--height", height), ("--width", width)):
            if side is not None and (side <= 0 or side % token):
                raise ValueError(
                    f"{flag} {side}: must be a positive multiple of {token}, the side of one token of this "
                    "checkpoint's DiT (autoencoder downsampling x patch)"
                )
        if height is None and width is None:
            d = self.config.data
            table = data_buckets.bucket_table(d.area, d.multiple, d.ratios)
            return table[data_buckets.choose_bucket(*(source_shape or (1, 1)), table)]
        aspect = source_shape[0] / source_shape[1] if source_shape else 1.0
        if height is None:
            height = max(token, round(width * aspect / token) * token)
        if width is None:
            width = max(token, round(height / aspect / token) * token)
        return int(height), int(width)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        records: Sequence[dict],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        image_guidance: float | None = None,
        seed: int = 0,
        method: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """(B, H, W, 3) uint8 images for `records` (one group: same size and input count), drawn
        at their training bucket, or at exactly `size` = (height, width) (`output_size`)."""
        s = self.config.sample
        steps = int(s.steps if steps is None else steps)
        if steps < 1:
            raise ValueError(f"steps={steps}: sampling needs at least one step")
        guidance = float(s.guidance if guidance is None else guidance)
        image_guidance = float(s.image_guidance if image_guidance is None else image_guidance)
        method = method or s.method
        placed = self.model_batch(records, size)
        h, w = placed["target"].shape[1:3]
        with jax.set_mesh(self.mesh), sharding.activation_rules_context():
            cond, mask, _ = self._condition(self.params, placed)
            cond_tokens = None
            if self.kcfg.low_level and "cond_images" in placed:
                cond_tokens = self._encode(self.params, placed["cond_images"])
            n_target = (h // self.kcfg.downsample) * (w // self.kcfg.downsample)
            sigmas, timesteps = flow_solvers.flow_schedule(
                steps, self.schedule(), sigmas=flow_solvers.pipeline_sigmas(steps), image_seq_len=n_target
            )
            noise = jax.random.normal(jax.random.key(seed), (len(records), n_target, self.kcfg.generator.in_channels))
            key = (
                method,
                guidance != 1.0,
                cond_tokens is not None and image_guidance != 1.0,
                self.config.sample.get("guidance_mode", "cfg"),
                (h, w),
            )
            if key not in self._loops:
                self._loops[key] = jax.jit(self._loop(*key))
            tokens = self._loops[key](
                self.params,
                noise,
                jnp.asarray(sigmas),
                jnp.asarray(timesteps),
                cond,
                mask,
                cond_tokens,
                placed["img_ids"],
                jnp.float32(guidance),
                jnp.float32(image_guidance),
            )
        return self.decode_uint8(tokens, h, w)

    def model_batch(self, records: Sequence[dict], size: tuple[int, int] | None = None) -> dict[str, Any]:
        """`records` (one group) preprocessed exactly as in training (at `size` instead of their
        bucket when given, see `collate_records`) and placed on the mesh."""
        host = data_pipeline.collate_records(list(records), self.config.data, self.processor, size)
        with jax.set_mesh(self.mesh), sharding.activation_rules_context():
            return place_batch(prepare_batch(self.kcfg, host), self.mesh)

    def decode_uint8(self, tokens, height: int, width: int) -> np.ndarray:
        """DiT tokens (B, N, C) -> (B, height, width, 3) uint8 images."""
        with jax.set_mesh(self.mesh), sharding.activation_rules_context():
            images = self._decode(self.params, tokens, height, width)
        images = np.asarray(jax.device_get(images))
        return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)

    def schedule(self) -> flow_solvers.FlowMatchSchedule:
        """The sampling schedule, in this order of precedence:

        - `sample.scheduler`: a diffusers `scheduler_config.json`, a scheduler folder or a
          pipeline folder (e.g. the downloaded Qwen-Image folder);
        - the scheduler of the diffusers folder the generator was initialised from
          (`model.generator.checkpoint`, a pipeline folder or its `transformer/`), when that
          folder is still there;
        - the training timestep shift (`model.timesteps`).
        The pipelines' sigmas (`pipeline_sigmas`) and mu (from the target token count) are applied
        by `generate`, as QwenImagePipeline / FluxPipeline apply them.
        """
        chosen = self.config.sample.get("scheduler", "")
        if chosen:
            try:
                return diffusers_configs.read_schedule(chosen)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"config field sample.scheduler={chosen}: {e}") from None
        generator = self.config.model.generator.get("checkpoint", "")
        found = diffusers_configs.find_scheduler_config(generator) if generator and os.path.isdir(generator) else None
        if found:
            return diffusers_configs.read_schedule(found)
        return training_schedule(self.kcfg.timesteps)

    def _loop(self, method: str, text_cfg: bool, dual: bool, guidance_mode: str, image_size: tuple[int, int]):
        """The sampling loop for one guidance layout and target size (see `sample_loop`)."""
        return sample_loop(self.model, method, text_cfg, dual, guidance_mode, image_size)


GUIDANCE_MODES = ("cfg", "true_cfg")


def sample_loop(
    model: QueryKontext,
    method: str,
    text_cfg: bool,
    dual: bool,
    guidance_mode: str = "cfg",
    image_size: tuple[int, int] | None = None,
):
    """The sampling loop (jit it) for one guidance layout; the scales are traced arguments:

        loop(params, noise (B, N, C), sigmas (S+1,), timesteps (S,), cond (B, T+K, D_cond),
             mask (B, T+K), cond_tokens (B, n*N, C) | None, img_ids (B, N + n*N, 3), g, ig)
          -> denoised target tokens (B, N, C)

    Every step is one batched DiT call over the guidance branches: [full] (no guidance),
    [full, no text] (text CFG), or [full, no text, neither] (dual guidance with input images).
    `guidance_mode` (config `sample.guidance_mode`) combines the text-CFG branches as plain
    CFG or as Qwen-Image's "true CFG" (`guidance.true_cfg`: rescaled per token to the
    conditional velocity's norm). A blurring process (`model.blur`) steps with its B_s on the
    target's `image_size` (height, width), which it then needs.
    """
    if model.config.blur.enabled and image_size is None:
        raise ValueError("sample_loop: a blurring process (model.blur) needs the target's image_size")
    if guidance_mode not in GUIDANCE_MODES:
        raise ConfigError(f"config field sample.guidance_mode={guidance_mode!r}; expected one of {GUIDANCE_MODES}")
    text_combine = guidance_lib.true_cfg if guidance_mode == "true_cfg" else guidance_lib.cfg

    def loop(params, noise, sigmas, timesteps, cond, mask, cond_tokens, img_ids, g, ig):
        def model_fn(x, t, c):
            return model.velocity(params, x, c["tokens"], c["img_ids"], c["cond"], c["mask"], t)

        full = {"cond": cond, "mask": mask, "tokens": cond_tokens, "img_ids": img_ids}
        no_text = dict(full, mask=jnp.zeros_like(mask))
        if dual:
            uncond = dict(no_text, tokens=jnp.zeros_like(cond_tokens))
            vel = guidance_lib.guided_velocity(
                model_fn, [full, no_text, uncond], lambda c, i, u: guidance_lib.dual_cfg(c, i, u, g, ig)
            )
        elif text_cfg:
            vel = guidance_lib.guided_velocity(model_fn, [full, no_text], lambda c, u: text_combine(c, u, g))
        else:
            vel = guidance_lib.guided_velocity(model_fn, [full], lambda c: c)
        degrade = model.degrader(params, *image_size) if model.config.blur.enabled else None
        return flow_solvers.sample(vel, noise, sigmas, timesteps, method, degrade, model.config.min_t)

    return loop


# Output file extension -> how the image is written (no extension: PNG). WebP is lossless so
# that a written sample scores as drawn.
IMAGE_FORMATS = {".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95})}
IMAGE_FORMATS[".webp"] = ("WEBP", {"lossless": True})


def image_format(path: str, flag: str = "--out") -> tuple[str, dict[str, Any]]:
    """(PIL format, save options) of an output path by its extension; ValueError naming `flag`
    for an extension no format here writes (a PNG named .gif would mislead whatever opens it)."""
    ext = os.path.splitext(paths.basename(path))[1].lower()
    if ext and ext not in IMAGE_FORMATS:
        raise ValueError(f"{flag} {path}: cannot write {ext} images; name it .png, .jpg, .jpeg or .webp")
    return IMAGE_FORMATS.get(ext, IMAGE_FORMATS[".png"])


def save_grid(images: np.ndarray, path: str, columns: int | None = None) -> np.ndarray:
    """Writes one image, or a grid of several (row-major), in the format of the path's extension
    (`image_format`: PNG without one; a local path or a URL, `paths`); returns the grid
    (H, W, 3) uint8."""
    n, h, w, _ = images.shape
    cols = columns or min(n, 8)
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    fmt, options = image_format(path)
    encoded = io.BytesIO()
    Image.fromarray(grid).save(encoded, format=fmt, **options)
    paths.write_bytes(path, encoded.getvalue())
    return grid


# ----------------------------------------------------------------------------- CLI


def main(argv):
    from absl import flags

    del argv
    f = flags.FLAGS
    if not f.prompt:
        raise ValueError("--prompt is required (repeat it for several prompts)")
    if f.batch < 1:
        raise ValueError(f"--batch {f.batch}: must be at least 1 sample per prompt")
    if f.steps is not None and f.steps < 1:
        raise ValueError(f"--steps {f.steps}: sampling needs at least one step")
    for name, scale in (("guidance", f.guidance), ("image_guidance", f.image_guidance)):
        if scale is not None and not math.isfinite(scale):
            raise ValueError(f"--{name} {scale}: must be a finite number")
    if f.scheduler:  # a bad scheduler file stops before the checkpoint is read
        diffusers_configs.read_schedule(f.scheduler)
    image_format(f.out)
    paths.check_output_file(f.out)
    sampler = Sampler.from_checkpoint(f.checkpoint, use_ema=f.ema, step=f.step)
    if f.scheduler:
        sampler.config.sample.scheduler = f.scheduler
    prompts = [p for p in f.prompt for _ in range(f.batch)]
    recs = sampler.records(prompts, f.source, f.reference or (), f.height, f.width)
    size = records_lib.image_size(recs[0]["target"])  # output_size's choice: drawn at exactly that
    images = sampler.generate(
        recs,
        steps=f.steps,
        guidance=f.guidance,
        image_guidance=f.image_guidance,
        seed=f.seed,
        method=f.sampler,
        size=size,
    )
    save_grid(images, f.out, columns=f.batch if len(f.prompt) > 1 else None)
    print(
        f"wrote {len(images)} image(s) of {images.shape[1]}x{images.shape[2]} to {f.out} "
        f"(checkpoint step {sampler.step}{', EMA weights' if sampler.used_ema else ''})",
        flush=True,
    )


def define_flags() -> None:
    """The tool's flags (defined on demand, so other tools may import this module)."""
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "A run workdir (or its checkpoints/ folder).", required=True)
    flags.DEFINE_multi_string("prompt", [], "Prompt; repeat for several prompts.")
    flags.DEFINE_string("source", None, "Image to edit (instruction editing).")
    flags.DEFINE_multi_string("reference", [], "Reference subject image; repeat for several subjects.")
    flags.DEFINE_string(
        "out", "sample.png", "Output image, .png (or no extension), .jpg or .webp (a grid when several images)."
    )
    flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's sample.steps).")
    flags.DEFINE_float("guidance", None, "Text guidance scale (default: sample.guidance).")
    flags.DEFINE_float("image_guidance", None, "Image guidance scale for edits (default: sample.image_guidance).")
    flags.DEFINE_integer("seed", 0, "Noise seed.")
    flags.DEFINE_integer("batch", 1, "Samples per prompt.")
    flags.DEFINE_integer(
        "height",
        None,
        "Output height in pixels, a multiple of the DiT's token side (default: the training size "
        "nearest the source's aspect ratio, square without a source; with --width only, that ratio).",
    )
    flags.DEFINE_integer("width", None, "Output width in pixels (as --height).")
    flags.DEFINE_string("sampler", None, "euler | heun (default: sample.method).")
    flags.DEFINE_string(
        "scheduler",
        None,
        "A diffusers scheduler_config.json, or a pipeline folder holding "
        "scheduler/scheduler_config.json, whose schedule to sample with "
        "(default: sample.scheduler, see Sampler.schedule).",
    )
    flags.DEFINE_bool("ema", True, "Use the EMA weights when the checkpoint has them.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest good one; a corrupt step is skipped).")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
