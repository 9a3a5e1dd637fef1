"""`qk-jax train` as a pod runs it: stage 3 (tiny, the default mixed mixture, data in two
aspect buckets and with 0-3 input images) as 2 processes x 4 CPU devices (`launch/local.py`),
against 1 process x 8 devices of the same config and seed:

- the global batch of a step does not depend on the process count: the same loss, step by step;
- SIGTERM sent to one process only: both save the same step and exit 0;
- the resumed 2-process run continues the exact curve.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cli_env import ROOT, user_env

pytestmark = pytest.mark.slow  # three launches of real training (compiles dominate): minutes

STEPS = 6
PAUSE_STEP = 2  # process 1 waits before this (0-based) step for the test's SIGTERM


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Kontext-Shapes with square (32x32) and wide (32x48) images: t2i, reconstruction and
    multi_subject in one bucket, edit, customization and transformation in another."""
    from qk_jax.data import builders

    out = str(tmp_path_factory.mktemp("mixed_buckets"))
    builders.build_shapes(out, ["t2i", "reconstruction", "multi_subject"], num=16, num_eval=1, height=32)
    builders.build_shapes(out, ["edit", "customization", "transformation"], num=16, num_eval=1, height=32, width=48)
    return out


def launch(processes: int, devices: int, workdir: str, data_dir: str, cache: str, pause: str = "", on_line=None):
    """Runs `launch/local.py ... -- train`; returns (exit code, output)."""
    env = user_env(
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )
    if pause:
        env["QK_JAX_PAUSE_AT"] = pause
    cmd = [
        sys.executable,
        os.path.join(ROOT, "launch", "local.py"),
        "--num-processes",
        str(processes),
        "--devices-per-process",
        str(devices),
        "--timeout",
        "3600",  # a loaded CI machine: each launch compiles and saves; allow for slowness
        "--",
        "train",
        "--config",
        "configs/stage3.py:tiny",
        "--workdir",
        workdir,
        f"--config.data.data_dir={data_dir}",
        "--config.train.batch_size=8",
        f"--config.train.steps={STEPS}",
        "--config.train.log_every=1",
        "--config.train.sample_images=0",
        "--config.train.signal.samples=0",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if on_line is not None:
            on_line(line)
    return proc.wait(timeout=120), "".join(lines)


def losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    cache = str(base / "xla_cache")
    timings = {}
    t = time.perf_counter()
    one = str(base / "one")
    code, log = launch(1, 8, one, data_dir, cache)
    assert code == 0, log[-4000:]
    timings["1x8"] = time.perf_counter() - t

    def preempt(line: str) -> None:  # process 1 only: SIGTERM, then let it go on
        m = re.search(rf"^\[1\] qk-jax: paused at train.step_{PAUSE_STEP} .*pid (\d+)", line)
        if m:
            os.kill(int(m.group(1)), signal.SIGTERM)
            time.sleep(1)
            os.kill(int(m.group(1)), signal.SIGUSR1)

    t = time.perf_counter()
    two = str(base / "two")
    stop_code, stop_log = launch(2, 4, two, data_dir, cache, pause=f"train.step_{PAUSE_STEP}@1", on_line=preempt)
    stopped_losses = losses(two)
    timings["2x4 stopped"] = time.perf_counter() - t
    t = time.perf_counter()
    resume_code, resume_log = launch(2, 4, two, data_dir, cache)
    timings["2x4 resumed"] = time.perf_counter() - t
    print("launch times (s):", {k: round(v, 1) for k, v in timings.items()})
    return {
        "one": losses(one),
        "two": two,
        "stop": (stop_code, stop_log, stopped_losses),
        "resume": (resume_code, resume_log, losses(two)),
    }


def test_sigterm_to_one_process_stops_both_after_the_same_saved_step(runs):
    code, log, curve = runs["stop"]
    assert code == 0, log[-4000:]
    assert "paused at train.step_2" in log
    stops = {int(p): int(s) for p, s in re.findall(r"^\[(\d)\] process \d: stopped after saving step (\d+)", log, re.M)}
    assert set(stops) == {0, 1}, log[-4000:]
    assert stops[0] == stops[1], stops
    saved = stops[0]
    assert PAUSE_STEP < saved < STEPS, saved  # it stopped early, after the step the signal came in
    assert os.path.isdir(os.path.join(runs["two"], "checkpoints", str(saved)))
    assert sorted(curve) == list(range(1, saved + 1))


def test_two_processes_train_the_curve_of_one(runs):
    # steps 1..S of the stopped run and S+1..STEPS of its resumption against 1 process x 8 devices
    one, (_, _, stopped), (code, log, two) = runs["one"], runs["stop"], runs["resume"]
    assert code == 0, log[-4000:]
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in stopped:  # the uninterrupted 2-process part
        np.testing.assert_allclose(stopped[step], one[step], rtol=1e-5, err_msg=f"step {step}")


def test_resumed_two_process_run_continues_the_exact_curve(runs):
    one, (_, _, stopped), (code, log, two) = runs["one"], runs["stop"], runs["resume"]
    assert code == 0, log[-4000:]
    saved = max(stopped)
    assert f"resumed from step {saved}" in log
    for step in range(saved + 1, STEPS + 1):
        np.testing.assert_allclose(two[step], one[step], rtol=1e-5, err_msg=f"step {step}")
