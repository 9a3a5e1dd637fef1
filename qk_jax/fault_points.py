"""Pause points for the fault tests: inert unless the environment names one.

`pause_point("surgery.written")` returns at once unless the environment variable
`QK_JAX_PAUSE_AT` equals that name. When it does, the process prints
`qk-jax: paused at surgery.written (QK_JAX_PAUSE_AT)` to stderr and sleeps until it is
killed, so a test can `kill -9` a real `qk-jax` tool at an exact moment of its work instead
of guessing at a race (tests/test_faults.py). The points:

  surgery.written  `qk-jax surgery`: the output checkpoint is written to `DST.partial`,
                   before the bit check, the report and the rename into place
  data.writing     `qk-jax data shapes` / `import`: a split's records are being written
                   into tfds' temporary folder (after the first record of each task)

No user-facing behaviour depends on it; nothing sets the variable but the tests.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "QK_JAX_PAUSE_AT"
POINTS = ("surgery.written", "data.writing")


def pause_point(name: str) -> None:
    """Sleeps forever (until killed) when `QK_JAX_PAUSE_AT` is `name`; otherwise nothing."""
    if os.environ.get(ENV) != name:
        return
    assert name in POINTS, name
    print(f"qk-jax: paused at {name} ({ENV})", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)
