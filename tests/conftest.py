"""Test set-up: 8 simulated CPU devices, float32 matmuls at highest precision.

The environment must be set before jax is imported anywhere, hence at the top of
conftest (pytest imports it before any test module).
"""

import os

from cli_env import FAST_COMPILE_FLAGS  # imports no jax

# 8 simulated devices; the fast-compile flags (cli_env.FAST_COMPILE_FLAGS).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the `tpu` extra, used for ahead-of-time compilation) otherwise prints an
# initialisation error at every `import jax` on a machine without TPUs.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# libtpu's machine-wide lock would stop the in-process AOT compiles while another process
# holds it; without a TPU libtpu is only a compiler (what `qk-jax aot` sets, qk_jax.platforms).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A persistent XLA compilation cache shared by the suite and its subprocesses: many tests
# compile the same tiny programs (e.g. each `train()` call re-jits its step).
# Made here, it is removed at the end of the session (`pytest_sessionfinish`); one the user
# names is kept.
CREATED_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    CREATED_CACHE_DIR = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qk_jax_xla_cache_")
# One cache folder per pytest-xdist worker (`-n`): jax writes an entry in place, unlocked, so
# a worker could read another's half-written entry of the same program. (A size limit would
# make jax lock the cache, but then one entry left half-written by a process killed while
# writing it fails every later write.)
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"]
    )
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402 - after the environment above (see the module docstring)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices (conftest sets XLA_FLAGS)"
    return jax.devices()


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small Kontext-Shapes dataset (every task, 32x32) shared by the training tests."""
    from qk_jax.data import builders

    out = tmp_path_factory.mktemp("kontext_shapes")
    builders.build_shapes(str(out), num=48, num_eval=8, height=32)
    return str(out)


def pytest_sessionfinish(session):
    """The compilation cache this process made goes (under pytest-xdist, the controller's:
    the workers' caches are folders in it)."""
    if CREATED_CACHE_DIR is not None:
        import shutil

        shutil.rmtree(CREATED_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """Modules with slow tests first, the slowest kind first (every test slow, then some),
    otherwise in collection order. Under pytest-xdist (`-n auto`, whole files per worker, in
    this order: setup.cfg's `--dist loadfile --no-loadscope-reorder`) the long files start
    first and the short ones fill in at the end, so the workers finish together."""

    def module_rank(module: str) -> int:
        slow = [item.get_closest_marker("slow") is not None for item in by_module[module]]
        return 0 if all(slow) else 1 if any(slow) else 2

    by_module: dict[str, list] = {}
    for item in items:
        by_module.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    order = sorted(by_module, key=module_rank)  # stable: collection order within a rank
    items[:] = [item for module in order for item in by_module[module]]
