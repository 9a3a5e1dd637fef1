"""The grain input pipeline: records -> static-shape, tokenized, checkpointable batches.

    per mixture entry (dataset/task):  tfds ArrayRecord source -> this process's shard
        (`[process_index::process_count]`) -> shuffle (its own seed) -> repeat
    -> MapDataset.mix(weights from `data.mixture`)       deterministic interleave by weight
    -> map(Prepare)          decode PNGs; choose the aspect-ratio bucket of the target;
                             resize + centre-crop target and input images to it; VLM-size copies
    -> BucketBatch           group by (bucket, number of input images), emit a batch when a
                             group holds `batch_size` samples (static shapes)
    -> map(Collate)          pad to image slots, run the VLM processor, stack to numpy
    -> mp_prefetch(workers)  optional worker processes

Batch layout (B = `data.batch_size` per process, S = `data.image_slots`, T =
`data.max_text_len`, (H, W) = the batch's bucket, P = patches of one VLM image at the
bucket's VLM size, D = 3 * 2 * 14 * 14 for Qwen2.5-VL):

    target          (B, H, W, 3) float32 in [-1, 1]
    cond_images     (B, S, H, W, 3) float32 in [-1, 1]; source first, then references; zeros in empty slots
    cond_mask       (B, S) bool; every row of a batch has the same count (grouped by it)
    num_inputs      (B,) int32
    task_id         (B,) int32 (`vocab.TASK_IDS`)
    valid           (B,) bool; False only for padding rows of a final partial batch (finite epochs)
    input_ids       (B, T) int32, chat template + expanded image-pad tokens, padded on
                    `data.padding_side` (left by default: the kontext queries follow the prompt)
    attention_mask  (B, T) int32
    pixel_values    (B, S, P, D) float32, the VLM patches of each slot (zeros in empty slots)
    image_grid_thw  (B, S, 3) int32, zeros in empty slots
    prompt, id      (B,) object arrays of str (drop them before `jax.device_put`)

The VLM features of the valid slots, sample by sample and in slot order, fill the
image-pad positions of `input_ids`; `vlm_inputs.flat_vlm_inputs(batch)` gives them as the
flat `pixel_values` (B * n * P, D) / `image_grid_thw` (B * n, 3) the VLM takes. Because a
batch never mixes input counts, a step may also slice `[:, :n]` with
`n = int(batch["cond_mask"][0].sum())` outside jit, compiling once per n.

Augmentation is deliberately absent: flips or crops would break the prompts' relations
and grid cells. Resizing is deterministic (cover, then centre crop).

The iterator is checkpointable: `it.get_state()` is a JSON-serialisable dict (the next
index of each worker's slice and the indices, not the pixels, of samples waiting in a
group), and `it.set_state(state)` on a freshly built pipeline continues the exact sequence.
"""

from __future__ import annotations

import zlib
from typing import Any

import grain
import ml_collections
import numpy as np

from qk_jax.data import buckets, builders, records, vlm_inputs, vocab

# Task weights per training stage (docs/design.md, "The three stages"); a config may override any of them.
STAGE_MIXTURES = {
    1: {"t2i": 0.6, "reconstruction": 0.2, "transformation": 0.2},
    2: {"t2i": 0.8, "reconstruction": 0.2},
    3: {
        "t2i": 0.3,
        "edit": 0.3,
        "customization": 0.15,
        "multi_subject": 0.1,
        "reconstruction": 0.05,
        "transformation": 0.1,
    },
}


def default_config(stage: int | None = None) -> ml_collections.ConfigDict:
    """The `data` section of a training config, with defaults (and the stage's mixture)."""
    c = ml_collections.ConfigDict()
    c.data_dir = ""
    c.dataset = builders.SHAPES_NAME  # tfds name for mixture keys without "name/"
    c.split = "train"
    c.mixture = dict(STAGE_MIXTURES[stage]) if stage else {"t2i": 1.0}  # task (or "dataset/task") -> weight
    c.batch_size = 8  # per process
    c.area = 64 * 64  # target pixels per image
    c.multiple = 16  # bucket sides are multiples of this (8x VAE x 2x2 patches)
    c.ratios = buckets.RATIOS
    c.vlm_area = 84 * 84  # pixels of each input image as the VLM sees it
    c.vlm_multiple = 28  # Qwen2.5-VL: 14px patches merged 2x2
    c.image_slots = vocab.MAX_REFERENCES  # static number of input-image slots
    c.max_text_len = 128
    c.padding_side = "left"  # kontext queries are appended after the prompt: pad on the left
    c.seed = 0
    # None: repeat forever. A number: each component repeats that often and the mixture ends
    # when its first component runs out (grain's `mix`); the last batches of each group are
    # then padded, with `valid` False on the padding rows.
    c.num_epochs = ml_collections.config_dict.placeholder(int)
    c.num_workers = 0
    c.worker_buffer_size = 2
    return c


def parse_mixture(mixture, default_dataset: str) -> list[tuple[str, str, float]]:
    """`{"t2i": 0.5, "imported/edit": 0.5}` -> [(dataset, task, weight)], validated."""
    items = dict(mixture).items()
    if not items:
        raise ValueError("data.mixture is empty: give at least one task weight")
    out = []
    for key, weight in items:
        name, _, task = key.rpartition("/")
        if task not in vocab.TASKS:
            raise ValueError(f"data.mixture key {key!r}: unknown task {task!r}; expected one of {vocab.TASKS}")
        if not float(weight) > 0:
            raise ValueError(f"data.mixture[{key!r}] = {weight}: weights must be > 0 (leave a task out instead)")
        out.append((name or default_dataset, task, float(weight)))
    return out


class Prepare(grain.transforms.Map):
    """Record -> decoded sample resized into its bucket (see the module docstring)."""

    def __init__(self, table, vlm_table, image_slots: int):
        self.table, self.vlm_table, self.image_slots = list(table), list(vlm_table), image_slots

    def map(self, raw: dict) -> dict:
        rec = records.normalize(raw)
        target = records.decode_image(rec["target"])
        b = buckets.choose_bucket(target.shape[0], target.shape[1], self.table)
        size, vlm_size = self.table[b], self.vlm_table[b]
        inputs = [records.decode_image(rec["source"])] if rec["source"] else []
        inputs += [records.decode_image(r) for r in rec["references"]]
        if len(inputs) > self.image_slots:
            raise ValueError(f"record {rec['id']}: {len(inputs)} input images > data.image_slots {self.image_slots}")
        return {
            "key": f"b{b}_n{len(inputs)}",
            "bucket": b,
            "id": rec["id"],
            "prompt": rec["prompt"],
            "task_id": vocab.TASK_IDS[rec["task"]],
            "target": buckets.resize_crop(target, size),
            "cond": [buckets.resize_crop(im, size) for im in inputs],
            "vlm": [buckets.resize_crop(im, vlm_size) for im in inputs],
        }


class BucketBatch(grain.IterDataset):
    """Groups samples of a MapDataset by `key` into batches of `batch_size`.

    It reads the MapDataset by index itself (start, start + step, ...), so grain's worker
    sharding (`set_slice`) gives each worker its own indices and the state holds only
    integers: the position and the indices buffered per group, re-read on `set_state`.
    """

    def __init__(self, parent: grain.MapDataset, batch_size: int):
        super().__init__(parent)
        self.batch_size = batch_size
        self.start, self.step = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        if sequential_slice:
            raise ValueError("BucketBatch supports strided worker slices only")
        start, step = sl.start or 0, sl.step or 1
        self.start, self.step = self.start + start * self.step, self.step * step

    def __iter__(self):
        return _BucketBatchIterator(self)

    def __str__(self) -> str:
        return f"BucketBatch(batch_size={self.batch_size}, start={self.start}, step={self.step})"


class _BucketBatchIterator(grain.DatasetIterator):
    def __init__(self, ds: BucketBatch):
        super().__init__()
        self._ds, self._source = ds, ds._parent
        self._length = len(self._source)
        self._pos = 0  # next position k: index start + k * step
        self._buffers: dict[str, list[tuple[int, Any]]] = {}

    def __next__(self):
        bs = self._ds.batch_size
        while True:
            index = self._ds.start + self._pos * self._ds.step
            if index >= self._length:
                break
            self._pos += 1
            sample = self._source[index]
            buf = self._buffers.setdefault(sample["key"], [])
            buf.append((index, sample))
            if len(buf) == bs:
                del self._buffers[sample["key"]]
                return [s for _, s in buf]
        for key in sorted(self._buffers):  # end of a finite dataset: partial batches, padded
            buf = self._buffers.pop(key)
            if buf:
                samples = [s for _, s in buf]
                return samples + [dict(samples[-1], padding=True)] * (bs - len(samples))
        raise StopIteration

    def get_state(self) -> dict:
        return {"pos": int(self._pos), "buffers": {k: [int(i) for i, _ in v] for k, v in sorted(self._buffers.items())}}

    def set_state(self, state: dict) -> None:
        self._pos = int(state["pos"])
        self._buffers = {k: [(int(i), self._source[int(i)]) for i in v] for k, v in state["buffers"].items()}


class Collate(grain.transforms.Map):
    """A list of prepared samples (one group) -> the static-shape numpy batch."""

    def __init__(
        self,
        processor,
        image_slots: int,
        max_text_len: int,
        padding_side: str,
        patch_size: int,
        patch_dim: int,
        vlm_table,
    ):
        self.processor, self.image_slots, self.max_text_len = processor, image_slots, max_text_len
        self.padding_side, self.patch_size, self.patch_dim = padding_side, patch_size, patch_dim
        self.vlm_table = list(vlm_table)

    def map(self, samples: list[dict]) -> dict[str, np.ndarray]:
        b, s = len(samples), self.image_slots
        n = len(samples[0]["cond"])
        h, w = samples[0]["target"].shape[:2]
        to_unit = lambda a: a.astype(np.float32) / 127.5 - 1.0
        cond = np.zeros((b, s, h, w, 3), np.float32)
        for i, smp in enumerate(samples):
            for j, im in enumerate(smp["cond"]):
                cond[i, j] = to_unit(im)
        vlm = vlm_inputs.encode(
            self.processor,
            [smp["prompt"] for smp in samples],
            [smp["vlm"] for smp in samples],
            self.max_text_len,
            self.padding_side,
        )
        vh, vw = self.vlm_table[samples[0]["bucket"]]
        patches = (vh // self.patch_size) * (vw // self.patch_size)
        pixel_values = np.zeros((b, s, patches, self.patch_dim), np.float32)
        grid = np.zeros((b, s, 3), np.int32)
        if n:
            if not (np.asarray(vlm["image_grid_thw"]).prod(-1) == patches).all():
                raise ValueError(
                    f"the processor resized the {vh}x{vw} VLM images (grids {vlm['image_grid_thw']}); "
                    f"its min/max pixels must admit data.vlm_area"
                )
            pixel_values[:, :n] = np.asarray(vlm["pixel_values"], np.float32).reshape(b, n, patches, -1)
            grid[:, :n] = np.asarray(vlm["image_grid_thw"]).reshape(b, n, 3)
        ids = np.asarray(vlm["input_ids"], np.int32)
        if ids.shape != (b, self.max_text_len):
            raise ValueError(f"processor returned input_ids {ids.shape}, expected {(b, self.max_text_len)}")
        return {
            "target": np.stack([to_unit(smp["target"]) for smp in samples]),
            "cond_images": cond,
            "cond_mask": np.broadcast_to(np.arange(s) < n, (b, s)).copy(),
            "num_inputs": np.full((b,), n, np.int32),
            "task_id": np.asarray([smp["task_id"] for smp in samples], np.int32),
            "valid": np.asarray([not smp.get("padding", False) for smp in samples]),
            "input_ids": ids,
            "attention_mask": np.asarray(vlm["attention_mask"], np.int32),
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
            "prompt": np.asarray([smp["prompt"] for smp in samples], dtype=object),
            "id": np.asarray([smp["id"] for smp in samples], dtype=object),
        }


def make_dataset(
    config: ml_collections.ConfigDict, processor, *, process_index: int | None = None, process_count: int | None = None
) -> grain.IterDataset:
    """The pipeline of the module docstring as a grain IterDataset (iterate it, checkpoint its iterator).

    `config` is the `data` section (`default_config()`); `processor` follows
    `qk_jax.data.vlm_inputs.VLMProcessor` (e.g. `vlm_inputs.load_processor(folder)`).
    Process index / count default to JAX's.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if config.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {config.batch_size}")
    if config.padding_side not in ("left", "right"):
        raise ValueError(f"data.padding_side={config.padding_side!r}: use 'left' or 'right'")
    table, vlm_table = buckets.paired_tables(
        config.area, config.multiple, config.vlm_area, config.vlm_multiple, config.ratios
    )
    geo = vlm_inputs.vision_geometry(processor)
    unit = geo["patch_size"] * geo["merge_size"]
    if config.vlm_multiple % unit:
        raise ValueError(
            f"data.vlm_multiple={config.vlm_multiple} must be a multiple of the VLM's patch * merge = {unit}"
        )
    for vh, vw in vlm_table:
        if not geo["min_pixels"] <= vh * vw <= geo["max_pixels"]:
            raise ValueError(
                f"data.vlm_area={config.vlm_area} gives a {vh}x{vw} VLM image outside the processor's "
                f"[{geo['min_pixels']}, {geo['max_pixels']}] pixels; change data.vlm_area"
            )
    parts, weights = [], []
    for name, task, weight in parse_mixture(config.mixture, config.dataset):
        source = builders.load_source(config.data_dir, name, task, config.split)
        ds = grain.MapDataset.source(source)[process_index::process_count]
        if len(ds) == 0:
            raise ValueError(
                f"{name}/{task} split {config.split} has {len(source)} records: "
                f"none for process {process_index} of {process_count}"
            )
        ds = ds.shuffle(seed=(config.seed * 1_000_003 + zlib.crc32(f"{name}/{task}".encode())) % 2**31)
        parts.append(ds.repeat(config.num_epochs))
        weights.append(weight)
    mixed = grain.MapDataset.mix(parts, weights) if len(parts) > 1 else parts[0]
    prepared = mixed.map(Prepare(table, vlm_table, config.image_slots))
    batched = BucketBatch(prepared, config.batch_size).map(
        Collate(
            processor,
            config.image_slots,
            config.max_text_len,
            config.padding_side,
            geo["patch_size"],
            geo["patch_dim"],
            vlm_table,
        )
    )
    if config.num_workers > 0:
        batched = batched.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size
            )
        )
    return batched


def collate_records(recs: list[dict], config: ml_collections.ConfigDict, processor) -> dict[str, np.ndarray]:
    """The batch the pipeline would make of `recs` (one group: same bucket and input count),
    without grain: sampling and evaluation preprocess exactly as training does."""
    if not recs:
        raise ValueError("collate_records: no records")
    table, vlm_table = buckets.paired_tables(
        config.area, config.multiple, config.vlm_area, config.vlm_multiple, config.ratios
    )
    geo = vlm_inputs.vision_geometry(processor)
    samples = [Prepare(table, vlm_table, config.image_slots).map(r) for r in recs]
    keys = sorted({s["key"] for s in samples})
    if len(keys) > 1:
        raise ValueError(
            f"collate_records: records fall into several groups {keys} (size / input count); "
            "collate each group separately"
        )
    return Collate(
        processor,
        config.image_slots,
        config.max_text_len,
        config.padding_side,
        geo["patch_size"],
        geo["patch_dim"],
        vlm_table,
    ).map(samples)
