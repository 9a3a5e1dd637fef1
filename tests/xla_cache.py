"""The suite's persistent compilation cache (conftest: JAX_COMPILATION_CACHE_DIR, one folder
per pytest-xdist worker) around tests that make this process's file writes fail."""

from __future__ import annotations

import contextlib
import os
import time


@contextlib.contextmanager
def dropping_entries_written():
    """For a block in which this process's file writes may fail (a test's full disk): the
    cache entries written during it, possibly cut short, are removed at its end, so no later
    test of this worker reads a half-written program (jax would warn and compile it again)."""
    start = time.time() - 1.0  # file times may be coarser than time.time()
    try:
        yield
    finally:
        folder = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
        if os.path.isdir(folder):
            for entry in os.scandir(folder):
                if entry.is_file() and entry.stat().st_mtime >= start:
                    os.remove(entry.path)
