"""The report of `qk-jax aot`: whether each compiled program fits the chip, the printed
report and its verdict line, and the README's table row.

A report is the dict `aot.run` returns (JSON-serialisable; `--json` writes it): topology,
chip and HBM, mesh, config summary, and per program (`train`, `sample`) the memory analysis,
FLOPs, compile times and, for a program XLA refused, its out-of-memory request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from qk_jax import flops
from qk_jax.sharding import format_bytes

GIB = 1024**3
PROGRAMS = ("train", "sample")


def _params(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def judge(report: dict[str, Any], headroom: float | None = None) -> dict[str, Any]:
    """Sets `fits` per program and overall and the `verdict` line: a program fits when its
    peak per-device memory leaves `headroom` (a fraction) of the chip's HBM free."""
    if headroom is not None:
        report["headroom"] = float(headroom)
    if not 0.0 <= report["headroom"] < 1.0:
        raise ValueError(f"headroom={report['headroom']}: a fraction of HBM in [0, 1)")
    budget = (1.0 - report["headroom"]) * report["hbm_bytes"]
    for entry in report["programs"].values():
        entry["fits"] = entry["out_of_memory"] is None and entry["memory"]["peak"] <= budget
    report["fits"] = all(e["fits"] for e in report["programs"].values())
    report["verdict"] = verdict_line(report)
    return report


def seconds_at_peak(total_flops: float, n_dev: int, device_kind: str) -> float | None:
    key = flops.peak_key(device_kind)
    return None if key is None else float(total_flops) / (n_dev * flops.PEAK_FLOPS[key])


def peak_bytes(entry: Mapping[str, Any]) -> float:
    """A program's per-device peak: the compiled program's, or the bytes XLA said a program
    too large for the chip asks for (infinite when its message does not say)."""
    oom = entry.get("out_of_memory")
    if oom is None:
        return entry["memory"]["peak"]
    return math.inf if oom["requested_bytes"] is None else oom["requested_bytes"]


def memory_words(entry: Mapping[str, Any]) -> str:
    """ "peak 12.3 GiB", or for a program XLA found too large "out of memory: asks for 136.8 GiB of 15.8 GiB"."""
    oom = entry.get("out_of_memory")
    if oom is None:
        return f"peak {format_bytes(entry['memory']['peak'])}"
    if oom["requested_bytes"] is None:
        return f"out of memory ({oom['message']})"
    return f"out of memory: asks for {format_bytes(oom['requested_bytes'])} of {format_bytes(oom['available_bytes'])}"


def verdict_line(report: Mapping[str, Any]) -> str:
    worst = max(report["programs"].items(), key=lambda kv: peak_bytes(kv[1]))
    hbm = report["hbm_bytes"] / GIB
    word = "FITS" if report["fits"] else "DOES NOT FIT"
    parts = ", ".join(
        f"{n} {format_bytes(e['memory']['peak'])}" if e.get("out_of_memory") is None else f"{n} {memory_words(e)}"
        for n, e in report["programs"].items()
    )
    return (
        f"{word}: {parts} per device (peak: {worst[0]}) on {report['topology']} "
        f"({report['chip']}, {hbm:.0f} GiB HBM, {100 * report['headroom']:.0f}% headroom), mesh "
        f"data={report['mesh']['data']},fsdp={report['mesh']['fsdp']},tensor={report['mesh']['tensor']}, "
        f"global batch {report['config']['global_batch']}"
    )


def _flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f} FLOP"


def format_report(report: Mapping[str, Any]) -> str:
    """The printed report: per program memory and FLOPs, then the verdict as the last line."""
    lines = []
    c = report["config"]
    lines.append(
        f"topology {report['topology']} ({report['num_devices']} x {report['device_kind']}), mesh "
        f"{report['mesh']}, global batch {c['global_batch']} (grad_accum {c['grad_accum']}), dtype "
        f"{c['dtype']}, remat {c['remat']}, K = {c['num_queries']}, {c['input_images']} input image(s); "
        f"{_params(report['params_total'])} parameters"
    )
    fields = ("arguments", "outputs", "temporaries", "aliases", "generated_code", "peak")
    lines.append("")
    lines.append(f"{'per device':<18}" + "".join(f"{f:>15}" for f in fields) + f"{'fits':>7}")
    for name, e in report["programs"].items():
        if e.get("out_of_memory") is not None:  # XLA refused to compile it: no breakdown
            lines.append(f"{name:<18}{'XLA: ' + memory_words(e):>{15 * len(fields)}}{'NO':>7}")
            continue
        m = e["memory"]
        cells = "".join(f"{format_bytes(m[f]):>15}" for f in fields)
        lines.append(f"{name:<18}{cells}{'yes' if e['fits'] else 'NO':>7}")
    lines.append(
        f"{'HBM':<18}{format_bytes(report['hbm_bytes']):>15}  (budget {(1 - report['headroom']) * 100:.0f}%: "
        f"{format_bytes((1 - report['headroom']) * report['hbm_bytes'])})"
    )
    lines.append("")
    for name, e in report["programs"].items():
        f = e["flops"]
        at_peak = e.get("seconds_at_peak")
        lines.append(
            f"{name}: analytic {_flops(f['analytic'])} per {'step' if name == 'train' else 'sampling run'}"
            + (f" ({_flops(f['analytic_with_remat'])} with remat)" if "analytic_with_remat" in f else "")
            + (f", {at_peak:.3g} s at 100% of the chips' peak" if at_peak else "")
            + (
                f"; XLA cost analysis {_flops(f['xla_total'])} (counts scan bodies once)"
                if f["xla_total"] is not None
                else ""
            )
            + "; "
            f"lowered in {e['lower_seconds']:.0f} s, compiled in {e['compile_seconds']:.0f} s"
        )
        if name == "train":
            lines.append(
                "  parts: "
                + ", ".join(f"{k} {_flops(v)}" for k, v in f["parts"].items())
                + f"; train state {format_bytes(e['state_bytes_per_device'])} per device; "
                f"{_params(e['params']['trainable'])} trainable, {_params(e['params']['frozen'])} frozen"
            )
        else:
            lines.append(
                f"  {e['sample_batch']} prompts, {e['steps']} {e['method']} steps, {e['branches']} "
                f"guidance branch(es) per DiT call"
            )
    lines.append(report["verdict"])
    return "\n".join(lines)


def _table_gib(entry: Mapping[str, Any]) -> str:
    """Per-device peak in GiB for the table; "> HBM" style for a program XLA found too large."""
    peak = peak_bytes(entry)
    if entry.get("out_of_memory") is None:
        return f"{peak / GIB:.1f}"
    return "out of memory" if math.isinf(peak) else f"{peak / GIB:.1f} (out of memory)"


def markdown_table(reports) -> str:
    """One Markdown row per report (for the README): topology, mesh, batch, dtype, remat,
    per-device peak of each program, analytic FLOPs per train step, compile times, verdict."""
    head = (
        "config",
        "topology",
        "mesh (d,f,t)",
        "global batch",
        "dtype",
        "remat",
        "train GiB/dev",
        "sample GiB/dev",
        "train PFLOP/step",
        "compile train / sample (s)",
        "fits",
    )
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        c, progs = r["config"], r["programs"]
        train, sample = progs.get("train"), progs.get("sample")
        mesh = r["mesh"]
        rows.append(
            "| "
            + " | ".join(
                [
                    f"stage{c['stage']}.py:{c['size']}",
                    f"{r['topology']} ({r['num_devices']})",
                    f"{mesh['data']},{mesh['fsdp']},{mesh['tensor']}",
                    str(c["global_batch"]) + (f" ({c['grad_accum']} micro)" if c["grad_accum"] > 1 else ""),
                    c["dtype"],
                    c["remat"],
                    _table_gib(train) if train else "-",
                    f"{_table_gib(sample)} ({sample['sample_batch']} prompts)" if sample else "-",
                    f"{train['flops']['analytic'] / 1e15:.1f}" if train else "-",
                    " / ".join(f"{progs[n]['compile_seconds']:.0f}" if n in progs else "-" for n in PROGRAMS),
                    "yes" if r["fits"] else "**no**",
                ]
            )
            + " |"
        )
    return "\n".join(rows)
