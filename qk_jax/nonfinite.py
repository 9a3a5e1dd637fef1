"""Non-finite training steps: stop at one (naming it, nothing saved) or skip it and count it.

The jitted step flags a step whose loss, gradient norm or update is not finite and, under
`train.nonfinite = "skip_step"`, leaves the state unchanged; `NonFiniteGuard` reads that flag
on the host one step late, so the host never waits for a step only to check it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from qk_jax import checkpoint as ckpt_lib
from qk_jax import logs


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient norm or update under `train.nonfinite = "stop"` (names the step)."""


class NonFiniteGuard:
    """Reads each step's `nonfinite` flag one step late (the host does not wait for every
    step: the next one is already dispatched), and at once before a log line or a save.
    "stop": NonFiniteError naming the step; "skip_step": the step (already left unchanged
    inside the jitted step) is counted and reported in one line."""

    def __init__(self, mode: str, skips: int = 0, last_saved: int | None = None):
        self.mode, self.skips, self.last_saved = mode, skips, last_saved
        self._pending: tuple[int, Any] | None = None

    def push(self, step: int, metrics) -> None:
        """After dispatching `step`: settles the previous step and keeps this one pending."""
        self.settle()
        self._pending = (step, metrics)

    def settle(self) -> None:
        """Checks the pending step (waits for it)."""
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        if not bool(jax.device_get(metrics["nonfinite"])):
            return
        if self.mode == "stop":
            raise NonFiniteError(_nonfinite_message(step, metrics, self.last_saved))
        self.skips += 1
        logs.warning(
            f"step {step}: {_nonfinite_what(metrics)} not finite; update skipped ({self.skips} skipped so far)"
        )


def _nonfinite_what(metrics) -> str:
    loss, grad_norm = (float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm"))
    if np.isfinite(loss) and np.isfinite(grad_norm):
        return "the updated parameters are"
    return f"loss {loss:.4g} / gradient norm {grad_norm:.4g}"


def _nonfinite_message(step: int, metrics, last_saved: int | None) -> str:
    kept = f"checkpoints up to step {last_saved} are kept" if last_saved else "no checkpoint was written"
    return (
        f"step {step}: {_nonfinite_what(metrics)} not finite; stopped without saving it ({kept}; config field "
        f"train.nonfinite='skip_step' skips such steps instead)"
    )


def skips_before(checkpointer, start: int) -> int:
    """Non-finite steps skipped before `start` (saved in the step's meta)."""
    if not start:
        return 0
    return int(ckpt_lib.read_json_item(checkpointer.directory, start, "meta").get("nonfinite_skips", 0))
