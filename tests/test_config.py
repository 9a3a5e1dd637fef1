"""Config loading, command-line overrides, and validation errors that name the field."""

import os
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


def test_a_size_override_may_name_any_field_of_its_model_config():
    """`model.generator.overrides` (and the VLM's) hold only the fields a size changes, so a
    command-line override may add another field of the model config; a name that is not one is
    refused when the model is built, naming it."""
    from qk_jax.model_config import build_kontext_config

    config = config_lib.load_config(
        "configs/stage2.py:demo",
        ["model.generator.overrides.absolute_positions=True", "model.generator.overrides.local_mixing=True"],
    )
    generator = build_kontext_config(config).generator
    assert generator.absolute_positions and generator.local_mixing and generator.num_layers == 3
    typo = config_lib.load_config("configs/stage2.py:paper", ["model.generator.overrides.local_mixin=True"])
    with pytest.raises(config_lib.ConfigError, match=r"model\.generator\.overrides\.local_mixin does not exist"):
        build_kontext_config(typo)
    with pytest.raises(config_lib.ConfigError, match="model.generatr"):
        config_lib.load_config("configs/stage2.py:demo", ["model.generatr.overrides.local_mixing=True"])


def test_a_size_override_on_the_command_line():
    """The tools' flag parser (`qk_jax.cli.parse_flags`) takes a `--config.<...>.overrides.<field>`
    that the size's overrides lack (ml_collections' own parser refuses any new key), beside the
    ordinary overrides; in a fresh process, as a tool parses its flags."""
    code = (
        "from absl import flags\n"
        "from ml_collections import config_flags\n"
        "from qk_jax import cli\n"
        "from qk_jax.model_config import build_kontext_config\n"
        "config_flags.DEFINE_config_file('config', None, '')\n"
        "cli.parse_flags(['prog', '--config', 'configs/stage2.py:demo', '--config.train.steps=3',\n"
        "    '--config.model.generator.overrides.local_mixing=True',\n"
        "    '--config.model.generator.overrides.txt_positions=zeros'])\n"
        "g = build_kontext_config(flags.FLAGS.config).generator\n"
        "print(flags.FLAGS.config.train.steps, g.local_mixing, g.txt_positions, g.num_layers)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "True", "zeros", "3"]


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


def smoke(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "qk_jax.cli", "smoke", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def last_line(run) -> str:
    return [line for line in run.stderr.splitlines() if line.strip()][-1]


@pytest.mark.slow  # a smoke training run in a subprocess
def test_cli_help_lists_tools_and_smoke_runs_with_overrides(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qk_jax.cli", "--help"], capture_output=True, text=True, check=True)
    assert "smoke" in out.stdout
    workdir = str(tmp_path / "w")
    overrides = ["--config.train.steps=12", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    # From another folder: a config path relative to the repository is found there, as load_config finds it.
    run = smoke("--config", "configs/smoke.py:tiny", "--workdir", workdir, *overrides, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = [line for line in run.stdout.splitlines() if line.startswith("summary:")][-1]
    assert "restore_bit_exact=True" in summary and "'fsdp': 2" in summary
    first = float(summary.split("first_loss=")[1].split(",")[0])
    last = float(summary.split("last_loss=")[1].split(",")[0])
    assert last < first
    # The parameter shardings are printed whole (a multi-line record of our own is not cut to one line).
    assert "blocks/qkv/kernel" in run.stderr and "embed " in run.stderr, run.stderr[-3000:]

    again = smoke("--config", "configs/smoke.py:tiny", "--workdir", workdir, *overrides)
    assert again.returncode == 1 and "loss" not in again.stderr, again.stderr[-3000:]
    assert last_line(again).startswith(
        f"qk-jax smoke: error: WorkdirError: workdir {workdir} is not empty (it holds ['12'])"
    ), last_line(again)
    bad = smoke("--config", "configs/smoke.py:tiny", "--workdir", str(tmp_path / "b"), "--config.mesh.tensor=8")
    assert bad.returncode != 0 and "model.num_heads" in bad.stderr
    for spec, message in (
        ("configs/smoke.py:huge", "ValueError: unknown size 'huge'; choose one of ['small', 'tiny']"),
        ("configs/smok.py:tiny", "config file 'configs/smok.py' does not exist"),
    ):
        run = smoke("--config", spec, "--workdir", str(tmp_path / "c"))
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
        assert last_line(run).startswith(f"qk-jax smoke: error: ConfigError: --config {spec}: {message}"), last_line(
            run
        )
    run = smoke("--workdir", str(tmp_path / "c"))
    assert run.returncode == 1 and "--config is required" in last_line(run), run.stderr[-3000:]
    assert not os.path.exists(tmp_path / "b") and not os.path.exists(tmp_path / "c")


def test_every_stage_config_is_in_range_and_a_value_out_of_range_names_its_field():
    from configs import base
    from qk_jax import model_config

    for stage in (1, 2, 3):
        for size in base.SIZES:
            model_config.check_ranges(base.stage_config(stage, size))
    config = base.stage_config(2, "tiny")
    model_config.validate(config, 8)
    for field, value, interval in (
        ("train.steps", 0, r"\[1, inf\)"),
        ("train.learning_rate", -1e-3, r"\(0, inf\)"),
        ("train.learning_rate", float("nan"), r"\(0, inf\)"),
        ("train.warmup_steps", -5, r"\[0, inf\)"),
        ("train.log_every", 0, r"\[1, inf\)"),  # would divide by zero at the first log line
        ("train.ema_decay", 1.0, r"\[0, 1\)"),
        ("train.b2", 1.5, r"\[0, 1\)"),
        ("model.dropout.no_text", -0.1, r"\[0, 1\]"),
        ("sample.steps", 0, r"\[1, inf\)"),
        ("train.checkpoint_every", None, r"\[1, inf\)"),
    ):
        bad = base.stage_config(2, "tiny")
        config_lib.set_field(bad, field, value)
        with pytest.raises(config_lib.ConfigError, match=f"config field {field}=.* must be a number in {interval}"):
            model_config.validate(bad, 8)
    # A warm-up as long as the run leaves the cosine no step to decay over (optax: 'requires
    # positive decay_steps'), as `--config.train.steps=2` of the demo's stage 2 would.
    short = base.stage_config(2, "demo")
    config_lib.set_field(short, "train.steps", 2)
    with pytest.raises(config_lib.ConfigError, match=r"train.warmup_steps=\d+ must be below train.steps=2"):
        model_config.validate(short, 8)
    config_lib.set_field(short, "train.warmup_steps", 1)
    model_config.validate(short, 8)
