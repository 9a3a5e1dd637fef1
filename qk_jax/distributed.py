"""Multi-process start-up: one call at the top of every tool.

`maybe_initialize()` calls `jax.distributed.initialize` when the process is one of
several:
- a local multi-process run started by `launch/local.py` (env `QK_COORDINATOR`,
  `QK_NUM_PROCESSES`, `QK_PROCESS_ID`; CPU collectives over gloo);
- a TPU pod slice or a SLURM job (JAX detects the cluster itself; set
  `QK_DISTRIBUTED=1`, which the launchers in `launch/` do).
A single process (the default) needs nothing.
"""

from __future__ import annotations

import os

import jax
import numpy as np

_initialized = False


def maybe_initialize() -> None:
    global _initialized
    if _initialized:
        return
    coordinator = os.environ.get("QK_COORDINATOR")
    if coordinator:
        num = int(os.environ["QK_NUM_PROCESSES"])
        pid = int(os.environ["QK_PROCESS_ID"])
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
        _initialized = True
    elif os.environ.get("QK_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        _initialized = True


def is_main_process() -> bool:
    return jax.process_index() == 0


def local_batch_size(global_batch: int) -> int:
    """Rows of the global batch this process feeds (`place_batch` assembles the rest)."""
    n = jax.process_count()
    if global_batch % n:
        raise ValueError(f"config field train.batch_size={global_batch} is not divisible by the {n} processes")
    return global_batch // n


def barrier(name: str) -> None:
    """Waits for every process (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_initialized() -> bool:
    """Whether `maybe_initialize` joined this process to others (jax.distributed)."""
    return _initialized


def preemption_agreed(step: int) -> bool:
    """JAX's preemption sync point (`jax.distributed` only): True on every process at the same
    `step` once any process received SIGTERM (JAX's preemption notifier catches it and tells
    the coordination service). Call it with increasing steps, on every process, every step;
    without a notice it reads a local flag (well under a microsecond)."""
    from jax.experimental import multihost_utils

    return bool(multihost_utils.reached_preemption_sync_point(int(step)))


def check_same_on_all_processes(text: str, what: str) -> None:
    """Raises RuntimeError naming `what` unless `text` is the same on every process (a CRC32
    gathered over processes; no-op with one)."""
    if jax.process_count() == 1:
        return
    import zlib

    import numpy as np
    from jax.experimental import multihost_utils

    crc = np.asarray([zlib.crc32(text.encode()) & 0x7FFFFFFF], np.int32)
    crcs = np.asarray(multihost_utils.process_allgather(crc)).ravel()
    differ = [i for i, c in enumerate(crcs) if c != crcs[0]]
    if differ:
        raise RuntimeError(f"the {what} differs between process 0 and process(es) {differ}")


def gather_ints(value: int) -> list[int]:
    """`value` of every process, in process order ([value] with one process)."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)]


def same_on_all_processes(values: list[int]) -> list[int]:
    """The primary process's list of ints on every process (listings of a shared folder can
    differ for a moment between hosts; all must walk the same steps)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
    if n == 0:
        return []
    padded = np.zeros(n, np.int32)
    padded[: min(n, len(values))] = values[:n]
    return [int(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(padded))]
