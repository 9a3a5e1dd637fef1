"""Two processes x 4 CPU devices joined by jax.distributed: train steps, Orbax save, restore."""

import os
import subprocess
import sys

import pytest

from cli_env import FAST_COMPILE_FLAGS

pytestmark = pytest.mark.slow  # two processes start jax, train and checkpoint: minutes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_smoke_run(tmp_path):
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_FLAGS)  # launch/local.py adds the device count
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "launch", "local.py"),
            "--num-processes",
            "2",
            "--devices-per-process",
            "4",
            "--",
            "smoke",
            "--config",
            "configs/smoke.py:tiny",
            "--workdir",
            str(tmp_path / "ckpt"),
            "--config.mesh.fsdp=2",
            "--config.train.steps=4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summaries = [line for line in run.stdout.splitlines() if "summary:" in line]
    assert len(summaries) == 2, run.stdout[-3000:]
    for line in summaries:
        assert "devices=8" in line and "processes=2" in line and "restore_bit_exact=True" in line
    # Both processes computed the same global loss.
    losses = {line.split("last_loss=")[1].split(",")[0] for line in summaries}
    assert len(losses) == 1
    assert (tmp_path / "ckpt" / "4").is_dir()
