"""A training step from its parts' forward FLOPs (the rule: `qk_jax.flops`), MFU, and the
per-chip peaks it is measured against."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qk_jax.flops.count import MatmulFlops, _positive
from qk_jax.models.layers import REMAT_POLICIES

# Kernels run again under the policies that keep only the attention projections: the MLP's
# input matmuls (its backward needs their outputs), the attention output projection (it
# rebuilds the residual stream the MLP reads) and the MMDiT's AdaLN modulation.
RECOMPUTED_KEEPING_ATTENTION_PROJECTIONS = (
    r"(_mlp/fc1|gate_proj|up_proj|mlp_in)/kernel$",
    r"(o_proj|attn/proj|attn/img_out|attn/txt_out)/kernel$",
    r"(_mod|single_blocks/mod)/kernel$",
)

# -------------------------------------------------------------------- a training step


@dataclasses.dataclass(frozen=True)
class Part:
    """One model part of a training step (the rule: `qk_jax.flops`).

    name: "vit", "llm", "connector", "dit", "vae", "lora", ...
    forward: its forward FLOPs (per step: all microbatches of one update, or one
      microbatch and multiply the result); a plain number counts as weight matmuls.
    weight_grads: True (every kernel trainable), False (frozen), or regexes selecting the
      trainable / LoRA-adapted kernels (`MatmulFlops.select`).
    backward_through: activation gradients flow through the part; None = when it has
      trainable weights. Set True for a frozen part with something trainable upstream.
    remat: the part's remat policy (`layers.REMAT_POLICIES`), for `recompute`.
    """

    name: str
    forward: MatmulFlops | int
    weight_grads: bool | str | Sequence[str] = False
    backward_through: bool | None = None
    remat: str = "none"


def train_step_flops(parts: Iterable[Part]) -> dict[str, Any]:
    """FLOPs of one training step, per part and in total.

    Returns {"parts": {name: {"forward", "backward_activation", "backward_weight",
    "backward", "total", "recompute"}}, "forward", "backward", "total", "recompute",
    "hardware_total"}. `total` (forward + backward) is the model-FLOPs numerator of MFU;
    `hardware_total` adds the rematerialised forward matmuls.
    """
    out: dict[str, Any] = {"parts": {}}
    for p in parts:
        if p.name in out["parts"]:
            raise ValueError(f"train_step_flops: part {p.name!r} given twice")
        if p.remat not in REMAT_POLICIES:
            raise ValueError(f"train_step_flops: part {p.name!r} remat={p.remat!r}; use one of {REMAT_POLICIES}")
        f = p.forward
        if isinstance(f, (int, float)):
            f = MatmulFlops({p.name: int(f)})
        elif not isinstance(f, MatmulFlops):
            raise TypeError(f"train_step_flops: part {p.name!r} forward is a {type(f).__name__}, not MatmulFlops")
        if p.weight_grads is True:
            weight = f.weights
        elif not p.weight_grads:
            weight = 0
        else:
            weight = f.select(p.weight_grads)
            if not weight:
                raise ValueError(
                    f"train_step_flops: part {p.name!r} weight_grads={p.weight_grads!r} selects no "
                    f"kernel; its kernels are {sorted(f.kernels)}"
                )
        through = bool(p.weight_grads) if p.backward_through is None else p.backward_through
        activation = f.weights + 2 * f.pair_total if through else 0
        backward = activation + weight
        recompute = 0
        if backward and p.remat == "full":
            recompute = f.total
        elif backward and p.remat == "dots":  # dots with batch dims (attention) are not saved
            recompute = f.pair_total
        elif backward and p.remat in ("save_attn_proj", "offload_attn_proj"):
            # The attention scores QK^T run again (the backward needs their softmax; the attention
            # output AV is kept, named), and the kernels listed above.
            recompute = f.pair_total // 2 + f.select(RECOMPUTED_KEEPING_ATTENTION_PROJECTIONS)
        out["parts"][p.name] = dict(
            forward=f.total,
            backward_activation=activation,
            backward_weight=weight,
            backward=backward,
            total=f.total + backward,
            recompute=recompute,
        )
    for key in ("forward", "backward", "total", "recompute"):
        out[key] = sum(v[key] for v in out["parts"].values())
    out["hardware_total"] = out["total"] + out["recompute"]
    return out


def format_step_flops(step: dict[str, Any]) -> str:
    """A `train_step_flops` result as a table (TFLOP per step), for logs and `qk-jax aot`."""
    cols = ("forward", "backward_activation", "backward_weight", "total", "recompute")
    heads = ("forward", "bwd act", "bwd weight", "total", "remat")
    rows = [(name, *(v[c] for c in cols)) for name, v in step["parts"].items()]
    rows.append(
        (
            "step",
            step["forward"],
            sum(v["backward_activation"] for v in step["parts"].values()),
            sum(v["backward_weight"] for v in step["parts"].values()),
            step["total"],
            step["recompute"],
        )
    )
    width = max(len(r[0]) for r in rows + [("part",)])
    lines = [f"{'part'.ljust(width)}" + "".join(f"{h:>13}" for h in heads) + "   (TFLOP per step)"]
    lines += [r[0].ljust(width) + "".join(f"{x / 1e12:>13.4f}" for x in r[1:]) for r in rows]
    return "\n".join(lines)


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s per device over the device's peak."""
    return tflops_per_device(flops_per_step, step_seconds, num_devices) * 1e12 / float(peak_flops_per_device)


def xla_flops_per_device(compiled) -> float:
    """XLA's own FLOP count of a compiled program, per device (`cost_analysis()` returns a
    dict, or a one-element list of dicts in some versions). It counts a scanned layer
    stack's body once: a cross-check at depth 1, not a replacement for the analytic count."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def tflops_per_device(flops_per_step: float, step_seconds: float, num_devices: int) -> float:
    """Achieved TFLOP/s per device (the step's FLOPs shared evenly by the devices)."""
    _positive(step_seconds=step_seconds, num_devices=num_devices)
    return float(flops_per_step) / float(step_seconds) / int(num_devices) / 1e12


# -------------------------------------------------------------------- peaks

# Dense bf16 peak FLOP/s per chip (vendor datasheets, without sparsity).
PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6e": 918e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
}

# `device_kind` as JAX reports it -> PEAK_FLOPS key (TPU kinds seen through libtpu).
_TPU_KINDS = {
    "TPU v4": "TPU v4",
    "TPU v5 lite": "TPU v5e",
    "TPU v5e": "TPU v5e",
    "TPU v5": "TPU v5p",
    "TPU v5p": "TPU v5p",
    "TPU v6 lite": "TPU v6e",
    "TPU v6e": "TPU v6e",
}


def peak_key(device_kind: str) -> str | None:
    """The `PEAK_FLOPS` key of a JAX `device_kind` string, or None when unknown."""
    kind = device_kind.strip()
    if kind in _TPU_KINDS:
        return _TPU_KINDS[kind]
    upper = kind.upper()
    if "H200" in upper:
        return "H200"
    if "H100" in upper:
        return "H100 PCIe" if "PCIE" in upper else "H100 SXM"  # "NVIDIA H100 80GB HBM3" is the SXM part
    if "A100" in upper:
        return "A100"
    return None


@functools.cache
def measure_cpu_matmul_peak(size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a large float32 `jnp` matmul (size x size x size) on the CPU, best of
    `repeats`: the CPU's practical peak for MFU. Cached per process.

    It is the whole host's peak (XLA's CPU matmul uses every core): simulated CPU devices
    (`--xla_force_host_platform_device_count`) share it, so count one device per host.
    """
    cpu = jax.devices("cpu")[0]
    x = jax.device_put(jnp.ones((size, size), jnp.float32), cpu)
    matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(matmul(x, x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(x, x))
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops_for(device: Any = None) -> float | None:
    """Peak dense FLOP/s of `device` (default: the first JAX device) from its `device_kind`;
    a measured float32 matmul for CPUs; None for an unknown accelerator (report no MFU)."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return measure_cpu_matmul_peak()
    key = peak_key(device.device_kind)
    return None if key is None else PEAK_FLOPS[key]
