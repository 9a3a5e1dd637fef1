"""Where a training step's time goes, and a `jax.profiler` trace of chosen steps.

`StepTimes` splits the training loop's wall clock, between two log points, into
  data        the host building the next batch and placing it on the devices
              (`next(iterator)`, `prepare_batch`, `place_batch`);
  checkpoint  the blocking part of a save (Orbax copies device arrays to host, then
              writes in the background; a `wait()` for that write counts here too);
  compute     the rest of the step: dispatching the jitted step and waiting for device
              results.
Dispatch is asynchronous, so the host's waits for the device are where compute time
shows: the loop reads every step's `nonfinite` flag one step late (`NonFiniteGuard`) and
fetches the window's metrics at each log point, so by a log point every step of the window
has finished and its device time lies inside the window. Attributing those waits to
compute (rather than calling `block_until_ready` after every step, which would stop the
host from building the next batch while the device runs) keeps the pipelining that
training runs with. The cost: data time overlaps the previous step's device work, so it
is a stall only by what it exceeds that work; a data share well below the compute share
means the input pipeline keeps up.

`train.profile_steps = "START:STOP"` traces the steps after the first START, up to STOP
(records `step START+1` .. `step STOP`) to `<workdir>/profile/` (a local trace written
first and copied there when the workdir is a URL, `paths`).
"""

from __future__ import annotations

import contextlib
import tempfile
import time

import jax

from qk_jax import logs, paths
from qk_jax.config import ConfigError

PARTS = ("compute", "data", "checkpoint")


@contextlib.contextmanager
def counting_compiles():
    """Yields a list that collects the seconds of every XLA program compiled inside the block
    (jax's backend-compile events): `len(...)` is how many were compiled."""
    durations: list[float] = []

    def listen(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            durations.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield durations
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


class StepTimes:
    """Seconds per part (`PARTS`) summed since the last `take()`."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.last = time.perf_counter()

    @contextlib.contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def take(self, now: float) -> dict[str, float]:
        """The window since the last take: {part: seconds}, compute being the window's time not
        spent on data or checkpoints (waits for the device and dispatch); starts a new window."""
        window = now - self.last
        out = {
            "data": self.seconds["data"],
            "checkpoint": self.seconds["checkpoint"],
        }
        out["compute"] = max(window - out["data"] - out["checkpoint"], 0.0)
        self.seconds, self.last = dict.fromkeys(PARTS, 0.0), now
        return out


def parse_steps(text: str) -> tuple[int, int] | None:
    """`train.profile_steps`: "" (off) or "START:STOP" (0 <= START < STOP)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        start, stop = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(
            f"config field train.profile_steps={text!r}: expected '' or 'START:STOP', e.g. '10:15'"
        ) from None
    if not 0 <= start < stop:
        raise ConfigError(f"config field train.profile_steps={text!r}: needs 0 <= START < STOP")
    return start, stop


class StepProfiler:
    """Starts a `jax.profiler` trace before step index `start` and stops it after step index
    `stop - 1` has finished on the device; the trace lands in `<workdir>/profile/`."""

    def __init__(self, steps: tuple[int, int] | None, dst: str):
        self.steps, self.dst = steps, dst
        self.local: str | None = None  # the folder jax.profiler writes while tracing
        self.first = 0  # the step index the trace started at
        self.last: int | None = None  # the last step index dispatched inside the trace
        self._tmp = None

    @classmethod
    def for_run(cls, profile_steps: str, workdir: str) -> StepProfiler:
        """`train.profile_steps` of a run in `workdir`: `<workdir>/profile/`, one folder per
        process when there are several (processes of one host would write the same file)."""
        dst = paths.join(workdir, "profile")
        if jax.process_count() > 1:
            dst = paths.join(dst, f"process_{jax.process_index()}")
        return cls(parse_steps(profile_steps), dst)

    def before(self, step: int) -> None:
        """Before step index `step` (a resumed run inside the range starts tracing at once)."""
        if self.steps is None or self.local is not None or not self.steps[0] <= step < self.steps[1]:
            return
        if paths.is_url(self.dst):
            self._tmp = tempfile.TemporaryDirectory(prefix="qk_jax_profile_")
            self.local = self._tmp.name
        else:
            paths.makedirs(self.dst)
            self.local = self.dst
        jax.profiler.start_trace(self.local)
        self.first, self.last = step, None

    def after(self, step: int, outputs) -> None:
        """After dispatching step index `step`: stops at the range's last step, once `outputs`
        (the step's results) are ready, so the trace holds the device work."""
        if self.local is None:
            return
        self.last = step
        if step + 1 >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops a running trace (also when the loop ends early) and puts it in place."""
        if self.local is None:
            return
        jax.profiler.stop_trace()
        if self._tmp is not None:
            paths.upload_folder(self.local, self.dst)
            self._tmp.cleanup()
            self._tmp = None
        # The range as traced: a run that ends (or resumes) inside it traces fewer steps.
        first, last = self.first + 1, (self.last if self.last is not None else self.first) + 1
        logs.info(f"profile of steps {first}..{last} written to {self.dst}")
        self.local = None
