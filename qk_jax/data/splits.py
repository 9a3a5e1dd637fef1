"""Train / validation / test splits and the held-out compositions.

- `train` and `validation` are in-distribution: no image of a record (target, source or
  reference) contains a held-out colour-shape pair or a held-out object combination.
- `test` measures generalisation: every record asks for at least one held-out
  composition (its target, or for edits its source or target, contains one), and the
  text-to-image prompts of the test split always state the colours they ask for.

Held-out colour-shape pairs (never drawn in train/validation):
    red star, blue hexagon, yellow triangle, purple circle, cyan square.
Held-out object combinations (never drawn together in one train/validation image):
    {green circle, orange square}, {magenta triangle, blue star}, {yellow hexagon, red square}.

Records are seeded per (seed, split, task, index), so a split is reproducible on its
own and train and validation never share a random stream.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from qk_jax.data import vocab

SPLITS = ("train", "validation", "test")

HELD_OUT_PAIRS = frozenset(
    {("red", "star"), ("blue", "hexagon"), ("yellow", "triangle"), ("purple", "circle"), ("cyan", "square")}
)
HELD_OUT_COMBOS = (
    frozenset({("green", "circle"), ("orange", "square")}),
    frozenset({("magenta", "triangle"), ("blue", "star")}),
    frozenset({("yellow", "hexagon"), ("red", "square")}),
)


def pair_allowed_in_training(colour: str, shape: str) -> bool:
    return (colour, shape) not in HELD_OUT_PAIRS


def held_out_in(keys: Iterable[tuple[str, str]]) -> bool:
    """Whether one image's (colour, shape) keys contain a held-out pair or combination."""
    keys = set(keys)
    return bool(keys & HELD_OUT_PAIRS) or any(combo <= keys for combo in HELD_OUT_COMBOS)


def scene_keys(scene: dict) -> set[tuple[str, str]]:
    return {(o["colour"], o["shape"]) for o in scene["objects"]}


def record_held_out(graph: dict) -> bool:
    """Whether any image of a record's scene graph (`target`, `source`, `references`) is held out."""
    scenes = [graph["target"]] + ([graph["source"]] if graph.get("source") else []) + list(graph.get("references", []))
    return any(held_out_in(scene_keys(s)) for s in scenes)


def accepts(split: str, graph: dict) -> bool:
    """Whether a sampled record belongs to `split` (the generator resamples until it does)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return record_held_out(graph) if split == "test" else not record_held_out(graph)


def record_rng(seed: int, split: str, task: str, index: int) -> np.random.Generator:
    """The numpy Generator of one record: independent of every other record and of global state."""
    return np.random.default_rng([seed, SPLITS.index(split), vocab.TASK_IDS[task], index])
