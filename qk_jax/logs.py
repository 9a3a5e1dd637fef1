"""Diagnostics of the library and its tools: `absl.logging`, emitted by process 0 only.

What a tool reports as it works (devices, parameter counts, each logged step, a resumed or
skipped step, a fallback taken) is a diagnostic and goes through `info` / `warning` here, to
stderr with absl's prefix. What a tool is asked for (the `qk-jax aot` report, the paths
`qk-jax sample` wrote, judge scores, a surgery summary) is its result and stays on stdout
with `print`.

On a multi-host run every process runs the same program; only process 0 logs, so a pod's
output is one log, not one per host. Records carry the attribute `qk_jax` so that the CLI
can show them at INFO while keeping the INFO chatter of other libraries (Orbax, grain) out
(`cli.main`, `is_ours`).
"""

from __future__ import annotations

import logging as py_logging
import sys

from absl import logging

_MARK = "qk_jax"


def _main_process() -> bool:
    """Process 0 of a multi-process run (`distributed.maybe_initialize`); any other process
    is a single one. Never starts jax's backends itself: a log line before
    `jax.distributed.initialize` must not make that call fail."""
    jax = sys.modules.get("jax")
    return jax is None or not jax.distributed.is_initialized() or jax.process_index() == 0


def info(msg: str, *args) -> None:
    if _main_process():
        logging.info(msg, *args, extra={_MARK: True})


def warning(msg: str, *args) -> None:
    if _main_process():
        logging.warning(msg, *args, extra={_MARK: True})


def error(msg: str, *args) -> None:
    if _main_process():
        logging.error(msg, *args, extra={_MARK: True})


def is_ours(record: py_logging.LogRecord) -> bool:
    return bool(getattr(record, _MARK, False))


class OnlyOursBelowWarning(py_logging.Filter):
    """Passes this package's records at any level and other libraries' from WARNING up."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or is_ours(record)


# absl names the caller's file:line in each record's prefix: the caller of info / warning,
# not this module.
for _name in ("info", "warning", "error"):
    logging.ABSLLogger.register_frame_to_skip(__file__, _name)
