"""`qk-jax` tools choose their JAX platform before jax loads: quiet on machines without a TPU
even with libtpu installed, the user's JAX_PLATFORMS always wins, TPU and GPU hosts keep theirs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from cli_env import ROOT, tpu_init_errors, user_env
from qk_jax import platforms


def test_configure_choices(monkeypatch):
    monkeypatch.setattr(platforms, "has_tpu", lambda environ: False)
    monkeypatch.setattr(platforms, "has_gpu", lambda: False)
    env = {}
    assert platforms.configure(env, "train")["JAX_PLATFORMS"] == "cpu"
    assert env["TPU_ACCELERATOR_TYPE"] and env["TPU_WORKER_HOSTNAMES"]
    env = {"JAX_PLATFORMS": ""}  # set, even empty: the user's choice
    assert platforms.configure(env, "train") == {} and env == {"JAX_PLATFORMS": ""}
    monkeypatch.setattr(platforms, "has_gpu", lambda: True)
    env = {}
    platforms.configure(env, "sample")
    assert "JAX_PLATFORMS" not in env and env["TPU_WORKER_HOSTNAMES"] == "localhost"  # jax picks the GPU
    monkeypatch.setattr(platforms, "has_tpu", lambda environ: True)
    env = {}
    assert platforms.configure(env, "train") == {} and env == {}  # a TPU host is left alone
    env = {"TPU_ACCELERATOR_TYPE": "v5p-8"}
    platforms.configure(env, "aot")  # aot compiles on the CPU wherever it runs; set variables are kept
    assert env["JAX_PLATFORMS"] == "cpu" and env["TPU_ACCELERATOR_TYPE"] == "v5p-8"


def test_tpu_host_variables_mean_a_tpu():
    assert platforms.has_tpu({"TPU_WORKER_ID": "0"})


@pytest.mark.slow
def test_cli_tool_prints_no_tpu_init_errors(tmp_path):
    assert importlib.util.find_spec("libtpu") is not None, "the test extra installs libtpu (jax[tpu])"
    assert not platforms.has_tpu(), "this test describes a machine without TPU chips"
    env = user_env()
    # Control: the same environment without qk-jax's choice makes libtpu print its errors.
    bare = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True, text=True, timeout=300
    )
    assert bare.returncode == 0 and tpu_init_errors(bare.stderr), bare.stderr[-2000:]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qk_jax.cli",
            "smoke",
            "--config",
            "configs/smoke.py:tiny",
            "--config.train.steps=2",
            "--workdir",
            str(tmp_path / "smoke"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restore_bit_exact=True" in proc.stdout
    assert tpu_init_errors(proc.stderr + proc.stdout) == [], proc.stderr[-3000:]
