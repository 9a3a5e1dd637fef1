"""Faults tried one by one on the tiny stage-1 run: each run finishes (or stops with a
one-line cause), no good checkpoint is deleted, and where the fault lost no step the final
parameters equal those of an uninterrupted run.

One uninterrupted run (4 steps, checkpoints at 2 and 4, text-to-image only so one program
is compiled) is the reference; each fault damages a copy of it and runs again."""

import glob
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import kontext_util as ku
from cli_env import FAST_COMPILE_FLAGS, log_message
from qk_jax import checkpoint as ckpt_lib
from qk_jax import fault_points, surgery
from qk_jax.data import builders, records
from qk_jax.sample import Sampler
from qk_jax.train import train
from xla_cache import dropping_entries_written

pytestmark = pytest.mark.slow  # trains the tiny stage 1 again for every fault, some through the CLI: minutes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
RUN = ("train.checkpoint_every=2", "train.keep_checkpoints=3", "data.mixture={'t2i': 1.0}")


def config(shapes_dir, *overrides):
    return ku.stage_config(1, shapes_dir, f"train.steps={STEPS}", *RUN, *overrides)


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "qk_jax.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )


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
    files = [
        f
        for f in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True)
        if os.path.isfile(f) and ("ocdbt" in f or "/d/" in f)
    ]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 3)


def flip_bytes(step_dir, count=64):
    files = [
        f for f in glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True) if os.path.isfile(f)
    ]
    biggest = max(files, key=os.path.getsize)
    data = bytearray(open(biggest, "rb").read())
    mid = len(data) // 2
    data[mid : mid + count] = bytes(b ^ 0x5A for b in data[mid : mid + count])
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


def test_resuming_with_another_model_names_what_changed_and_keeps_the_steps(reference, shapes_dir, tmp_path):
    workdir = copy_run(reference, tmp_path)
    changed = r"trained with another model \(connector.hidden_dim: checkpoint \d+ vs config 64\)"
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=changed):
        train(config(shapes_dir, "train.steps=6", "model.connector.hidden_dim=64"), workdir)
    assert steps_of(workdir) == [2, 4]  # nothing moved aside: the steps are good, the config is not theirs


def test_init_from_a_checkpoint_of_another_stage_or_model_says_what_it_holds(reference, shapes_dir, tmp_path):
    # A stage-2 run started from the stage-1 run itself, not from the surgery's output.
    stage2 = ku.stage_config(2, shapes_dir, "train.steps=2", "train.warmup_steps=0", f"train.init_from={reference}")
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"is not in checkpoint step 4 of .*") as error:
        train(stage2, str(tmp_path / "stage2"))
    assert str(error.value).endswith(
        "; train.init_from holds a stage-1 model and this config trains stage 2: stage 2 starts from the output "
        "of `qk-jax surgery --from 1 --to 2` of a stage-1 run"
    ), error.value
    other = config(shapes_dir, "train.steps=2", f"train.init_from={reference}", "model.connector.hidden_dim=64")
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"holds another model \(connector.hidden_dim: "):
        train(other, str(tmp_path / "other"))
    assert steps_of(reference) == [2, 4]


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


def last_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


INF_LR = ("train.steps=8", "train.learning_rate=1e39", "train.keep_checkpoints=2")  # float32: inf


@pytest.mark.parametrize("log_every", [1, 10])  # 10: the flag is read one step late, as in a long run
def test_nonfinite_update_stops_naming_the_step_and_keeps_good_checkpoints(reference, shapes_dir, tmp_path, log_every):
    from qk_jax.nonfinite import NonFiniteError

    workdir = copy_run(reference, tmp_path)
    with pytest.raises(
        NonFiniteError,
        match=r"step 5: .* not finite; stopped without saving it \(checkpoints up to "
        r"step 4 are kept",
    ):
        train(config(shapes_dir, *INF_LR, f"train.log_every={log_every}"), workdir)
    assert steps_of(workdir) == [2, 4]  # keep_checkpoints=2 rotated nothing out
    assert_same_params(stored_params(workdir, 4), stored_params(reference, 4))


def test_nonfinite_updates_are_skipped_and_counted(reference, shapes_dir, tmp_path):
    workdir = copy_run(reference, tmp_path)
    summary = train(config(shapes_dir, *INF_LR, "train.nonfinite=skip_step"), workdir)
    assert summary["end_step"] == 8
    records = last_metrics(workdir)
    assert records[-1]["step"] == 8 and records[-1]["nonfinite_skips"] == 4
    assert steps_of(workdir) == [6, 8]
    # Every update was skipped: the saved state is the last good one, finite.
    assert_same_params(stored_params(workdir, 8), stored_params(reference, 4))
    meta = ckpt_lib.read_json_item(os.path.join(workdir, "checkpoints"), 8, "meta")
    assert meta["nonfinite_skips"] == 4


def test_nonfinite_mode_is_validated(shapes_dir, tmp_path):
    from qk_jax.config import ConfigError

    with pytest.raises(ConfigError, match="train.nonfinite='skip'.*'stop', 'skip_step'"):
        train(config(shapes_dir, "train.nonfinite=skip"), str(tmp_path / "run"))


@pytest.fixture
def file_size_limit():
    """`limit(n)`: from now on every write past n bytes of a file fails (EFBIG), as on a full
    disk; undone after the test."""
    import resource
    import signal

    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    with dropping_entries_written():  # a program compiled under the limit is cached cut short
        yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, old_limit[1]))
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


def test_a_failed_save_stops_the_run_with_the_previous_step_intact(
    reference, shapes_dir, tmp_path, monkeypatch, file_size_limit
):
    workdir = copy_run(reference, tmp_path)
    save = ckpt_lib.Checkpointer.save

    def save_on_a_full_disk(self, step, **kw):
        if step == 6:
            file_size_limit(100_000)  # the params file of the tiny model is ~1 MB
        started = save(self, step, **kw)
        while step == 6 and self._manager.is_saving_in_progress():
            time.sleep(0.01)  # the write has failed in the background before step 7 ends
        return started

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_on_a_full_disk)
    with pytest.raises(ckpt_lib.CheckpointSaveError, match=r"saving checkpoint .*checkpoints/6 failed: .*too large"):
        train(config(shapes_dir, "train.steps=8"), workdir)
    file_size_limit(-1)  # RLIM_INFINITY: the disk has room again
    monkeypatch.undo()
    assert steps_of(workdir) == [2, 4]
    assert_same_params(stored_params(workdir, 4), stored_params(reference, 4))
    assert last_metrics(workdir)[-1]["step"] <= 7  # stopped at the next step boundary, before saving step 8
    summary = train(config(shapes_dir, "train.steps=8"), workdir)  # the rerun finishes
    assert summary["start_step"] == 4 and summary["end_step"] == 8 and steps_of(workdir) == [4, 6, 8]


def test_end_of_run_samples_cannot_lose_the_final_checkpoint(reference, shapes_dir, tmp_path, caplog):
    data = str(tmp_path / "data")
    shutil.copytree(shapes_dir, data)
    for f in glob.glob(os.path.join(data, "**", "*validation*"), recursive=True):
        os.remove(f)  # a dataset without a validation split
    workdir = copy_run(reference, tmp_path)
    with caplog.at_level(logging.INFO):  # the warning is a log record (qk_jax.logs)
        summary = train(config(shapes_dir, "train.steps=6", f"data.data_dir={data}", "train.sample_images=2"), workdir)
    assert summary["end_step"] == 6 and steps_of(workdir) == [2, 4, 6]
    out = "\n".join(r.getMessage() for r in caplog.records)
    assert len([line for line in out.splitlines() if line.startswith("samples at step 6 not written: ")]) == 1, out


def test_resume_drops_the_metrics_of_retrained_steps(reference, shapes_dir, tmp_path):
    # A kill after step 4 was logged but before its checkpoint was written: steps 3-4 are retrained.
    workdir = copy_run(reference, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "lo')  # and a line cut short by the kill
    assert train(config(shapes_dir), workdir)["start_step"] == 2
    records = last_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == [r["loss"] for r in last_metrics(reference)]


def test_mistyped_config_field_is_one_line_with_the_suggestion(tmp_path):
    run = cli(
        "train", "--config", "configs/stage1.py:tiny", "--workdir", str(tmp_path / "run"), "--config.train.stepz=3"
    )
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert lines[-1].startswith(
        "qk-jax train: error: ConfigError: config field train.stepz does not exist (did you mean train.steps?)"
    ), lines[-1]
    debug = cli(
        "train",
        "--config",
        "configs/stage1.py:tiny",
        "--workdir",
        str(tmp_path / "run"),
        "--config.train.stepz=3",
        "--debug",
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_unusable_workdir_and_missing_checkpoint_are_one_line(tmp_path, shapes_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run = cli(
        "train",
        "--config",
        "configs/stage1.py:tiny",
        "--workdir",
        str(blocker / "run"),
        f"--config.data.data_dir={shapes_dir}",
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    last = [line for line in run.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"qk-jax train: error: WorkdirError: workdir {blocker / 'run'} cannot be created"), last
    run = cli("sample", "--checkpoint", str(tmp_path / "missing"), "--prompt", "a red circle")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    last = [line for line in run.stderr.splitlines() if line.strip()][-1]
    assert f"checkpoint folder {tmp_path / 'missing'} does not exist" in last, last


def test_config_override_message():
    from qk_jax.cli import config_override_message

    error = AttributeError("'\\'stepz\\'\\nDid you mean \"steps\" instead of \"stepz\"?'")
    assert (
        config_override_message(error, ["--config.train.stepz=3"])
        == "config field train.stepz does not exist (did you mean train.steps?)"
    )
    assert config_override_message(AttributeError("'zzz'"), ["--config.zzz=1"]) == "config field zzz does not exist"


def test_interrupted_surgery_is_invisible_refused_by_init_from_and_rerun(reference, shapes_dir, tmp_path, monkeypatch):
    dst = str(tmp_path / "ckpt2")

    def killed(*_a, **_k):
        raise KeyboardInterrupt("killed after the checkpoint was written, before the report")

    monkeypatch.setattr(surgery, "_write_report", killed)
    with pytest.raises(KeyboardInterrupt):
        surgery.run(1, 2, reference, dst)
    monkeypatch.undo()
    partial = surgery.staging_path(dst)
    assert not os.path.exists(dst) and os.path.isdir(os.path.join(partial, "0"))
    stage2 = ku.stage_config(2, shapes_dir, "train.steps=2", f"train.init_from={partial}")
    with pytest.raises(surgery.SurgeryError, match=f"train.init_from: {partial} has no complete surgery_report.json"):
        train(stage2, str(tmp_path / "run2"))
    report = surgery.run(1, 2, reference, dst)  # no manual cleanup
    assert report["bit_identical"]["ok"] and not os.path.exists(partial)
    assert surgery.read_complete_report(dst)["destination"] == dst
    with pytest.raises(surgery.SurgeryError, match="already exists and is not empty .a finished surgery"):
        surgery.run(1, 2, reference, dst)


def _full_disk():
    """preexec_fn: every write past 300 kB of a file fails (EFBIG) in the child, as on a full disk."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_a_failed_save_ends_the_cli_output_with_one_line(reference, shapes_dir, tmp_path):
    workdir = copy_run(reference, tmp_path)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "qk_jax.cli",
            "train",
            "--config",
            "configs/stage1.py:tiny",
            "--workdir",
            workdir,
            *[
                f"--config.{o}"
                for o in (
                    f"data.data_dir={shapes_dir}",
                    "train.steps=6",
                    "train.log_every=1",
                    "train.sample_images=0",
                    *RUN,
                )
            ],
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=_full_disk,
        # Its compiled programs would be cached cut short at 300 kB, for every later test of the worker.
        env=dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false"),
    )
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"qk-jax train: error: CheckpointSaveError: saving checkpoint {workdir}/checkpoints/6 failed: "
    ), run.stderr[-3000:]
    assert "File too large" in last and len(lines) < 60, lines
    assert steps_of(workdir) == [2, 4]


@pytest.mark.slow
def test_kill_9_at_a_checkpoint_step_resumes_to_an_uninterrupted_runs_weights(reference, shapes_dir, tmp_path):
    uninterrupted = copy_run(reference, tmp_path, "uninterrupted")
    train(config(shapes_dir, "train.steps=8"), uninterrupted)
    killed = copy_run(reference, tmp_path, "killed")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qk_jax.cli",
            "train",
            "--config",
            "configs/stage1.py:tiny",
            "--workdir",
            killed,
            *[
                f"--config.{o}"
                for o in (
                    f"data.data_dir={shapes_dir}",
                    "train.steps=8",
                    "train.log_every=1",
                    "train.sample_images=0",
                    *RUN,
                )
            ],
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # The kill may come while the next step's program is written to the compilation cache:
        # a half-written entry would be met by every later test of this worker.
        env=tool_env(JAX_ENABLE_COMPILATION_CACHE="false"),
    )
    seen = []
    for line in proc.stdout:  # step 6 is logged, then its checkpoint save starts: kill -9 there
        seen.append(line)
        if log_message(line).split()[:2] == ["step", "6"]:
            proc.kill()
            break
    proc.wait(timeout=120)
    assert proc.returncode == -9, "".join(seen)[-3000:]
    summary = train(config(shapes_dir, "train.steps=8"), killed)
    assert summary["start_step"] in (4, 6) and summary["end_step"] == 8
    assert steps_of(killed) == steps_of(uninterrupted) == [4, 6, 8]
    assert_same_params(stored_params(killed, 8), stored_params(uninterrupted, 8))
    assert [r["step"] for r in last_metrics(killed)] == list(range(1, 9))


# ----------------------------------------------------------------------------- real kill -9 of the tools


def tool_env(**extra):
    """The test's environment for a `qk-jax` subprocess, the repository on PYTHONPATH."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tool(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qk_jax.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env or tool_env(),
    )


def kill_9_at(point, *args):
    """Runs `qk-jax ARGS` until it reaches the pause point `point` (qk_jax.fault_points),
    then kills it with SIGKILL; returns its output."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qk_jax.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=tool_env(**{fault_points.ENV: point}),
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if f"paused at {point}" in line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    return "".join(seen)


def root_params(root, step=0):
    ck = ckpt_lib.Checkpointer(root, create=False)
    return ck.restore(step, params=ck.abstract_item(step, "params"), json_items=())["params"]


@pytest.mark.slow
def test_kill_9_during_surgery_is_rerun_to_an_uninterrupted_surgerys_output(reference, shapes_dir, tmp_path):
    def args(dst):
        return ["surgery", "--from", "1", "--to", "2", "--src", reference, "--dst", dst]

    uninterrupted = str(tmp_path / "uninterrupted")
    surgery.run(1, 2, reference, uninterrupted)
    dst = str(tmp_path / "ckpt2")
    kill_9_at("surgery.written", *args(dst))  # killed after the output checkpoint was written
    partial = surgery.staging_path(dst)
    assert not os.path.exists(dst) and os.path.isdir(os.path.join(partial, "0"))
    assert not os.path.exists(os.path.join(partial, surgery.REPORT))
    stage2 = ku.stage_config(2, shapes_dir, "train.steps=2", f"train.init_from={partial}")
    with pytest.raises(surgery.SurgeryError, match=f"train.init_from: {partial} has no complete surgery_report.json"):
        train(stage2, str(tmp_path / "run2"))
    rerun = tool(*args(dst))  # the same command, no manual cleanup
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    said = [log_message(line) for line in (rerun.stdout + rerun.stderr).splitlines()]
    assert f"removing {partial}, the unfinished output of an interrupted surgery" in said
    assert not os.path.exists(partial) and surgery.read_complete_report(dst)["bit_identical"]["ok"]
    assert_same_params(root_params(dst), root_params(uninterrupted))


def dataset_records(data_dir, task):
    """{split: {id: record}} of a built task."""
    out = {}
    for split in ("train", "validation", "test"):
        src = builders.load_source(data_dir, builders.SHAPES_NAME, task, split)
        out[split] = {r["id"]: r for r in (records.normalize(src[i]) for i in range(len(src)))}
    return out


def test_kill_9_during_the_data_build_is_rerun_to_an_uninterrupted_builds_records(tmp_path):
    def args(out):
        return ["data", "shapes", "--out", out, "--num", "12", "--num_eval", "3", "--size", "32", "--tasks", "t2i,edit"]

    uninterrupted, out = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    run = tool(*args(uninterrupted))
    assert run.returncode == 0, run.stderr[-3000:]
    kill_9_at("data.writing", *args(out))  # killed while tfds writes the first task (t2i)
    version_dir = builders.epath.Path(out) / builders.SHAPES_NAME / "t2i" / builders.VERSION
    leftovers = builders.interrupted_builds(version_dir)
    assert leftovers and all(p.is_dir() for p in leftovers)  # the kill left tfds' temporary folder
    assert builders.dataset_dir(out, builders.SHAPES_NAME, "t2i") is None
    with pytest.raises(builders.NotBuiltError, match="interrupted build"):
        builders.load_source(out, builders.SHAPES_NAME, "t2i", "train")
    rerun = tool(*args(out))  # the same command, no manual cleanup
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    warnings = [line for line in rerun.stderr.splitlines() if "interrupted build" in line]
    assert len(warnings) == 1 and warnings[0].startswith("W") and leftovers[0].name in warnings[0], warnings
    assert builders.interrupted_builds(version_dir) == []
    for task in ("t2i", "edit"):
        got, expected = dataset_records(out, task), dataset_records(uninterrupted, task)
        assert {s: len(r) for s, r in got.items()} == {"train": 12, "validation": 3, "test": 3}
        assert got == expected, task


# ----------------------------------------------------------------------------- read-only locations


@pytest.mark.slow
def test_read_only_workdir_and_outputs_are_one_line(reference, shapes_dir, tmp_path):
    """A read-only filesystem (a tmpfs mounted read-only in a private mount namespace, so it
    works as root, where chmod stops nothing): train, surgery and sample each end with one
    line naming the path and the cause, exit 1, and print no traceback."""
    ro = tmp_path / "ro"
    ro.mkdir()
    commands = {
        "train_new": [
            "train",
            "--config",
            "configs/stage1.py:tiny",
            "--workdir",
            str(ro / "run"),
            f"--config.data.data_dir={shapes_dir}",
        ],
        "train_existing": [
            "train",
            "--config",
            "configs/stage1.py:tiny",
            "--workdir",
            str(ro),
            f"--config.data.data_dir={shapes_dir}",
        ],
        "surgery": ["surgery", "--from", "1", "--to", "2", "--src", reference, "--dst", str(ro / "ckpt2")],
        "sample": ["sample", "--checkpoint", reference, "--prompt", "a red circle", "--out", str(ro / "s.png")],
    }
    script = [f"mount -t tmpfs -o ro qk_jax_ro {ro} || exit 97"]
    for name, cmd in commands.items():
        script += [
            f"echo '=== {name}'",
            " ".join(map(shlex.quote, [sys.executable, "-m", "qk_jax.cli", *cmd])) + " 2>&1",
            'echo "=== rc $?"',
        ]
    run = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", "\n".join(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=tool_env(),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    outputs = dict(zip(commands, run.stdout.split("=== ")[1:][::2]))
    codes = [line for line in run.stdout.splitlines() if line.startswith("=== rc ")]
    assert codes == ["=== rc 1"] * len(commands), run.stdout[-5000:]
    expected = {
        "train_new": (
            f"qk-jax train: error: WorkdirError: workdir {ro / 'run'} cannot be created: Read-only file system"
        ),
        "train_existing": (f"qk-jax train: error: WorkdirError: workdir {ro} is not writable: Read-only file system"),
        "surgery": f"qk-jax surgery: error: SurgeryError: destination {ro / 'ckpt2'} cannot be written: Read-only "
        f"file system",
        "sample": f"qk-jax sample: error: OutputError: --out {ro / 's.png'} cannot be written: Read-only file system",
    }
    for name, text in outputs.items():
        lines = [line for line in text.splitlines() if line.strip()]
        assert "Traceback" not in text, text[-3000:]
        assert lines[-1].startswith(expected[name]), (name, lines[-1])
    assert os.listdir(ro) == []  # outside the namespace the folder was never touched


# ----------------------------------------------------------------------------- two processes


def two_processes(directory, mode, **extra):
    """tests/two_process_restore.py as two processes x 4 CPU devices joined by
    jax.distributed (the environment launch/local.py gives); returns their RESULT records
    (process order) and outputs."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        coordinator = f"localhost:{s.getsockname()[1]}"
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tests", "two_process_restore.py"), directory, mode],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=tool_env(
                QK_COORDINATOR=coordinator,
                QK_NUM_PROCESSES="2",
                QK_PROCESS_ID=str(i),
                JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"{FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count=4",
                **extra,
            ),
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    results = [
        json.loads(line.split("RESULT ", 1)[1])
        for out in outs
        for line in out.splitlines()
        if line.startswith("RESULT ")
    ]
    return sorted(results, key=lambda r: r["process"]), outs


@pytest.mark.parametrize("fault", ["truncated_on_disk", "unreadable_on_process_1"])
def test_two_processes_agree_on_a_corrupt_newest_step(tmp_path, fault):
    directory = str(tmp_path / "checkpoints")
    two_processes(directory, "write")
    step_2_sum = float(np.arange(8 * 16, dtype=np.float32).sum() * 2)
    if fault == "truncated_on_disk":
        truncate_data_files(os.path.join(directory, "4"))
        results, outs = two_processes(directory, "restore")
    else:  # only process 1 fails to read step 4: without agreement process 0 would take step 4
        results, outs = two_processes(directory, "restore", QK_TEST_UNREADABLE_ON="1")
        assert "unreadable on process(es) [1]" in outs[0], outs[0][-3000:]
    assert [(r["process"], r["step"], r["sum"]) for r in results] == [(0, 2, step_2_sum), (1, 2, step_2_sum)]
    assert sorted(os.listdir(directory)) == ["2", "4.corrupt"]  # moved aside once, by the primary process
    # Logged on the primary process only (every process takes the same decision).
    moved = [[line for line in out.splitlines() if "moved aside to" in line and "step 4" in line] for out in outs]
    assert [len(m) for m in moved] == [1, 0], outs
