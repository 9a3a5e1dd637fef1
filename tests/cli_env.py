"""The environment of a `qk-jax` subprocess as a user's shell gives it: none of the platform
variables conftest sets for the test process, so the tool's own platform choice is tested."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the suite and its subprocesses compile is tiny, so compile time dominates run time:
# LLVM optimisation off and XLA:CPU's older fusion code generator compile the tiny stage-2
# train step in 1.7 s instead of 7.4 s (benchmarks/xla_cpu_flags.py). Float semantics are
# unchanged (results differ from the defaults' by rounding only, and every bit-exact
# comparison in the suite compiles both sides with these flags), and so is every platform
# and device choice.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# What libtpu prints when it probes for a TPU on a machine that has none.
TPU_INIT_ERRORS = ("Failed to find host bounds", "unexpected worker hostname", "could not determine TPU")
_PLATFORM_VARIABLES = (
    "JAX_PLATFORMS",
    "TPU_ACCELERATOR_TYPE",
    "TPU_WORKER_HOSTNAMES",
    "XLA_FLAGS",
    "TPU_SKIP_MDS_QUERY",
)


def user_env(**extra: str) -> dict[str, str]:
    """os.environ without the platform variables, with the repository on PYTHONPATH (and
    XLA_FLAGS only `FAST_COMPILE_FLAGS`).

    `ALLOW_MULTIPLE_LIBTPU_LOAD=1` keeps libtpu's machine-wide lock (held by any other
    process that loaded it) from cutting its TPU probe short, so the probe really runs.
    """
    env = {k: v for k, v in os.environ.items() if k not in _PLATFORM_VARIABLES}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS
    env.update(extra)
    return env


def tpu_init_errors(text: str) -> list[str]:
    """The lines of `text` that are libtpu initialisation errors."""
    return [line for line in text.splitlines() if any(e in line for e in TPU_INIT_ERRORS)]


def log_message(line: str) -> str:
    """The message of one line of a tool's output: an absl log line
    ('I1130 14:00:00.000000 1234 train.py:528] step 6 ...') without its prefix; any other line as it is."""
    head, sep, rest = line.partition("] ")
    return rest if sep and head[:1] in "IWEF" and ".py:" in head else line
