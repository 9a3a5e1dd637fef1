"""`qk-jax parity qwen2_5_vl --checkpoint DIR`: our Qwen2.5-VL against transformers'.

Reads the checkpoint's own config.json (any width, depth, head count, window, merge or
patch size, M-RoPE sections, tied or untied head), builds a random batch with images of
the requested sizes and a prompt of the requested length (rows padded to different
lengths), runs `Qwen2_5_VLForConditionalGeneration` first, keeps only the compared
outputs and frees it, then loads our parameters from the same safetensors (streamed) and
runs ours. Both run in float32 at highest matmul precision. One table row per stage:
vision tower output, merged input embeddings, the hidden state after every N-th layer,
the final-norm hidden state and the logits (real tokens only; padding is ignored).
The last line is the verdict; the exit status is non-zero when a stage is above tolerance.

    qk-jax parity qwen2_5_vl --checkpoint DIR --image-sizes 56x56,112x84 \\
        --prompt-tokens 600 --batch-size 2 --rtol 1e-4 --every-n-layers 4
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from qk_jax.parity.report import ParityReport

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF Qwen2.5-VL folder (config.json + safetensors).")
_IMAGE_SIZES = flags.DEFINE_string(
    "image_sizes", "56x56,112x84", "Comma-separated HxW pixel sizes of the images in every prompt ('' = none)."
)
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 600, "Length of the longest prompt (tokens).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 2, "Rows; row b is 7*b tokens shorter than row 0 (padded).")
_PADDING = flags.DEFINE_enum("padding", "left", ["left", "right"], "Padding side of the shorter rows.")
_RTOL = flags.DEFINE_float("rtol", 1e-4, "Tolerance on max|ours - ref| / max|ref| per stage.")
_ATOL = flags.DEFINE_float("atol", 0.0, "A stage also passes when max|ours - ref| <= atol (0 = off).")
_EVERY = flags.DEFINE_integer("every_n_layers", 1, "Compare the hidden state after every N-th decoder layer.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random tokens and pixels.")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'56x56,112x84' -> [(56, 56), (112, 84)] (height x width)."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--image-sizes entry {part!r} must look like HEIGHTxWIDTH, e.g. 112x84") from None
        sizes.append((h, w))
    return sizes


def image_grid(cfg, height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the HF image processor gives an image of this size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    v = cfg.vision
    h, w = smart_resize(
        height, width, factor=v.patch_size * v.spatial_merge_size, min_pixels=56 * 56, max_pixels=28 * 28 * 1280
    )
    return 1, h // v.patch_size, w // v.patch_size


def make_inputs(
    cfg,
    image_sizes: Sequence[tuple[int, int]],
    prompt_tokens: int,
    batch_size: int,
    padding: str = "left",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A random batch: every row holds every image (vision start, pads, vision end) amid random
    text; row b is 7*b tokens shorter than row 0 and padded on `padding`'s side.

    Returns numpy `input_ids`, `attention_mask`, `mm_token_type_ids` (B, T), `pixel_values`
    (sum of patches, patch_dim) and `image_grid_thw` (B * n_images, 3).
    """
    rng = np.random.default_rng(seed)
    v = cfg.vision
    grids = [image_grid(cfg, h, w) for h, w in image_sizes]
    n_img_tokens = [t * h * w // v.merge_unit for t, h, w in grids]
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    text_ids = np.array([i for i in range(cfg.text.vocab_size) if i not in special])
    fixed = sum(n + 2 for n in n_img_tokens)
    shortest = prompt_tokens - 7 * (batch_size - 1)
    if shortest - fixed < len(grids) + 1:
        raise ValueError(
            f"--prompt-tokens={prompt_tokens} leaves no room for text around {fixed} image tokens "
            f"in a batch of {batch_size} (rows shrink by 7 tokens each)"
        )
    ids = np.zeros((batch_size, prompt_tokens), np.int64)
    mask = np.zeros((batch_size, prompt_tokens), np.int64)
    pad_id = cfg.text.pad_token_id if cfg.text.pad_token_id is not None else 0
    ids[:] = pad_id
    for b in range(batch_size):
        length = prompt_tokens - 7 * b
        n_text = length - fixed
        cuts = np.sort(rng.choice(np.arange(1, n_text), size=len(grids), replace=False)) if grids else []
        chunks = np.split(rng.choice(text_ids, size=n_text), cuts)
        row = list(chunks[0])
        for n, chunk in zip(n_img_tokens, chunks[1:]):
            row += [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id] + list(chunk)
        sl = slice(prompt_tokens - length, None) if padding == "left" else slice(0, length)
        ids[b, sl] = row
        mask[b, sl] = 1
    grid_thw = np.array(grids * batch_size, np.int64).reshape(-1, 3)
    n_patches = int(np.prod(grid_thw, axis=-1).sum()) if len(grid_thw) else 0
    pixel_values = rng.standard_normal((n_patches, v.patch_dim)).astype(np.float32)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == cfg.image_token_id).astype(np.int64),
        "pixel_values": pixel_values,
        "image_grid_thw": grid_thw,
    }


def layer_selection(num_layers: int, every: int) -> list[int]:
    """Indices into HF's hidden_states tuple (1..L) compared: every N-th layer and the last."""
    every = max(1, every)
    picked = list(range(every, num_layers + 1, every))
    return picked if picked and picked[-1] == num_layers else picked + [num_layers]


def torch_reference(folder: str, inputs: dict[str, np.ndarray], layers: Sequence[int]) -> dict[str, Any]:
    """Runs transformers on `inputs` (float32, eager attention) and returns only the compared
    outputs as numpy; the torch model is freed before returning."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, low_cpu_mem_usage=True, attn_implementation="eager"
    )
    model.eval()
    t = {k: torch.from_numpy(np.asarray(x)) for k, x in inputs.items()}
    has_images = len(inputs["image_grid_thw"]) > 0
    out: dict[str, Any] = {}
    with torch.no_grad():
        if has_images:
            feats = model.model.get_image_features(t["pixel_values"], t["image_grid_thw"]).pooler_output
            out["vision"] = torch.cat(list(feats), dim=0).numpy()
        result = model(
            input_ids=t["input_ids"],
            attention_mask=t["attention_mask"],
            mm_token_type_ids=t["mm_token_type_ids"],
            pixel_values=t["pixel_values"] if has_images else None,
            image_grid_thw=t["image_grid_thw"] if has_images else None,
            output_hidden_states=True,
        )
        out["hidden"] = {i: result.hidden_states[i].numpy() for i in [0, *layers]}
        out["logits"] = result.logits.numpy()
    del model, result
    gc.collect()
    return out


def jax_outputs(folder: str, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Our outputs on `inputs`, parameters streamed from the same folder in float32."""
    import jax

    from qk_jax.convert.qwen2_5_vl import load_hf
    from qk_jax.models.qwen2_5_vl import Qwen25VL, prepare_inputs

    jax.config.update("jax_default_matmul_precision", "highest")
    cfg, params = load_hf(folder, dtype=np.float32)
    model = Qwen25VL(cfg)
    grid = inputs["image_grid_thw"] if len(inputs["image_grid_thw"]) else None
    host = prepare_inputs(cfg, inputs["input_ids"], inputs["attention_mask"], grid)
    variables = {"params": params}
    plan = host.get("vision_plan")
    pixels = inputs["pixel_values"] if grid is not None else None
    out: dict[str, Any] = {}
    if grid is not None:
        out["vision"] = np.asarray(
            jax.jit(lambda v, p, pl: model.apply(v, p, pl, method=model.vision))(variables, pixels, plan)
        )
    forward = jax.jit(lambda v, ids, pos, m, p, pl: model.apply(v, ids, pos, m, p, pl, output_hidden_states=True))
    result = forward(
        variables,
        inputs["input_ids"].astype(np.int32),
        host["position_ids"],
        inputs["attention_mask"].astype(np.int32),
        pixels,
        plan,
    )
    out["hidden"] = np.asarray(result["hidden_states"])
    out["logits"] = np.asarray(result["logits"])
    out["config"] = cfg
    return out


def run(
    checkpoint: str,
    image_sizes: Sequence[tuple[int, int]] = ((56, 56), (112, 84)),
    prompt_tokens: int = 600,
    batch_size: int = 2,
    padding: str = "left",
    rtol: float = 1e-4,
    atol: float = 0.0,
    every_n_layers: int = 1,
    seed: int = 0,
    stream=None,
) -> int:
    """The whole comparison; prints the table and verdict, returns the exit status."""
    from qk_jax.convert.qwen2_5_vl import read_config

    cfg = read_config(checkpoint)
    inputs = make_inputs(cfg, image_sizes, prompt_tokens, batch_size, padding, seed)
    layers = layer_selection(cfg.text.num_hidden_layers, every_n_layers)
    t0 = time.time()
    ref = torch_reference(checkpoint, inputs, layers)
    t1 = time.time()
    ours = jax_outputs(checkpoint, inputs)
    t2 = time.time()
    valid = inputs["attention_mask"].astype(bool)
    n_layers = cfg.text.num_hidden_layers
    report = ParityReport(
        f"Qwen2.5-VL parity: {checkpoint}\n  {len(image_sizes)} image(s) {list(image_sizes)} per row, "
        f"{batch_size} rows of <= {prompt_tokens} tokens ({padding} padding), text {n_layers} layers x "
        f"{cfg.text.hidden_size}, vision {cfg.vision.depth} blocks x {cfg.vision.hidden_size}; "
        f"torch {t1 - t0:.1f}s, jax {t2 - t1:.1f}s",
        stream=stream,
    )

    def add(stage, a, b):
        row = report.add(stage, a, b, rtol)
        if atol > 0 and row.max_abs <= atol:
            row.ok = True

    if "vision" in ref:
        add("vision tower (merged)", ours["vision"], ref["vision"])
    add("merged input embeddings", ours["hidden"][0][valid], ref["hidden"][0][valid])
    for i in layers:
        name = f"hidden after layer {i - 1}" if i < n_layers else f"final-norm hidden (layer {i - 1})"
        add(name, ours["hidden"][i][valid], ref["hidden"][i][valid])
    add("logits", ours["logits"][valid], ref["logits"][valid])
    return report.print()


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {list(argv[1:])}; see --help")
    if not _CHECKPOINT.value:
        raise SystemExit("--checkpoint is required (a HF Qwen2.5-VL folder)")
    code = run(
        _CHECKPOINT.value,
        parse_sizes(_IMAGE_SIZES.value),
        _PROMPT_TOKENS.value,
        _BATCH_SIZE.value,
        _PADDING.value,
        _RTOL.value,
        _ATOL.value,
        _EVERY.value,
        _SEED.value,
    )
    raise SystemExit(code)
