"""Config loading, command-line overrides, and validation errors that name the field."""

import subprocess
import sys

import pytest

from qk_jax import config as config_lib
from qk_jax.smoke import DIVISIBLE


def test_load_and_override():
    config = config_lib.load_config("configs/smoke.py:tiny", ["train.steps=3", "mesh.fsdp=2", "model.remat=True"])
    assert config.train.steps == 3 and config.mesh.fsdp == 2 and config.model.remat is True
    with pytest.raises(config_lib.ConfigError, match="train.stepz"):
        config_lib.load_config("configs/smoke.py:tiny", ["train.stepz=3"])


def test_mesh_larger_than_device_count_names_field():
    config = config_lib.load_config("configs/smoke.py:tiny", ["mesh.data=4", "mesh.tensor=4"])
    with pytest.raises(config_lib.ConfigError, match=r"mesh\.(data|tensor).*16 devices.*8"):
        config_lib.mesh_shape(config, 8)


def test_axis_that_does_not_divide_names_field():
    config = config_lib.load_config("configs/smoke.py:tiny", ["mesh.data=1", "mesh.tensor=8"])
    with pytest.raises(config_lib.ConfigError, match=r"model.num_heads=4 .*tensor = 8"):
        config_lib.check_divisible(config, 8, DIVISIBLE)


def test_missing_required_field_names_it():
    config = config_lib.load_config("configs/smoke.py:tiny")
    del config.mesh["fsdp"]
    with pytest.raises(config_lib.ConfigError, match="mesh.fsdp"):
        config_lib.mesh_shape(config, 8)
    config = config_lib.load_config("configs/smoke.py:tiny")
    config_lib.set_field(config, "train.seed", None)
    with pytest.raises(config_lib.ConfigError, match="config field train.seed is required"):
        config_lib.require(config, ["train.seed"])


@pytest.mark.slow  # a smoke training run in a subprocess
def test_cli_help_lists_tools_and_smoke_runs_with_overrides(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qk_jax.cli", "--help"], capture_output=True, text=True, check=True)
    assert "smoke" in out.stdout
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "qk_jax.cli",
            "smoke",
            "--config",
            "configs/smoke.py:tiny",
            "--workdir",
            str(tmp_path / "w"),
            "--config.train.steps=12",
            "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = [line for line in run.stdout.splitlines() if line.startswith("summary:")][-1]
    assert "restore_bit_exact=True" in summary and "'fsdp': 2" in summary
    first = float(summary.split("first_loss=")[1].split(",")[0])
    last = float(summary.split("last_loss=")[1].split(",")[0])
    assert last < first
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "qk_jax.cli",
            "smoke",
            "--config",
            "configs/smoke.py:tiny",
            "--workdir",
            str(tmp_path / "b"),
            "--config.mesh.tensor=8",
            "--config.mesh.data=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "model.num_heads" in bad.stderr
