"""`qk-jax data <command>`: make datasets.

qk-jax data shapes --out DIR --num N [--size 64 | --height H --width W] [--seed S]
                   [--tasks t2i,edit,...] [--num_eval M] [--workers W]
    Generates Kontext-Shapes: N train records per task, M (default N/10) validation
    and test (held-out compositions) records, as ArrayRecord datasets
    DIR/kontext_shapes/<task>/1.0.0.
qk-jax data import --manifest FILE.jsonl --out DIR [--name imported] [--threads T]
    Validates a JSONL manifest (see qk_jax/data/importer.py) and writes
    DIR/<name>/<task>/1.0.0; bad records are skipped and reported.
qk-jax data inspect --data_dir DIR [--name kontext_shapes] [--split train] [--num 3]
    Prints the record counts and a few records of every task.
"""

from __future__ import annotations

import json
import sys
import time

from absl import flags

from qk_jax import logs
from qk_jax.data import vocab

COMMANDS = ("shapes", "import", "inspect")

_OUT = flags.DEFINE_string("out", None, "shapes/import: output data directory (local path or gs://...).")
_NUM = flags.DEFINE_integer("num", 1000, "shapes: train records per task; inspect: records to show per task.")
_NUM_EVAL = flags.DEFINE_integer(
    "num_eval", None, "shapes: validation and test records per task (default num/10).", lower_bound=0
)
_SIZE = flags.DEFINE_integer("size", 64, "shapes: image side for square images.")
_HEIGHT = flags.DEFINE_integer("height", None, "shapes: image height (non-square; overrides --size).")
_WIDTH = flags.DEFINE_integer("width", None, "shapes: image width (non-square; overrides --size).")
_SEED = flags.DEFINE_integer(
    "seed", 0, "shapes: dataset seed (every record is seeded by seed, split, task, index).", lower_bound=0
)
_TASKS = flags.DEFINE_list("tasks", list(vocab.TASKS), f"shapes: tasks to generate, from {list(vocab.TASKS)}.")
_WORKERS = flags.DEFINE_integer("workers", 1, "shapes: generator processes.", lower_bound=0)
_PLAIN = flags.DEFINE_float(
    "plain_background",
    vocab.PLAIN_BACKGROUND,
    "shapes: probability of an untextured background (the rest: stripes, checker, noise, gradient).",
)
_MANIFEST = flags.DEFINE_string("manifest", None, "import: JSONL manifest, one record per line.")
_NAME = flags.DEFINE_string(
    "name", None, "import: dataset name (default 'imported'); inspect: dataset name (default 'kontext_shapes')."
)
_THREADS = flags.DEFINE_integer("threads", 8, "import: threads reading and validating images.", lower_bound=1)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "inspect: data directory.")
_SPLIT = flags.DEFINE_string("split", "train", "inspect: split.")


def _fail(message: str) -> None:
    print(f"qk-jax data: {message}", file=sys.stderr)
    raise SystemExit(2)


def shapes() -> None:
    from qk_jax.data import builders

    if not _OUT.value:
        _fail("shapes needs --out DIR")
    if not _TASKS.value:
        _fail(f"--tasks is empty; choose from {list(vocab.TASKS)}")
    unknown = [t for t in _TASKS.value if t not in vocab.TASKS]
    if unknown:
        _fail(f"unknown --tasks {unknown}; choose from {list(vocab.TASKS)}")
    height = _HEIGHT.value or _SIZE.value
    width = _WIDTH.value or _SIZE.value
    if min(height, width) < 32:
        _fail(f"images of {height}x{width} are too small to draw and judge; use at least 32 (64 recommended)")
    if _NUM.value < 1:
        _fail("--num must be >= 1")
    if min(height, width) < 64:
        logs.warning(
            f"at {height}x{width} small objects and subject textures are only a few pixels; the judge "
            f"is reliable from 64 px on the short side (see BENCHMARKS.md)"
        )
    start = time.time()
    for task in _TASKS.value:
        counts = builders.build_shapes(
            _OUT.value,
            [task],
            num=_NUM.value,
            num_eval=_NUM_EVAL.value,
            height=height,
            width=width,
            seed=_SEED.value,
            workers=_WORKERS.value,
            plain_background=_PLAIN.value,
        )
        print(f"{task}: " + ", ".join(f"{s}={n}" for s, n in counts[task].items()), flush=True)
    print(
        f"Kontext-Shapes {height}x{width} written to {_OUT.value}/{builders.SHAPES_NAME} in {time.time() - start:.1f} s"
    )


def import_() -> None:
    from qk_jax.data import importer

    if not _MANIFEST.value or not _OUT.value:
        _fail("import needs --manifest FILE.jsonl and --out DIR")
    try:
        report = importer.import_manifest(
            _MANIFEST.value, _OUT.value, name=_NAME.value or "imported", threads=_THREADS.value
        )
    except importer.ManifestError as e:
        _fail(str(e))
    print(report.summary())


def inspect() -> None:
    from qk_jax.data import builders, records

    if not _DATA_DIR.value:
        _fail("inspect needs --data_dir DIR")
    name = _NAME.value or builders.SHAPES_NAME
    for task in vocab.TASKS:
        if builders.dataset_dir(_DATA_DIR.value, name, task) is None:
            continue
        src = builders.load_source(_DATA_DIR.value, name, task, _SPLIT.value)
        print(f"{name}/{task} [{_SPLIT.value}]: {len(src)} records")
        for i in range(min(_NUM.value, len(src))):
            rec = records.normalize(src[i])
            size = records.image_size(rec["target"])
            print(
                "  "
                + json.dumps(
                    {
                        "id": rec["id"],
                        "category": rec["category"],
                        "prompt": rec["prompt"],
                        "target": f"{size[0]}x{size[1]}",
                        "inputs": records.num_inputs(rec),
                    }
                )
            )


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    if len(argv) > 2:
        _fail(f"unexpected arguments {argv[2:]}")
    {"shapes": shapes, "import": import_, "inspect": inspect}[argv[1]]()


if __name__ == "__main__":
    from absl import app

    app.run(main)
