"""The grain input pipeline: records -> static-shape, tokenized, checkpointable batches.

    per mixture entry (dataset/task): tfds ArrayRecord source; one pass over the record
        headers gives each record's group (`grouping`: aspect bucket of the target, number of
        input images, text length: the shortest text bucket that holds its tokenized prompt)
    -> StepPlan        the global batch of every step, from (seed, step) alone: its group, drawn
                       by the groups' shares of the mixture, and the records filling it (each
                       part's records of the group, reshuffled every epoch)
    -> StepBatches     step s -> this process's rows of that batch; decode PNGs and resize +
                       centre-crop target and input images to the bucket; VLM-size copies
    -> map(Collate)    pad to image slots, run the VLM processor, stack to numpy
    -> mp_prefetch(workers)  optional worker processes (each takes every W-th step)

Hosts agree: every process computes the same plan, so at each step all of them build the
same group (the same batch shapes), and a process feeds rows [i * B, (i + 1) * B) of the
global batch, B = `data.batch_size` per process (with gradient accumulation, its share of
each micro-batch: `process_rows`). The global batch of a step, in order, is
therefore the same for any number of processes (1 x 8 devices and 2 x 4 train alike).
Any process may read any record (ArrayRecord is random access); the records a process
reads at a step are its rows of that step. The header pass reads every record once per
process at start-up.

Batch layout (B = `data.batch_size` per process, S = `data.image_slots`, T = the
batch's text length (one of `grouping.text_lengths(data.max_text_len, data.text_buckets)`: a batch
is padded to its group's length, not always to `data.max_text_len`), (H, W) = the batch's
bucket, P = patches of one VLM image at the bucket's VLM size, D = 3 * 2 * 14 * 14 for Qwen2.5-VL):

    target          (B, H, W, 3) float32 in [-1, 1]
    cond_images     (B, S, H, W, 3) float32 in [-1, 1]; source first, then references; zeros in empty slots
    cond_mask       (B, S) bool; every row of a batch has the same count (grouped by it)
    num_inputs      (B,) int32
    task_id         (B,) int32 (`vocab.TASK_IDS`)
    valid           (B,) bool; False only for padding rows of a final partial batch (finite epochs)
    input_ids       (B, T) int32, chat template + expanded image-pad tokens, padded on
                    `data.padding_side` (left by default: the kontext queries follow the prompt)
    attention_mask  (B, T) int32
    prompt_start    (B,) int32, where each row's prompt begins after the template prefix that
                    every prompt shares (`data.drop_template_prefix`; else its first token):
                    the DiT's condition stream starts there (`model_inputs.condition_index`)
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
step, per worker with `data.num_workers`), and `it.set_state(state)` on a freshly built
pipeline continues the exact sequence. The state is the same on every process and does not
depend on the number of processes, so a run may resume on another process count (same
`train.batch_size`, seed and data).
"""

from __future__ import annotations

import zlib

import grain
import ml_collections
import numpy as np

from qk_jax.data import buckets, builders, grouping, records, vlm_inputs, vocab

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
    # Text-length buckets: a batch is padded to the shortest of `text_buckets` lengths
    # (max_text_len, halved each time; `grouping.text_lengths`) that holds its group's prompts instead
    # of always to max_text_len, so the VLM and the DiT's condition stream do not carry the
    # padding. 1: every batch at max_text_len.
    c.text_buckets = 3
    # The DiT's condition stream starts after the chat-template prefix every prompt shares
    # (system prompt, user-turn header): the VLM reads it, the DiT gets nothing from it.
    c.drop_template_prefix = True
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


# Categorical draws come in blocks of this many, each from its own generator (seed, ..., block):
# any draw is reachable without drawing the whole stream again (see `_Draws`).
_BLOCK = 4096
# The length of an endless plan (grain needs one).
_ENDLESS = 2**62
# Records read (and prompts tokenized) at a time by the header pass.
_HEADER_CHUNK = 4096


class _Draws:
    """An endless stream of categorical draws c_0, c_1, ... with probabilities `probs`, each
    block of `_BLOCK` drawn from `np.random.default_rng((*seed, block))`. `at(q)` gives
    (c_q, rank), rank = #{q' < q : c_q' = c_q}: the position of draw q among the draws of its
    category. The running counts at block starts are kept (a few ints per block), the draws
    of the last few blocks too."""

    def __init__(self, probs, seed: tuple[int, ...]):
        self.probs = np.asarray(probs, np.float64) / np.sum(probs)
        self.seed = tuple(int(x) for x in seed)
        self._starts = [np.zeros(len(self.probs), np.int64)]  # counts per category before block b
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b not in self._blocks:
            k = len(self.probs)
            if k == 1:
                draws = np.zeros(_BLOCK, np.int64)
            else:
                draws = np.random.default_rng((*self.seed, b)).choice(k, size=_BLOCK, p=self.probs)
            ranks = np.zeros(_BLOCK, np.int64)
            for c in range(k):
                hit = draws == c
                ranks[hit] = np.arange(int(hit.sum()))
            if len(self._blocks) >= 4:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[b] = (draws, ranks)
        return self._blocks[b]

    def at(self, q: int) -> tuple[int, int]:
        b, i = divmod(int(q), _BLOCK)
        while len(self._starts) <= b:
            n = len(self._starts) - 1
            self._starts.append(self._starts[n] + np.bincount(self._block(n)[0], minlength=len(self.probs)))
        draws, ranks = self._block(b)
        c = int(draws[i])
        return c, int(self._starts[b][c] + ranks[i])


class StepPlan:
    """Which records make the global batch of each step: the same on every process, and
    independent of the number of processes.

    A group is an (aspect bucket, number of input images, text length) triple; one batch holds
    one group, so its shapes are static. The group of step s is drawn from (seed, s) with each group's
    share of the mixture (sum over the mixture's parts of part weight x fraction of the
    part's records in the group). Within a group, each sample position draws its part from
    (seed, group, position), weighted likewise, and takes that part's next record of the
    group, in an order reshuffled every epoch from (seed, part, group, epoch). So the global
    batch of step s is `records(s)`: `global_batch` (part, record index) pairs; a process
    feeds rows [process_index * B, (process_index + 1) * B) of it.

    With `num_epochs`, a part's records of a group are used at most that often: the plan ends
    at the first step that needs more, whose batch keeps the rows before that point (`length`,
    `valid_rows` of the last step); otherwise it is endless.
    """

    def __init__(
        self,
        members: list[dict[int, np.ndarray]],
        part_weights,
        part_seeds,
        groups,
        global_batch: int,
        seed: int,
        num_epochs: int | None,
    ):
        # members[p][g]: record indices of part p in group g (groups index `self.groups`)
        self.groups, self.members, self.global_batch = list(groups), members, int(global_batch)
        self.part_seeds, self.seed, self.num_epochs = list(part_seeds), int(seed), num_epochs
        share = np.zeros((len(members), len(self.groups)))
        for p, by_group in enumerate(members):
            total = sum(len(v) for v in by_group.values())
            for g, idx in by_group.items():
                share[p, g] = part_weights[p] * len(idx) / total
        self.group_parts = [np.flatnonzero(share[:, g] > 0) for g in range(len(self.groups))]
        self.steps = _Draws(share.sum(0), (self.seed, 0))
        self.within = [_Draws(share[self.group_parts[g], g], (self.seed, 1, g)) for g in range(len(self.groups))]
        self._orders: dict[tuple[int, int, int], np.ndarray] = {}
        self.length, self.valid_rows = _ENDLESS, self.global_batch
        if num_epochs is not None:
            self.length, self.valid_rows = self._finite_end()

    def group(self, step: int) -> int:
        return self.steps.at(step)[0]

    def _record(self, g: int, q: int) -> tuple[int, int] | None:
        """(part, record index) at position q of group g's stream; None past the epochs."""
        j, k = self.within[g].at(q)
        p = int(self.group_parts[g][j])
        idx = self.members[p][g]
        epoch, i = divmod(k, len(idx))
        if self.num_epochs is not None and epoch >= self.num_epochs:
            return None
        key = (p, g, epoch)
        if key not in self._orders:
            if len(self._orders) >= 64:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = np.random.default_rng((self.seed, 2, self.part_seeds[p], g, epoch)).permutation(idx)
        return p, int(self._orders[key][i])

    def records(self, step: int, rows: range | None = None) -> list[tuple[int, int] | None]:
        """The (part, record) pairs of the given rows (default all) of step `step`'s global
        batch; None for a padding row of the last step of a finite plan."""
        g, j = self.steps.at(step)
        rows = range(self.global_batch) if rows is None else rows
        valid = self.valid_rows if step == self.length - 1 else self.global_batch
        return [self._record(g, j * self.global_batch + r) if r < valid else None for r in rows]

    def _finite_end(self) -> tuple[int, int]:
        step = 0
        while True:
            g, j = self.steps.at(step)
            for r in range(self.global_batch):
                if self._record(g, j * self.global_batch + r) is None:
                    if r == 0:
                        raise ValueError("data.num_epochs: the plan ends before its first full batch")
                    return step + 1, r
            step += 1


class StepBatches(grain.MapDataset):
    """Step s -> this process's rows of the global batch of s (prepared samples, one group).

    A MapDataset indexed by step, so the iterator's state is the next step only: the same on
    every process and valid for any process count. Padding rows (finite plans) repeat the
    step's last valid sample with `padding` set."""

    def __init__(self, plan: StepPlan, parts: list, prepare: Prepare, rows: list[int]):
        super().__init__()
        self.plan, self.parts, self.prepare, self.rows = plan, parts, prepare, list(rows)

    def __len__(self) -> int:
        return self.plan.length

    def __getitem__(self, step):
        if isinstance(step, slice):
            return self.slice(step)
        step = int(step)
        picks = self.plan.records(step, self.rows)
        samples = [None if pick is None else self._sample(pick, step) for pick in picks]
        if any(s is None for s in samples):
            last = [pick for pick in self.plan.records(step) if pick is not None][-1]
            filler = dict(self._sample(last, step), padding=True)
            samples = [filler if s is None else s for s in samples]
        return samples

    def _sample(self, pick: tuple[int, int], step: int) -> dict:
        part, index = pick
        sample = self.prepare.map(self.parts[part][index])
        bucket, n, text_len = self.plan.groups[self.plan.group(step)]
        if sample["key"] != f"b{bucket}_n{n}":
            raise ValueError(
                f"record {sample['id']} changed: planned in bucket {bucket} with {n} inputs, read as {sample['key']}"
            )
        return dict(sample, text_len=text_len)

    def __str__(self) -> str:
        return f"StepBatches(global_batch={self.plan.global_batch}, rows={self.rows[0]}..{self.rows[-1]})"


def process_rows(batch_size: int, process_index: int, process_count: int, micro_batches: int = 1) -> list[int]:
    """The rows of the global batch (`batch_size * process_count` rows) that process
    `process_index` feeds, in its order: [i * B, (i + 1) * B) with B = `batch_size`; with
    gradient accumulation, its share of each micro-batch in turn, so that the micro-batch m
    a step assembles from every process's m-th chunk is rows [m * G / A, (m + 1) * G / A) of
    the global batch (G rows, A micro-batches), as on one process."""
    if batch_size % micro_batches:
        raise ValueError(f"{batch_size} rows per process are not divisible by {micro_batches} micro-batches")
    chunk, per_micro = batch_size // micro_batches, batch_size * process_count // micro_batches
    return [m * per_micro + process_index * chunk + r for m in range(micro_batches) for r in range(chunk)]


class Collate(grain.transforms.Map):
    """A list of prepared samples (one group) -> the static-shape numpy batch.

    The text length is the samples' planned `text_len` (training), else the shortest of
    `text_lengths` that holds their longest prompt (`collate_records`)."""

    def __init__(
        self,
        processor,
        image_slots: int,
        text_lengths: list[int],
        padding_side: str,
        geometry: dict,
        vlm_table,
        drop_template_prefix: bool,
    ):
        self.processor, self.image_slots, self.text_lengths = processor, image_slots, list(text_lengths)
        self.padding_side, self.geometry = padding_side, geometry
        self.patch_size, self.patch_dim = geometry["patch_size"], geometry["patch_dim"]
        self.vlm_table = list(vlm_table)
        self.prefix = np.asarray(vlm_inputs.template_prefix(processor) if drop_template_prefix else [], np.int64)

    def _text_len(self, samples: list[dict]) -> int:
        if "text_len" in samples[0]:
            return int(samples[0]["text_len"])
        rows = len(samples)
        counts = grouping.token_counts(
            self.processor,
            self.geometry,
            [smp["prompt"] for smp in samples],
            [len(samples[0]["cond"])] * rows,
            [self.vlm_table[samples[0]["bucket"]]] * rows,
        )
        longest = int(np.argmax(counts))
        if counts[longest] > self.text_lengths[-1]:  # sampling's records, which no header pass has read
            raise ValueError(
                f"record {samples[longest]['id']}: {counts[longest]} prompt tokens (image tokens count too) "
                f"exceed data.max_text_len={self.text_lengths[-1]}, the most this model was trained with; "
                "shorten the prompt"
            )
        return grouping.text_length(int(counts[longest]), self.text_lengths)

    def _prompt_start(self, ids: np.ndarray, mask: np.ndarray, samples: list[dict]) -> np.ndarray:
        """(B,) the index of each row's first token after the shared template prefix."""
        first = np.argmax(mask > 0, axis=1) if self.padding_side == "left" else np.zeros(len(ids), np.int64)
        p = len(self.prefix)
        for i, start in enumerate(first):
            if not np.array_equal(ids[i, start : start + p], self.prefix):
                raise ValueError(
                    f"record {samples[i]['id']}: its tokens do not start with the chat template's prefix "
                    f"{self.prefix.tolist()}; set data.drop_template_prefix=False for this processor"
                )
        return (first + p).astype(np.int32)

    def map(self, samples: list[dict]) -> dict[str, np.ndarray]:
        b, s = len(samples), self.image_slots
        n = len(samples[0]["cond"])
        h, w = samples[0]["target"].shape[:2]
        to_unit = lambda a: a.astype(np.float32) / 127.5 - 1.0
        cond = np.zeros((b, s, h, w, 3), np.float32)
        for i, smp in enumerate(samples):
            for j, im in enumerate(smp["cond"]):
                cond[i, j] = to_unit(im)
        text_len = self._text_len(samples)
        vlm = vlm_inputs.encode(
            self.processor,
            [smp["prompt"] for smp in samples],
            [smp["vlm"] for smp in samples],
            text_len,
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
        if ids.shape != (b, text_len):
            raise ValueError(f"processor returned input_ids {ids.shape}, expected {(b, text_len)}")
        mask = np.asarray(vlm["attention_mask"], np.int32)
        return {
            "target": np.stack([to_unit(smp["target"]) for smp in samples]),
            "cond_images": cond,
            "cond_mask": np.broadcast_to(np.arange(s) < n, (b, s)).copy(),
            "num_inputs": np.full((b,), n, np.int32),
            "task_id": np.asarray([smp["task_id"] for smp in samples], np.int32),
            "valid": np.asarray([not smp.get("padding", False) for smp in samples]),
            "input_ids": ids,
            "attention_mask": mask,
            "prompt_start": self._prompt_start(ids, mask, samples),
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
            "prompt": np.asarray([smp["prompt"] for smp in samples], dtype=object),
            "id": np.asarray([smp["id"] for smp in samples], dtype=object),
        }


def make_plan(config: ml_collections.ConfigDict, processor, process_count: int = 1) -> tuple[StepPlan, list]:
    """The `StepPlan` of the `data` config for `process_count` processes of `data.batch_size`
    rows each, and the sources of its parts (in mixture order). `processor` counts each
    record's prompt tokens (its text length)."""
    table, vlm_table = buckets.paired_tables(
        config.area, config.multiple, config.vlm_area, config.vlm_multiple, config.ratios
    )
    geometry = vlm_inputs.vision_geometry(processor)
    lengths = grouping.text_lengths(config.max_text_len, config.text_buckets)
    parts, members, weights, seeds = [], [], [], []
    groups: dict[tuple[int, int, int], int] = {}
    for name, task, weight in parse_mixture(config.mixture, config.dataset):
        source = builders.load_source(config.data_dir, name, task, config.split)
        if len(source) == 0:
            raise ValueError(f"{name}/{task} split {config.split} has no records")
        # one pass over the record headers and prompts (in chunks): the group of every record
        by_group: dict[tuple[int, int, int], list[int]] = {}
        for first in range(0, len(source), _HEADER_CHUNK):
            index = range(first, min(first + _HEADER_CHUNK, len(source)))
            recs = [records.normalize(source[i]) for i in index]
            for i, key in zip(
                index, grouping.record_groups(recs, table, vlm_table, lengths, processor, geometry, f"{name}/{task}")
            ):
                by_group.setdefault(key, []).append(i)
        parts.append(source)
        members.append({groups.setdefault(k, len(groups)): np.asarray(v) for k, v in sorted(by_group.items())})
        weights.append(weight)
        seeds.append(zlib.crc32(f"{name}/{task}".encode()))
    plan = StepPlan(
        members,
        weights,
        seeds,
        sorted(groups, key=groups.get),
        config.batch_size * process_count,
        config.seed,
        config.num_epochs,
    )
    return plan, parts


def make_dataset(
    config: ml_collections.ConfigDict,
    processor,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    micro_batches: int = 1,
) -> grain.IterDataset:
    """The pipeline of the module docstring as a grain IterDataset (iterate it, checkpoint its iterator).

    `config` is the `data` section (`default_config()`); `processor` follows
    `qk_jax.data.vlm_inputs.VLMProcessor` (e.g. `vlm_inputs.load_processor(folder)`).
    Process index / count default to JAX's. `micro_batches` (gradient accumulation) orders a
    process's rows by micro-batch (`process_rows`).
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
    plan, parts = make_plan(config, processor, process_count)
    prepare = Prepare(table, vlm_table, config.image_slots)
    batched = (
        StepBatches(plan, parts, prepare, process_rows(config.batch_size, process_index, process_count, micro_batches))
        .map(collator(config, processor, geo, vlm_table))
        .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    )
    if config.num_workers > 0:
        batched = batched.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size
            )
        )
    return batched


def collate_records(
    recs: list[dict], config: ml_collections.ConfigDict, processor, size: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """The batch the pipeline would make of `recs` (one group: same bucket and input count),
    without grain: sampling and evaluation preprocess exactly as training does.

    `size` = (height, width) puts every target (and input image) at exactly that size instead of
    its training bucket, the input images' VLM size following its aspect ratio as a bucket's
    does: sampling at a size the user chose."""
    if not recs:
        raise ValueError("collate_records: no records")
    table, vlm_table = buckets.paired_tables(
        config.area, config.multiple, config.vlm_area, config.vlm_multiple, config.ratios
    )
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if size in table:  # a training bucket: exactly training's VLM size too
            vlm_size = vlm_table[table.index(size)]
        else:
            vlm_size = buckets.bucket_size(f"{size[0]}:{size[1]}", config.vlm_area, config.vlm_multiple)
        table, vlm_table = [size], [vlm_size]
    geo = vlm_inputs.vision_geometry(processor)
    samples = [Prepare(table, vlm_table, config.image_slots).map(r) for r in recs]
    keys = sorted({s["key"] for s in samples})
    if len(keys) > 1:
        raise ValueError(
            f"collate_records: records fall into several groups {keys} (size / input count); "
            "collate each group separately"
        )
    return collator(config, processor, geo, vlm_table).map(samples)


def collator(config: ml_collections.ConfigDict, processor, geo: dict, vlm_table) -> Collate:
    """The `Collate` of a data config (training and `collate_records` alike)."""
    return Collate(
        processor,
        config.image_slots,
        grouping.text_lengths(config.max_text_len, config.text_buckets),
        config.padding_side,
        geo,
        vlm_table,
        config.drop_template_prefix,
    )
