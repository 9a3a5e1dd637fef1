"""`qk-jax eval <command>`: the automatic judge of Kontext-Shapes generations.

qk-jax eval detect IMAGE [IMAGE ...]
    Prints one JSON list per image (one line each) of the objects found:
    shape, colour, centre (x, y in 0..1), size (small/medium/large, area fraction), ...
qk-jax eval score --data_dir DIR --images FOLDER [--split test] [--tasks t2i,edit]
                  [--dataset kontext_shapes] [--limit N] [--out report.json]
    Scores FOLDER/<record id>.png against each record's scene graph; prints the
    score per task and category and overall (last line).
qk-jax eval score --data_dir DIR --self_check target|blank|noise|blur|jpeg|...
    Scores the dataset's own targets (optionally degraded), blank or noise images
    instead of a folder: the judge's sanity check (targets ~1, blank/noise ~0).
"""

from __future__ import annotations

import json
import sys
import zlib

import numpy as np
from absl import flags

from qk_jax import paths
from qk_jax.data import vocab

COMMANDS = ("detect", "score")

_DATA_DIR = flags.DEFINE_string("data_dir", None, "score: directory holding the datasets.")
_DATASET = flags.DEFINE_string("dataset", "kontext_shapes", "score: dataset name.")
_SPLIT = flags.DEFINE_string("split", "test", "score: split (test = held-out compositions).")
_TASKS = flags.DEFINE_list("tasks", list(vocab.TASKS), "score: tasks to score (those built).")
_IMAGES = flags.DEFINE_string("images", None, "score: folder of generations named <record id>.png.")
_SELF_CHECK = flags.DEFINE_string(
    "self_check",
    None,
    "score: instead of --images, score the targets "
    "('target'), a degradation of them (blur, noise, jpeg, quantise, colour_shift, "
    "combined), or 'blank' / 'noise_image'.",
)
_LIMIT = flags.DEFINE_integer("limit", None, "score: at most this many records per task.", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "score: write the full JSON report here.")


def _fail(message: str) -> None:
    print(f"qk-jax eval: {message}", file=sys.stderr)
    raise SystemExit(2)


def detect_images(paths: list[str]) -> None:
    from etils import epath

    from qk_jax.data import records
    from qk_jax.eval import detect

    if not paths:
        _fail("detect needs at least one IMAGE")
    for path in paths:
        p = epath.Path(path)
        if not p.exists():
            _fail(f"image {path} does not exist")
        try:
            img = records.decode_image(p.read_bytes())
        except Exception as e:  # noqa: BLE001 - PIL raises several types
            _fail(f"image {path} cannot be decoded: {e}")
        print(json.dumps([d.to_json() for d in detect.detect(img)]), flush=True)


def _self_check_fn(kind: str):
    from qk_jax.data import records
    from qk_jax.eval import degrade

    def image_fn(rec):
        img = records.decode_image(rec["target"])
        seed = zlib.crc32(rec["id"].encode())
        if kind == "target":
            return img
        if kind == "blank":
            return np.full_like(img, 128)
        if kind == "noise_image":
            return np.random.default_rng(seed).integers(0, 256, img.shape, dtype=np.uint8)
        if kind == "combined":
            return degrade.combined(img, seed=seed)
        return degrade.DEGRADATIONS[kind](img, seed=seed)

    valid = {"target", "blank", "noise_image", "combined", *degrade.DEGRADATIONS}
    if kind not in valid:
        _fail(f"--self_check {kind!r}: choose from {sorted(valid)}")
    return image_fn


def score() -> None:
    from qk_jax.data import builders
    from qk_jax.eval import score as score_lib

    if not _DATA_DIR.value:
        _fail("score needs --data_dir DIR")
    if bool(_IMAGES.value) == bool(_SELF_CHECK.value):
        _fail("score needs exactly one of --images FOLDER or --self_check KIND")
    image_fn = _self_check_fn(_SELF_CHECK.value) if _SELF_CHECK.value else score_lib.folder_images(_IMAGES.value)
    if _OUT.value:  # a report that cannot be written fails now, not after the scoring
        try:
            paths.check_output_file(_OUT.value)
        except paths.OutputError as e:
            _fail(str(e))
    recs = []
    for task in _TASKS.value:
        if task not in vocab.TASKS:
            _fail(f"unknown task {task!r}; choose from {list(vocab.TASKS)}")
        if builders.dataset_dir(_DATA_DIR.value, _DATASET.value, task) is None:
            continue
        src = builders.load_source(_DATA_DIR.value, _DATASET.value, task, _SPLIT.value)
        n = len(src) if _LIMIT.value is None else min(_LIMIT.value, len(src))
        recs += [src[i] for i in range(n)]
    if not recs:
        _fail(f"no records of {_TASKS.value} in {_DATA_DIR.value}/{_DATASET.value} split {_SPLIT.value}")
    report = score_lib.score_records(recs, image_fn, progress=True)
    width = max(len(k) for k in report["per_category"]) + 2
    for key, value in report["per_category"].items():
        print(f"  {key.ljust(width)} {value:.3f}")
    for key, value in report["per_task"].items():
        print(f"{key.ljust(width + 2)} {value:.3f}")
    if _OUT.value:
        paths.write_text(_OUT.value, json.dumps(report, indent=1))
    print(f"overall {report['overall']:.3f} on {report['n']} records ({report['missing']} images missing)")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    if argv[1] == "detect":
        detect_images(argv[2:])
    else:
        if len(argv) > 2:
            _fail(f"unexpected arguments {argv[2:]}")
        score()


if __name__ == "__main__":
    from absl import app

    app.run(main)
