"""Faults tried one by one on the tiny stage-1 run: each run finishes (or stops with a
one-line cause), no good checkpoint is deleted, and where the fault lost no step the final
parameters equal those of an uninterrupted run.

One uninterrupted run (4 steps, checkpoints at 2 and 4, text-to-image only so one program
is compiled) is the reference; each fault damages a copy of it and runs again."""

import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import kontext_util as ku
from qk_jax import checkpoint as ckpt_lib
from qk_jax import surgery
from qk_jax.sample import Sampler
from qk_jax.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
RUN = ("train.checkpoint_every=2", "train.keep_checkpoints=3", "data.mixture={'t2i': 1.0}")


def config(shapes_dir, *overrides):
    return ku.stage_config(1, shapes_dir, f"train.steps={STEPS}", *RUN, *overrides)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "qk_jax.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


def stored_params(workdir, step):
    """The params of a checkpoint step as numpy arrays (checksums verified)."""
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
    return ck.restore(step, params=ck.abstract_item(step, "params"), json_items=())["params"]


def assert_same_params(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def steps_of(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def copy_run(reference, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(reference, dst)
    return dst


def truncate_data_files(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True)
             if os.path.isfile(f) and ("ocdbt" in f or "/d/" in f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 3)


def flip_bytes(step_dir, count=64):
    files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    biggest = max(files, key=os.path.getsize)
    data = bytearray(open(biggest, "rb").read())
    mid = len(data) // 2
    data[mid:mid + count] = bytes(b ^ 0x5A for b in data[mid:mid + count])
    open(biggest, "wb").write(bytes(data))


DAMAGE = {
    "truncated_data": truncate_data_files,
    "params_metadata_deleted": lambda d: os.remove(os.path.join(d, "params", "_METADATA")),
    "opt_state_folder_missing": lambda d: shutil.rmtree(os.path.join(d, "opt_state")),
    "flipped_bytes": flip_bytes,
}


@pytest.fixture(scope="module")
def reference(shapes_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("faults") / "reference")
    train(config(shapes_dir), workdir)
    assert steps_of(workdir) == [2, 4]
    return workdir


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_corrupt_newest_step_is_moved_aside_and_the_run_finishes(reference, shapes_dir, tmp_path, damage, caplog):
    workdir = copy_run(reference, tmp_path)
    DAMAGE[damage](os.path.join(workdir, "checkpoints", "4"))
    with caplog.at_level(logging.WARNING):
        summary = train(config(shapes_dir), workdir)
    assert summary["start_step"] == 2 and summary["end_step"] == STEPS
    warnings = [r.getMessage() for r in caplog.records if "step 4" in r.getMessage()]
    assert len(warnings) == 1 and "moved aside" in warnings[0], warnings
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4.corrupt"))
    assert steps_of(workdir) == [2, 4]  # the good step 2 kept, step 4 written again
    assert_same_params(stored_params(workdir, 4), stored_params(reference, 4))
    # A second run finds a complete run: nothing to redo, nothing moved.
    assert train(config(shapes_dir), workdir)["start_step"] == STEPS


def test_every_step_corrupt_starts_over_and_finishes(reference, shapes_dir, tmp_path):
    workdir = copy_run(reference, tmp_path)
    for step in (2, 4):
        truncate_data_files(os.path.join(workdir, "checkpoints", str(step)))
    summary = train(config(shapes_dir), workdir)
    assert summary["start_step"] == 0 and summary["end_step"] == STEPS
    assert {"2.corrupt", "4.corrupt"} <= set(os.listdir(os.path.join(workdir, "checkpoints")))
    assert_same_params(stored_params(workdir, 4), stored_params(reference, 4))


def test_sample_and_surgery_use_the_newest_good_step(reference, tmp_path, caplog):
    workdir = copy_run(reference, tmp_path)
    truncate_data_files(os.path.join(workdir, "checkpoints", "4"))
    with caplog.at_level(logging.WARNING):
        sampler = Sampler.from_checkpoint(workdir)
    assert sampler.step == 2
    assert any("step 4" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))  # a reader moves nothing
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="step 4"):
        Sampler.from_checkpoint(workdir, step=4)
    assert Sampler.from_checkpoint(workdir, step=2).step == 2
    report = surgery.run(1, 2, workdir, str(tmp_path / "ckpt2"))
    assert report["source_step"] == 2 and report["bit_identical"]["ok"]
