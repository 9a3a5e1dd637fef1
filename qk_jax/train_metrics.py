"""What a training run records per logging window: metrics.jsonl, TensorBoard and the log line.

A window's metrics are summed on device step by step (`accumulate`) and turned into one
record of window means (`window_record`): loss, gradient norm, learning rate, per-task
losses over every sample of each task, throughput and MFU against the device's peak.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax import flops, logs, paths
from qk_jax.data.vocab import TASKS


def peak_flops_per_device(override_tflops: float) -> float | None:
    """Peak FLOP/s of one device: the config's value, the chip's table entry, or on CPU the
    measured matmul peak shared by the simulated devices."""
    if override_tflops:
        return override_tflops * 1e12
    peak = flops.peak_flops_for()
    if peak and jax.devices()[0].platform == "cpu":
        peak /= jax.local_device_count()  # simulated devices share the host's cores
    return peak


def summary_writer(workdir: str, purge_step: int | None = None):
    """TensorBoard writer (`tb_writer`: a URL workdir too); `purge_step` makes TensorBoard drop
    the earlier events of steps >= purge_step (those a resumed run writes again)."""
    from qk_jax import tb_writer

    return tb_writer.summary_writer(paths.join(workdir, "tb"), purge_step=purge_step)


def _record_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line cut short by a kill."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def drop_metrics_after(path: str, step: int) -> int:
    """Removes the records of steps after `step` (and any line cut short by a kill) from
    metrics.jsonl, rewritten atomically; returns how many lines were dropped."""
    if not paths.exists(path):
        return 0
    lines = paths.read_text(path).splitlines(keepends=True)
    steps = [_record_step(line) for line in lines]
    keep = [line for line, s in zip(lines, steps) if s is not None and s <= step]
    if len(keep) == len(lines):
        return 0
    if paths.is_url(path):  # one object write replaces the object whole
        paths.write_text(path, "".join(keep))
    else:
        paths.write_text(path + ".tmp", "".join(keep))
        paths.replace(path + ".tmp", path)
    return len(lines) - len(keep)


def accumulate(window, metrics):
    """Adds one step's metrics to the logging window's sums (on device; `None` starts a window)."""
    return metrics if window is None else jax.tree.map(jnp.add, window, metrics)


def window_record(
    step: int, m: dict, n_steps: int, step_seconds: float, batch: dict, flops_per_step: float, peak: float
) -> dict:
    """One log record from metrics summed over the window's `n_steps` steps: the loss, gradient
    norm and learning rate are window means; per-task losses are means over every sample of
    each task in the window (batches are grouped by input count, so one step rarely holds
    every task)."""
    sums, counts = np.asarray(m["task_loss_sum"]), np.asarray(m["task_count"])
    per_task = {TASKS[i]: float(sums[i] / counts[i]) for i in range(len(TASKS)) if counts[i] > 0}
    tokens = int(np.prod(batch["position_ids"].shape[-2:])) + int(np.prod(batch["img_ids"].shape[-3:-1]))
    if "img_ids" in batch and batch["img_ids"].ndim == 4:  # grad accumulation: (A, B, N, 3)
        tokens *= batch["img_ids"].shape[0]
    n_dev = jax.device_count()
    achieved = flops_per_step / step_seconds / n_dev if step_seconds > 0 else 0.0
    return {
        "step": step,
        "loss": float(m["loss"]) / n_steps,
        "task_loss": per_task,
        "steps_averaged": n_steps,
        "grad_norm": float(m["grad_norm"]) / n_steps,
        "learning_rate": float(m.get("learning_rate", 0.0)) / n_steps,
        "step_seconds": step_seconds,
        "tokens_per_second": tokens / step_seconds if step_seconds > 0 else 0.0,
        "tflops_per_device": achieved / 1e12,
        "mfu": achieved / peak if peak else 0.0,
    }


def log_record(record: dict, path: str, writer) -> None:
    tasks = " ".join(f"{k}={v:.4f}" for k, v in record["task_loss"].items())
    logs.info(
        f"step {record['step']:6d}  loss {record['loss']:.4f}  [{tasks}]  |g| {record['grad_norm']:.3f}  "
        f"{record['step_seconds']:.3f}s/step  {record['tokens_per_second']:.0f} tok/s  "
        f"{record['tflops_per_device']:.3f} TFLOP/s/dev  MFU {100 * record['mfu']:.1f}%  "
        f"(compute {record['compute_seconds']:.3f}s, data {record['data_seconds']:.3f}s, "
        f"checkpoint {record['checkpoint_seconds']:.3f}s per step)"
    )
    paths.append_text(path, json.dumps(record) + "\n")
    if writer is not None:
        s = record["step"]
        for key in (
            "loss",
            "grad_norm",
            "learning_rate",
            "step_seconds",
            "tokens_per_second",
            "tflops_per_device",
            "mfu",
            "compute_seconds",
            "data_seconds",
            "checkpoint_seconds",
        ):
            writer.add_scalar(f"train/{key}", record[key], s)
        for task, value in record["task_loss"].items():
            writer.add_scalar(f"loss/{task}", value, s)
        writer.flush()
