"""Shared benchmark machinery: environment, timing, the measured matmul peak, records, tables.

Every benchmark compares ours (JAX) with the PyTorch reference on the same configuration
in one process and reports `Record`s:

    {"name": str, "ours_s": float, "reference_s": float | None, "ratio": float | None,
     "flops": float | None, "ours_tflops": float | None, "extra": {...}}

- `ours_s` / `reference_s`: median wall seconds of one call after warm-up (compilation
  excluded; it is reported in `extra["compile_s"]` where relevant);
- `ratio` = ours_s / reference_s (> 1: ours is slower);
- `flops`: the analytic FLOP count of one call (each benchmark documents what it counts);
- `ours_tflops` = flops / ours_s / 1e12; `extra["peak_fraction"]` = that over the measured
  matmul peak of the same framework on the same machine.

Timing: `compare` alternates the two sides call by call (A B A B ...) so that load from
other processes on a shared machine hits both alike; JAX results are waited for with
`jax.block_until_ready`; PyTorch runs under `torch.no_grad()` unless a gradient is wanted,
with `torch.set_num_threads` equal to the threads XLA's CPU client uses (one per core).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

# Before jax is imported anywhere: libtpu (the `tpu` extra) otherwise prints an
# initialisation error on a machine without TPUs.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def threads() -> int:
    """CPU threads both frameworks use (XLA's CPU client uses one per core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def setup_torch():
    import torch

    torch.set_num_threads(threads())
    return torch


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
    """Wall and process-CPU seconds of each timed call; `median` (wall) is what records report.

    CPU time (all threads of the process) is robust to other processes taking the cores
    (a single-thread run's CPU time is its wall time on an idle machine).
    """

    times: list[float]
    cpu: list[float] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu) if self.cpu else None

    def add(self, wall: float, cpu: float) -> None:
        self.times.append(wall)
        self.cpu.append(cpu)


def _sync(out: Any) -> Any:
    """Waits for JAX results and for queued CUDA work of PyTorch (a no-op for CPU tensors / numpy)."""
    if "jax" in sys.modules:
        import jax

        leaves = [x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)]
        if leaves:
            jax.block_until_ready(leaves)
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    return out


def time_call(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call, results waited for."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = _sync(fn())
    return time.perf_counter() - t0, time.process_time() - c0, out


def timeit(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5) -> Timing:
    """Timing of `repeat` calls of `fn()` after `warmup` calls."""
    for _ in range(warmup):
        time_call(fn)
    timing = Timing([])
    for _ in range(repeat):
        timing.add(*time_call(fn)[:2])
    return timing


def compare(
    ours: Callable[[], Any], reference: Callable[[], Any], *, warmup: int = 1, repeat: int = 5
) -> tuple[Timing, Timing]:
    """Times both sides alternately (A B A B ...) after `warmup` calls of each."""
    for _ in range(warmup):
        time_call(ours)
        time_call(reference)
    a, b = Timing([]), Timing([])
    for _ in range(repeat):
        a.add(*time_call(ours)[:2])
        b.add(*time_call(reference)[:2])
    return a, b


# ----------------------------------------------------------------------------- peak


def matmul_peak(n: int = 2048, repeat: int = 5) -> dict[str, float]:
    """Measured FLOP/s of an (n, n) @ (n, n) float32 matmul in JAX (jitted) and in PyTorch.

    This is the practical ceiling of dense float32 work on this machine (best of `repeat`
    calls); achieved FLOP/s of a model are reported as a fraction of it.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    torch = setup_torch()
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    with torch.no_grad():
        t_jax, t_torch = compare(lambda: f(ja, jb), lambda: torch.mm(ta, tb), warmup=2, repeat=repeat)
    flops = 2.0 * n**3
    # The best of the repeats: a peak is what the machine can do, not what it did while
    # other processes held the cores.
    return {"n": n, "jax_flops_per_s": flops / t_jax.min, "torch_flops_per_s": flops / t_torch.min}


# ----------------------------------------------------------------------------- records


def timing_extra(ours: Timing, reference: Timing) -> dict[str, Any]:
    """The spread and CPU times of a comparison, for a record's `extra`."""
    return {
        "ours_min_s": ours.min,
        "reference_min_s": reference.min,
        "ours_cpu_s": ours.cpu_median,
        "reference_cpu_s": reference.cpu_median,
        "repeat": len(ours.times),
    }


def record(
    name: str,
    ours_s: float,
    reference_s: float | None,
    *,
    flops: float | None = None,
    peak: float | None = None,
    **extra,
) -> dict[str, Any]:
    """One benchmark result in the JSON format documented at the top of this module."""
    ratio = None if not reference_s else ours_s / reference_s
    tflops = None if not flops else flops / ours_s / 1e12
    if tflops is not None and peak:
        extra["peak_fraction"] = tflops * 1e12 / peak
    return {
        "name": name,
        "ours_s": ours_s,
        "reference_s": reference_s,
        "ratio": ratio,
        "flops": flops,
        "ours_tflops": tflops,
        "extra": extra,
    }


def comparison(
    name: str, ours: Timing, reference: Timing, *, flops: float | None, peak: dict[str, float], **extra
) -> dict[str, Any]:
    """A record of ours vs the reference: medians, FLOP/s of both sides against their own
    framework's matmul peak (`matmul_peak`), spread and CPU times."""
    if flops:
        extra["reference_tflops"] = flops / reference.median / 1e12
        extra["reference_peak_fraction"] = flops / reference.median / peak["torch_flops_per_s"]
    return record(
        name,
        ours.median,
        reference.median,
        flops=flops,
        peak=peak["jax_flops_per_s"],
        **extra,
        **timing_extra(ours, reference),
    )


# ----------------------------------------------------------------------------- train steps


def copy_tree(tree: Any) -> Any:
    """A copy of a tree of arrays as JAX arrays (donated buffers must not alias numpy / torch memory)."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def compare_train_steps(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Sequence[Any],
    torch_model,
    torch_loss: Callable[[], Any],
    *,
    lr: float,
    repeat: int,
    weight_decay: float = 0.01,
) -> dict[str, Any]:
    """Times one AdamW training step on both sides, alternately.

    Ours: `loss_fn(params, *batch)` differentiated, `optax.adamw` applied, the whole step
    one jitted program with the parameters and optimizer state donated. Reference:
    `torch_loss().backward()` and `torch.optim.AdamW.step()` on every parameter of
    `torch_model` (train mode). Both update all parameters with the same hyperparameters.
    Returns {"ours", "reference" (Timings), "compile_s", "first_loss_ours",
    "first_loss_reference", "params"}.
    """
    import jax
    import optax
    import torch

    tx = optax.adamw(lr, weight_decay=weight_decay)
    state = {"params": copy_tree(params)}
    state["opt"] = tx.init(state["params"])

    def step(p, o, *b):
        loss, grads = jax.value_and_grad(loss_fn)(p, *b)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state["params"], state["opt"], *batch).compile()
    compile_s = time.perf_counter() - t0
    losses: dict[str, float] = {}

    def ours():
        state["params"], state["opt"], loss = compiled(state["params"], state["opt"], *batch)
        losses.setdefault("ours", float(loss))
        return loss

    torch_model.train()
    opt = torch.optim.AdamW(torch_model.parameters(), lr=lr, weight_decay=weight_decay)

    def reference():
        opt.zero_grad(set_to_none=True)
        loss = torch_loss()
        loss.backward()
        opt.step()
        losses.setdefault("reference", loss.item())
        return loss

    ours_t, ref_t = compare(ours, reference, repeat=repeat)
    torch_model.eval()
    n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
    return {
        "ours": ours_t,
        "reference": ref_t,
        "compile_s": compile_s,
        "first_loss_ours": losses["ours"],
        "first_loss_reference": losses["reference"],
        "params": n_params,
    }


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "s":
        return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "gflop":
        return f"{v / 1e9:.2f}"
    if kind == "gflops":
        return f"{v * 1e3:.1f}"
    if kind == "%":
        return f"{100 * v:.0f}%"
    return str(v)


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [title, "", line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def records_table(title: str, records: Sequence[dict[str, Any]], reference: str = "PyTorch") -> str:
    """The standard table of ours vs the reference for a list of records."""

    def cpu_ratio(r):
        a, b = r["extra"].get("ours_cpu_s"), r["extra"].get("reference_cpu_s")
        return a / b if a and b else None

    rows = [
        [
            r["name"],
            _fmt(r["ours_s"], "s"),
            _fmt(r["reference_s"], "s"),
            _fmt(r["ratio"], "x"),
            _fmt(cpu_ratio(r), "x"),
            _fmt(r["flops"], "gflop"),
            _fmt(r["ours_tflops"], "gflops"),
            _fmt(r["extra"].get("peak_fraction"), "%"),
        ]
        for r in records
    ]
    headers = [
        "benchmark",
        "ours (JAX)",
        reference,
        "ours/ref",
        "CPU-time ours/ref",
        "GFLOP",
        "ours GFLOP/s",
        "of peak",
    ]
    return table(title, headers, rows)


def default_peak(quick: bool) -> dict[str, float]:
    """The matmul peak a benchmark measures when run on its own (`run.py` measures it once)."""
    return matmul_peak(512 if quick else 2048, repeat=2 if quick else 5)


def report(title: str, records: list[dict[str, Any]], setup: Any, reference: str = "PyTorch") -> list[dict]:
    """Stores the setup description in each record, prints the table, returns the records."""
    for r in records:
        r["extra"]["setup"] = setup
    print(records_table(title, records, reference=reference))
    print()
    return records


def script_main(run: Callable[..., Any], doc: str | None) -> None:
    """`python benchmarks/<name>.py [--quick]`: runs one benchmark module on its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (a smoke run)")
    run(parser.parse_args().quick)


def machine_info() -> dict[str, Any]:
    """Machine, library versions and settings, stored with every results file."""
    import importlib.metadata as md

    import jax

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": threads(),
        "jax_devices": [str(d.device_kind) for d in jax.devices()][:1],
        "jax_device_count": jax.device_count(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        info["cpu"] = platform.processor()
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "diffusers"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    return info


def write_json(path: str, records: Sequence[dict[str, Any]], machine: dict[str, Any]) -> None:
    """JSON lines: one record per line, then `{"machine": {...}}` as the last line."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps({"machine": machine}) + "\n")


def case_in_fresh_process(script: str, args: Sequence[str], xla_flags: str, what: str) -> dict[str, Any]:
    """Runs `python SCRIPT ARGS` in a fresh CPU-only process with `XLA_FLAGS=xla_flags` (XLA
    reads its flags once per process) and no persistent compilation cache (every process
    compiles what it needs); returns the JSON object of its last stdout line. A failure
    exits naming `what` with the end of the process's stderr."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=xla_flags)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), *args], env=env, capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])
