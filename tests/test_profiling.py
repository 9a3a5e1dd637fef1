"""Profiling and accounting: a trace of chosen steps in the workdir, the step time split into
compute / data / checkpoint, and MFU over useful FLOPs only (no padding)."""

import glob
import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

import kontext_util as ku
from qk_jax import flops, profiling
from qk_jax.config import ConfigError
from qk_jax.train import train


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return ku.processor_dir(tmp_path_factory)


def padded(batch: dict, columns: int) -> dict:
    """`batch` plus `columns` left-padded text tokens in every row and one padding row (a copy
    of row 0 marked invalid)."""
    rows = len(batch["input_ids"])
    images_per_row = len(batch["pixel_values"]) // rows
    out = {}
    for key, v in batch.items():
        if key == "vision_plan":
            out[key] = v
            continue
        v = np.asarray(v)
        if key in ("input_ids", "attention_mask"):
            v = np.concatenate([np.zeros((rows, columns), v.dtype), v], axis=1)
        if key == "cond_index":  # the stream's tokens move right with the text
            v = np.where(v >= 0, v + columns, v)
        if key == "position_ids":  # (3, B, T + K): the padding goes before the text
            v = np.concatenate([np.zeros(v.shape[:2] + (columns,), v.dtype), v], axis=2)
            out[key] = np.concatenate([v, v[:, :1]], axis=1)
            continue
        extra = v[:images_per_row] if key == "pixel_values" else v[:1]
        if key == "valid":
            extra = np.zeros_like(extra)
        out[key] = np.concatenate([v, extra])
    return out


def test_useful_flops_do_not_count_padding(shapes_dir, proc):
    config = ku.stage_config(3, shapes_dir)
    kcfg = ku.model_config(config, proc)
    real = ku.prepared(kcfg, ku.first_batch(config, proc, {"edit": 1.0}))  # input images: the ViT runs
    # every row's whole text is prompt and its condition stream is as wide as the batch's:
    # the last W + K tokens of the VLM's sequence (W prompt tokens, then the K queries)
    rows, width = real["cond_index"].shape
    text = real["input_ids"].shape[1]
    stream = np.broadcast_to(np.arange(text + kcfg.num_queries - width, text + kcfg.num_queries), (rows, width))
    ones = {k: np.ones_like(real[k]) for k in ("attention_mask", "valid")}
    plain = dict(real, **ones, cond_index=stream.astype(real["cond_index"].dtype))
    with_padding = padded(plain, columns=24)
    assert with_padding["input_ids"].shape == (9, plain["input_ids"].shape[1] + 24)
    trainable = config.train.trainable
    useful = flops.kontext_useful_flops(kcfg, plain, trainable)
    assert useful == flops.kontext_train_step_flops(kcfg, plain, trainable)["total"]
    assert flops.kontext_useful_flops(kcfg, with_padding, trainable) == useful
    assert flops.kontext_train_step_flops(kcfg, with_padding, trainable)["total"] > useful
    # the pipeline's own batch pads its prompts to the longest: less than its padded count
    cache = {}
    real_useful = flops.kontext_useful_flops(kcfg, real, trainable, cache=cache)
    assert real_useful < flops.kontext_train_step_flops(kcfg, real, trainable)["total"]
    assert cache and flops.kontext_useful_flops(kcfg, real, trainable, cache=cache) == real_useful


def test_profile_steps_field():
    assert profiling.parse_steps("") is None and profiling.parse_steps("3:5") == (3, 5)
    for bad in ("5", "5:3", "a:b", "-1:2"):
        with pytest.raises(ConfigError, match="train.profile_steps"):
            profiling.parse_steps(bad)


def test_a_run_that_ends_inside_the_range_names_the_steps_it_traced(tmp_path, caplog):
    profiler = profiling.StepProfiler(profiling.parse_steps("1:300"), str(tmp_path / "profile"))
    x = jnp.ones(4)
    with caplog.at_level(logging.INFO):
        for step in range(3):  # the run's 3 steps: indices 1 and 2 are traced
            profiler.before(step)
            x = x * 2
            profiler.after(step, x)
        profiler.close()  # the loop ended before the range did
    assert [r.getMessage() for r in caplog.records if "profile of" in r.getMessage()] == [
        f"profile of steps 2..3 written to {tmp_path / 'profile'}"
    ]
    assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)


@pytest.mark.slow  # a tiny stage-1 run of 3 steps: minutes on 2 shared CPU cores
def test_trace_and_time_split_of_a_training_run(shapes_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = ku.stage_config(1, shapes_dir, "train.steps=3", "train.checkpoint_every=2", "train.profile_steps=1:2")
    train(config, workdir)
    traces = glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        parts = [r[f"{k}_seconds"] for k in ("compute", "data", "checkpoint")]
        assert min(parts) >= 0 and sum(parts) <= r["step_seconds"] * 1.001 + 1e-4, r
        assert r["data_seconds"] > 0 and r["compute_seconds"] > 0
        assert 0 < r["useful_flops_fraction"] <= 1
    # the save after step 2 (a log point) is timed in the window of step 3
    assert records[1]["checkpoint_seconds"] == 0 and records[2]["checkpoint_seconds"] > 0
