"""Pause points for the fault tests: inert unless the environment names one.

`pause_point("surgery.written")` returns at once unless the environment variable
`QK_JAX_PAUSE_AT` equals that name (or `NAME@I`: only in the process of index I). When it
does, the process prints `qk-jax: paused at surgery.written (QK_JAX_PAUSE_AT), pid N` to
stderr and sleeps until it is killed or sent SIGUSR1 (which resumes it), so a test can
`kill -9` or signal a real `qk-jax` tool at an exact moment of its work instead of guessing
at a race (tests/test_faults.py, tests/test_multihost_train.py). The points:

  surgery.written  `qk-jax surgery`: the output checkpoint is written to `DST.partial`,
                   before the bit check, the report and the rename into place
  data.writing     `qk-jax data shapes` / `import`: a split's records are being written
                   into tfds' temporary folder (after the first record of each task)
  train.step_<N>   `qk-jax train`: before step N (0-based) of the loop is built and dispatched

No user-facing behaviour depends on it; nothing sets the variable but the tests.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "QK_JAX_PAUSE_AT"
POINTS = ("surgery.written", "data.writing")


def pause_point(name: str, process: int | None = None) -> None:
    """Sleeps until killed or sent SIGUSR1 when `QK_JAX_PAUSE_AT` is `name` (or `name@process`);
    otherwise nothing."""
    point, _, only = os.environ.get(ENV, "").partition("@")
    if point != name or (only and process is not None and int(only) != process):
        return
    assert name in POINTS or name.startswith("train.step_"), name
    resumed = []
    signal.signal(signal.SIGUSR1, lambda *_: resumed.append(True))
    print(f"qk-jax: paused at {name} ({ENV}), pid {os.getpid()}", file=sys.stderr, flush=True)
    while not resumed:
        time.sleep(0.05)
