"""tensorflow-datasets ArrayRecord builders for Kontext-Shapes and for imported data.

One dataset per task, so the pipeline can mix tasks with per-stage weights:

    DATA_DIR/kontext_shapes/<task>/1.0.0/kontext_shapes-<split>.array_record-000NN-of-000MM
    DATA_DIR/<import name>/<task>/1.0.0/...

Records follow `qk_jax.data.records` (images as PNG bytes: building and reading need no
TensorFlow). Atomicity comes from tfds: a build writes into `<task>/incomplete.XXXXXX_1.0.0`
and renames it to `1.0.0` only when every split is written, so an interrupted build never
leaves a directory that `load_source` would take for a dataset (it only opens version
directories holding `dataset_info.json`). A build killed hard (kill -9, power loss) leaves
its `incomplete.*` folder behind; the next build of that task removes it with one warning
line and builds again (one build per data directory and task at a time).
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm import tqdm

from qk_jax import fault_points, logs
from qk_jax.data import records, splits, vocab

VERSION = "1.0.0"
SHAPES_NAME = "kontext_shapes"


def features() -> tfds.features.FeaturesDict:
    image = tfds.features.Tensor(shape=(), dtype=np.object_)  # encoded PNG bytes
    return tfds.features.FeaturesDict(
        {
            "task": tfds.features.Text(),
            "prompt": tfds.features.Text(),
            "target": image,
            "source": image,
            "references": tfds.features.Sequence(image),
            "scene": tfds.features.Text(),
            "category": tfds.features.Text(),
            "id": tfds.features.Text(),
        }
    )


class NotBuiltError(FileNotFoundError):
    """The requested dataset / split has no complete build."""


class ShapesConfig(tfds.core.BuilderConfig):
    """One task of Kontext-Shapes at one image size; `num` maps split -> record count."""

    def __init__(
        self,
        *,
        task: str,
        height: int = 64,
        width: int = 64,
        num: dict | None = None,
        seed: int = 0,
        workers: int = 1,
        plain_background: float = vocab.PLAIN_BACKGROUND,
        **kwargs,
    ):
        if task not in vocab.TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {vocab.TASKS}")
        if not 0.0 <= plain_background <= 1.0:
            raise ValueError(f"plain_background={plain_background}: a probability in [0, 1]")
        super().__init__(name=task, version=VERSION, description=f"Kontext-Shapes {task}", **kwargs)
        self.task, self.height, self.width, self.seed, self.workers = task, height, width, seed, workers
        self.plain_background = float(plain_background)
        self.num = dict(num or {"train": 1000, "validation": 100, "test": 100})

    def params(self) -> dict:
        out = {
            "task": self.task,
            "height": self.height,
            "width": self.width,
            "seed": self.seed,
            "num": self.num,
            "record_format": 1,
        }
        if self.plain_background != vocab.PLAIN_BACKGROUND:  # builds with the default keep their metadata
            out["plain_background"] = self.plain_background
        return out


def _make_record(args):
    return records.generate_record(*args)


class KontextShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The procedural Kontext-Shapes dataset, one builder config per task."""

    name = SHAPES_NAME
    VERSION = tfds.core.Version(VERSION)
    code_path = None  # no checksums file to look up (and tfds' lookup needs importlib_resources)
    BUILDER_CONFIGS: list = []  # configs are made at build time (size, counts, seed)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=features(),
            description=__doc__,
            metadata=tfds.core.MetadataDict(self.builder_config.params()),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, n) for split, n in self.builder_config.num.items() if n > 0}

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[str, dict]]:
        c = self.builder_config
        jobs = ((c.task, i, split, c.seed, c.height, c.width, c.plain_background) for i in range(n))
        bar = tqdm(total=n, desc=f"{c.task}/{split}", unit="rec", leave=False)
        if c.workers > 1:
            with multiprocessing.get_context("fork").Pool(c.workers) as pool:
                for i, rec in enumerate(pool.imap(_make_record, jobs, chunksize=32)):
                    bar.update()
                    yield rec["id"], rec
                    if i == 0:
                        fault_points.pause_point("data.writing")  # inert unless QK_JAX_PAUSE_AT is set
        else:
            for i, job in enumerate(jobs):
                rec = _make_record(job)
                bar.update()
                yield rec["id"], rec
                if i == 0:
                    fault_points.pause_point("data.writing")
        bar.close()


class ImportConfig(tfds.core.BuilderConfig):
    """One task of an imported manifest; `examples(split)` yields the validated records."""

    def __init__(
        self,
        *,
        task: str,
        examples: Callable[[str], Iterable[dict]],
        split_names: Iterable[str],
        meta: dict | None = None,
        **kwargs,
    ):
        super().__init__(name=task, version=VERSION, description=f"imported {task}", **kwargs)
        self.task, self.examples, self.split_names, self.meta = task, examples, tuple(split_names), dict(meta or {})


class ImportedData(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Real data imported from a JSONL manifest (`qk_jax.data.importer`), one config per task."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS: list = []
    code_path = None

    def __init__(self, *, name: str, **kwargs):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"dataset name {name!r} must be snake_case (letters, digits, _)")
        self.name = name
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=features(),
            description=__doc__,
            metadata=tfds.core.MetadataDict(self.builder_config.meta),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {s: self._generate_examples(s) for s in self.builder_config.split_names}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        for i, rec in enumerate(self.builder_config.examples(split)):
            yield rec["id"], rec
            if i == 0:
                fault_points.pause_point("data.writing")  # inert unless QK_JAX_PAUSE_AT is set


def prepare(builder: tfds.core.DatasetBuilder) -> None:
    """Builds (atomically) unless a complete build exists; downloads go to a temp dir.

    tfds' own progress bars are switched off; the generators show one tqdm bar each.
    """
    tfds.disable_progress_bar()
    remove_interrupted_builds(epath.Path(builder.data_path))
    with tempfile.TemporaryDirectory() as tmp, quiet_tfds():
        builder.download_and_prepare(download_dir=tmp, file_format="array_record")


def interrupted_builds(version_dir: epath.Path) -> list[epath.Path]:
    """tfds' temporary folders (`incomplete.XXXXXX_<version>`) left beside `version_dir` by
    builds that were killed before their rename."""
    parent = version_dir.parent
    if not parent.exists():
        return []
    pattern = re.compile(r"incomplete\.[A-Z0-9]+_" + re.escape(version_dir.name))
    return sorted(p for p in parent.iterdir() if pattern.fullmatch(p.name))


def remove_interrupted_builds(version_dir: epath.Path) -> None:
    """Before a build: the leftovers of interrupted builds of the same task and version are
    removed, named in one warning line (a complete build is reused by tfds as it is)."""
    leftovers = interrupted_builds(version_dir)
    if not leftovers or (version_dir / "dataset_info.json").exists():
        return
    logs.warning(
        f"{version_dir.parent} holds the unfinished output of an interrupted build "
        f"({', '.join(p.name for p in leftovers)}); removed it, building again"
    )
    for p in leftovers:
        p.rmtree()


@contextlib.contextmanager
def quiet_tfds():
    """tfds prints "Downloading and preparing dataset ..." banners and config warnings."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            yield
        finally:
            logger.setLevel(level)


def dataset_dir(data_dir: str, name: str, task: str) -> epath.Path | None:
    """The newest complete version directory of `name/task`, or None."""
    base = epath.Path(data_dir) / name / task
    if not base.exists():
        return None
    done = [p for p in base.iterdir() if re.fullmatch(r"\d+\.\d+\.\d+", p.name) and (p / "dataset_info.json").exists()]
    return max(done, key=lambda p: tuple(int(x) for x in p.name.split("."))) if done else None


def load_source(data_dir: str, name: str, task: str, split: str):
    """The random-access ArrayRecord source (`tfds.data_source`) of one task and split.

    Raises NotBuiltError naming the path if there is no complete build (an interrupted
    build's `incomplete.*` directory does not count).
    """
    path = dataset_dir(data_dir, name, task)
    if path is None:
        base = epath.Path(data_dir) / name / task
        partial = [p.name for p in base.iterdir()] if base.exists() else []
        hint = f" (found only {partial}: an interrupted build)" if partial else ""
        raise NotBuiltError(
            f"no complete dataset at {base}{hint}; build it with `qk-jax data shapes` or `qk-jax data import`"
        )
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
        raise NotBuiltError(f"dataset {path} has no split {split!r} (has {list(builder.info.splits)})")
    return builder.as_data_source(split=split)


def built_params(data_dir: str, name: str, task: str) -> dict | None:
    path = dataset_dir(data_dir, name, task)
    return None if path is None else dict(tfds.builder_from_directory(path).info.metadata or {})


def build_shapes(
    out: str,
    tasks: Iterable[str] = vocab.TASKS,
    num: int = 1000,
    num_eval: int | None = None,
    height: int = 64,
    width: int | None = None,
    seed: int = 0,
    workers: int = 1,
    plain_background: float = vocab.PLAIN_BACKGROUND,
) -> dict[str, dict]:
    """Generates Kontext-Shapes under `out` for each task; returns {task: {split: count}}.

    `plain_background`: probability of an untextured background (default 0.4; the rest are
    stripes, checker, noise and gradients).

    `num` train records per task, `num_eval` (default max(1, num // 10)) for validation and
    for test. An existing build with the same parameters is reused; one with different
    parameters is an error (delete it or pick another `out`).
    """
    width = height if width is None else width
    num_eval = max(1, num // 10) if num_eval is None else num_eval
    counts = {}
    for task in tasks:
        config = ShapesConfig(
            task=task,
            height=height,
            width=width,
            seed=seed,
            workers=workers,
            num={"train": num, "validation": num_eval, "test": num_eval},
            plain_background=plain_background,
        )
        existing = built_params(out, SHAPES_NAME, task)
        if existing is not None and _jsonable(existing) != _jsonable(config.params()):
            raise ValueError(
                f"{out}/{SHAPES_NAME}/{task} was built with {existing}, not {config.params()}; "
                f"delete it or choose another --out"
            )
        with quiet_tfds():
            builder = KontextShapes(data_dir=out, config=config)
        prepare(builder)
        counts[task] = {s: len(load_source(out, SHAPES_NAME, task, s)) for s in splits.SPLITS if config.num[s] > 0}
    return counts


def _jsonable(d: dict) -> dict:
    import json

    return json.loads(json.dumps(d, sort_keys=True))
