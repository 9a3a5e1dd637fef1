"""The group of a record: the unit a step's batch is drawn from, one set of static shapes.

    group = (aspect bucket of the target, number of input images, text length)

The text length is the shortest of `text_lengths(data.max_text_len, data.text_buckets)` that
holds the record's tokenized prompt, the tokens of its input images included. It is counted
from the prompt and the images' headers alone (no image is decoded or processed), so the step
plan can group every record at start-up, and every host groups them alike.
"""

from __future__ import annotations

import numpy as np

from qk_jax.data import buckets, records, vlm_inputs


def text_lengths(max_text_len: int, num_buckets: int) -> list[int]:
    """The padded text lengths a batch may take, ascending: `max_text_len` halved
    `num_buckets - 1` times, each rounded up to a multiple of 8 (at least 8)."""
    if num_buckets < 1:
        raise ValueError(f"data.text_buckets={num_buckets} must be >= 1")
    if max_text_len < 1:
        raise ValueError(f"data.max_text_len={max_text_len} must be >= 1")
    out = {int(max_text_len)}
    for k in range(1, num_buckets):
        out.add(min(int(max_text_len), max(8, -(-max_text_len // 2**k // 8) * 8)))
    return sorted(out)


def text_length(length: int, lengths) -> int:
    """The shortest of `lengths` (ascending) that holds `length` tokens."""
    for candidate in lengths:
        if length <= candidate:
            return candidate
    raise ValueError(f"{length} tokens exceed data.max_text_len={lengths[-1]}")


def token_counts(processor, geometry: dict, prompts: list[str], input_counts: list[int], vlm_sizes) -> np.ndarray:
    """(R,) the unpadded VLM token count of each row: its templated prompt plus `input_counts[i]`
    images of `vlm_sizes[i]` (the VLM size of its bucket)."""
    per_image = [vlm_inputs.tokens_per_image(geometry, vh, vw) for vh, vw in vlm_sizes]
    return vlm_inputs.row_lengths(processor, prompts, input_counts, per_image)


def image_group(rec: dict, table) -> tuple[int, int]:
    """(aspect bucket of the target, number of input images) of a normalized record; reads the
    target's header only."""
    h, w = records.image_size(rec["target"])
    return buckets.choose_bucket(h, w, table), records.num_inputs(rec)


def record_groups(
    recs: list[dict], table, vlm_table, lengths: list[int], processor, geometry: dict, where: str
) -> list[tuple[int, int, int]]:
    """The group of each normalized record of `where` (a dataset/task, for errors). A prompt
    longer than the longest of `lengths` is refused here, naming its record, not mid-run."""
    image_groups = [image_group(rec, table) for rec in recs]
    counts = token_counts(
        processor,
        geometry,
        [r["prompt"] for r in recs],
        [n for _, n in image_groups],
        [vlm_table[b] for b, _ in image_groups],
    )
    for rec, count in zip(recs, counts):
        if count > lengths[-1]:
            raise ValueError(
                f"{where} record {rec['id']}: {count} prompt tokens (image tokens count too) "
                f"exceed data.max_text_len={lengths[-1]}; raise data.max_text_len"
            )
    return [(b, n, text_length(int(c), lengths)) for (b, n), c in zip(image_groups, counts)]
