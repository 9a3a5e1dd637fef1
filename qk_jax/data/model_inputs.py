"""Host-side preparation of a Query-Kontext batch (numpy, outside jit).

The data pipeline (`qk_jax.data.pipeline`) yields static-shape batches (layout in its
docstring). `prepare_batch` turns one into the arrays the jitted step takes:

- the VLM's `pixel_values` of the input images in the vision tower's batched layout,
  (B * n, P, D) with the plan of ONE image (every image of a batch shares one grid: the
  pipeline buckets them), so the tower runs (B * n) sequences of P patches that split
  over the data-parallel devices with the rows; a batch that mixes grids falls back to
  the flat layout (single process only);
- the 3-axis M-RoPE position ids of the prompt *followed by the K kontext queries*
  (queries continue after each row's last prompt position);
- the DiT's condition stream, packed: `cond_index` (B, W + K) picks from the VLM sequence
  each row's prompt tokens from its `prompt_start` (after the chat-template prefix every
  prompt shares) to its last token, then its K queries, then -1 (padding); W = T minus the
  prefix, so neither padding nor the shared prefix sits among a row's condition tokens;
- the image-stream position ids `img_ids` (B, N_target + n * N_cond, 3) of the DiT: the
  target first, then (stage 3) each input image's segment, placed by the configured scheme:
    shifted_2d  the paper's shifted 2D RoPE: target at (i, j), an edit *source* at
                (i - h, j - w), the k-th *reference* at (i + k h, j + k w);
    frame       FLUX.1-Kontext's frame index: target frame 0, i-th input image frame i.
  Whether slot 0 is a source or a reference follows the sample's task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qk_jax.data.vocab import TASKS
from qk_jax.models.kontext import KontextConfig
from qk_jax.models.mmdit.positions import grid_ids
from qk_jax.models.qwen2_5_vl import VisionPlan, extend_position_ids, prepare_inputs, shares_one_grid

# Tasks whose first input image is a *source* (pixels to preserve); the others' inputs are references.
TASKS_WITH_SOURCE = ("reconstruction", "transformation", "edit")


def num_inputs(batch: Mapping[str, np.ndarray]) -> int:
    """The batch's input-image count (the pipeline groups batches so every row has the same)."""
    if "cond_mask" not in batch:
        return 0
    counts = np.asarray(batch["cond_mask"]).sum(axis=1)
    if len(set(counts.tolist())) > 1:
        raise ValueError(
            f"batch mixes input-image counts {sorted(set(counts.tolist()))}; the pipeline must group "
            "batches by number of input images"
        )
    return int(counts[0]) if len(counts) else 0


def image_ids(cfg: KontextConfig, task_ids: np.ndarray, height: int, width: int, n_inputs: int) -> np.ndarray:
    """Image-stream position ids (B, (1 + n) * h * w, 3) float32 for targets of (height, width) pixels."""
    f = cfg.downsample
    if height % f or width % f:
        raise ValueError(f"image size {height}x{width} is not a multiple of {f} (autoencoder x patch)")
    h, w = height // f, width // f
    centred = cfg.generator.family == "qwen_image"
    n_seg = 1 + (n_inputs if cfg.low_level else 0)
    out = np.zeros((len(task_ids), n_seg * h * w, 3), np.float32)
    for b, task in enumerate(np.asarray(task_ids)):
        name = TASKS[int(task)]
        segments = [grid_ids(h, w, centred=centred)]
        for slot in range(n_seg - 1):
            if cfg.position_scheme == "frame":
                segments.append(grid_ids(h, w, frame=slot + 1, centred=centred))
            elif slot == 0 and name in TASKS_WITH_SOURCE:
                segments.append(grid_ids(h, w, centred=centred, offset=(-h, -w)))
            else:
                k = slot if name in TASKS_WITH_SOURCE else slot + 1
                segments.append(grid_ids(h, w, centred=centred, offset=(k * h, k * w)))
        out[b] = np.concatenate(segments, 0)
    return out


def prepare_batch(cfg: KontextConfig, batch: Mapping[str, Any], accum: int = 1, processes: int = 1) -> dict[str, Any]:
    """Pipeline batch (numpy, this process's rows) -> model batch, see the module docstring.

    accum > 1 splits the rows into that many micro-batches stacked on a new leading axis
    (the train step scans over it). The vision plan is that of one image, the same in
    every process, so each process passes only its own rows' images.
    """
    if accum > 1:
        rows = len(batch["input_ids"])
        if rows % accum:
            raise ValueError(f"{rows} rows per process are not divisible by train.grad_accum={accum}")
        size = rows // accum
        parts = [
            prepare_batch(
                cfg,
                {k: (v[i * size : (i + 1) * size] if _is_rows(v, rows) else v) for k, v in batch.items()},
                1,
                processes,
            )
            for i in range(accum)
        ]
        return _stack(parts)
    ids = np.asarray(batch["input_ids"], np.int32)
    mask = np.asarray(batch["attention_mask"], np.int32)
    b = ids.shape[0]
    n = num_inputs(batch)
    grid = None
    out: dict[str, Any] = {"input_ids": ids}
    batched = False
    if n:
        pv = np.asarray(batch["pixel_values"])[:, :n]
        grid = np.asarray(batch["image_grid_thw"])[:, :n].reshape(-1, 3)
        batched = shares_one_grid(grid)
        if batched:  # (B * n, P, D): images in row order, each row's n images together
            out["pixel_values"] = pv.reshape((b * n,) + pv.shape[2:]).astype(np.float32)
        elif processes > 1:
            raise ValueError(
                f"batch mixes image grids {sorted({tuple(g) for g in grid})}: multi-process batches "
                "need one grid per batch (the pipeline's buckets give that)"
            )
        else:  # flat layout, cut each image's real patches out of its slot
            sizes = np.prod(grid, axis=-1)
            out["pixel_values"] = np.concatenate(
                [im[:k] for im, k in zip(pv.reshape((b * n,) + pv.shape[2:]), sizes)]
            ).astype(np.float32)
    host = prepare_inputs(cfg.vlm, ids, mask, grid, batched_images=batched)
    if batched:  # each row's image tokens are its own images' (what `rows_own_images` relies on)
        per_image = int(np.prod(grid[0])) // cfg.vlm.vision.merge_unit
        counts = ((ids == cfg.vlm.image_token_id) & (mask > 0)).sum(axis=1)
        if (counts != n * per_image).any():
            raise ValueError(
                f"rows hold {sorted(set(counts.tolist()))} image tokens; each of the {n} input images needs {per_image}"
            )
    queries = extend_position_ids(host["position_ids"], mask, cfg.num_queries)
    out["position_ids"] = np.concatenate([host["position_ids"], queries], axis=2).astype(np.int32)
    out["attention_mask"] = mask
    out["cond_index"] = condition_index(mask, cfg.num_queries, batch.get("prompt_start"))
    if "vision_plan" in host:
        out["vision_plan"] = host["vision_plan"]
    target = np.asarray(batch["target"], np.float32)
    out["target"] = target
    task_ids = np.asarray(batch.get("task_id", np.zeros(b)), np.int32)
    out["task_id"] = task_ids
    out["valid"] = np.asarray(batch.get("valid", np.ones(b, bool)), bool)
    if cfg.low_level and n:
        out["cond_images"] = np.asarray(batch["cond_images"], np.float32)[:, :n]
    out["img_ids"] = image_ids(cfg, task_ids, target.shape[1], target.shape[2], n)
    return out


def condition_index(mask: np.ndarray, num_queries: int, prompt_start: np.ndarray | None = None) -> np.ndarray:
    """(B, W + K) int32: the positions in the VLM sequence [prompt (T) ; K queries] that form
    each row's condition stream for the DiT, packed: its prompt tokens from `prompt_start`
    to its last real token, then its K kontext queries, then -1 (padding) to the width.

    `prompt_start` (B,) defaults to each row's first real token; the number of tokens it skips
    past the first real one (the template prefix every prompt shares) must be the same in
    every row, so W = T - that number is static. A row's stream does not depend on how much
    padding the batch has: its tokens come first, at the same places, whatever T is."""
    mask = np.asarray(mask) > 0
    b, t = mask.shape
    real = mask.sum(axis=1)
    if (real == 0).any():
        raise ValueError(f"rows {np.flatnonzero(real == 0).tolist()} of the batch have no prompt tokens")
    first = np.argmax(mask, axis=1)
    start = first if prompt_start is None else np.asarray(prompt_start, np.int64)
    skipped = start - first
    if len(set(skipped.tolist())) > 1 or skipped[0] < 0 or (skipped >= real).any():
        raise ValueError(
            f"prompt_start {start.tolist()} skips {skipped.tolist()} tokens of rows of {real.tolist()} tokens; "
            "every row must skip the same template prefix and keep at least one token"
        )
    width = t - int(skipped[0])
    count = (real - skipped)[:, None]
    j = np.arange(width + num_queries)[None]
    index = np.where(j < count, start[:, None] + j, np.where(j < count + num_queries, t + j - count, -1))
    return index.astype(np.int32)


def _is_rows(value, rows: int) -> bool:
    return isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == rows


def _stack(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key in parts[0]:
        if key == "vision_plan":
            out[key] = VisionPlan(*(np.stack(f) for f in zip(*(tuple(p[key]) for p in parts))))
        else:
            out[key] = np.stack([p[key] for p in parts])
    return out


# Which axis of each model-batch field is the sample axis (None: replicated).
_BATCH_AXIS = {"position_ids": 1, "vision_plan": None}


def place_batch(batch: Mapping[str, Any], mesh) -> dict[str, Any]:
    """Puts a prepared batch on the mesh: sample axes split over ('data', 'fsdp') (replicated
    when the sample count does not divide), the vision plan replicated; works with several
    processes (each passes its own rows)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    lead = 1 if batch["input_ids"].ndim == 3 else 0  # a leading micro-batch axis (grad accumulation)
    dp = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    rows = batch["input_ids"].shape[lead] * jax.process_count()
    if not dp or rows % int(np.prod([mesh.shape[a] for a in dp])):
        # e.g. sampling 2 prompts on 8 devices: replicate instead of splitting the samples
        # (training checks train.batch_size against the mesh at start).
        dp = None
    else:
        dp = dp[0] if len(dp) == 1 else dp

    def put(x, axis):
        x = np.asarray(x)
        if axis is None or dp is None:
            spec = P()
        else:
            spec = P(*([None] * (axis + lead)), dp)
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

    out = {}
    for key, value in batch.items():
        if key == "vision_plan":
            out[key] = VisionPlan(*(put(f, None) for f in value))
        else:
            out[key] = put(value, _BATCH_AXIS.get(key, 0))
    return out
