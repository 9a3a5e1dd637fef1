"""Shared helpers of the Query-Kontext tests: tiny configs and one prepared batch per stage."""

import jax
import numpy as np

from qk_jax.config import load_config
from qk_jax.data import pipeline, vlm_inputs
from qk_jax.data.model_inputs import prepare_batch
from qk_jax.data.tokenizer import build_tokenizer
from qk_jax.model_config import build_kontext_config, read_special_token_ids


def stage_config(stage: int, data_dir: str, *overrides: str):
    return load_config(
        f"configs/stage{stage}.py:tiny",
        [
            f"data.data_dir={data_dir}",
            "train.log_every=1",
            "train.sample_images=0",
            "train.signal.samples=0",
            *overrides,
        ],
    )


def model_config(config, processor_dir):
    return build_kontext_config(config, read_special_token_ids(processor_dir))


def processor_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("processor"))
    build_tokenizer(out)
    return out


def first_batch(config, processor_folder, mixture=None):
    """A host batch from the real pipeline (optionally restricted to some tasks)."""
    data = config.data
    if mixture is not None:
        data.mixture = mixture
    ds = pipeline.make_dataset(data, vlm_inputs.load_processor(processor_folder), process_index=0, process_count=1)
    return next(iter(ds))


def prepared(kcfg, host):
    return prepare_batch(kcfg, host)


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tree_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
