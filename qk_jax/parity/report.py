"""The per-stage error table and one-line verdict shared by every parity tool."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import numpy as np


@dataclasses.dataclass
class Row:
    stage: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    tol: float
    ok: bool


def compare(ours, ref) -> tuple[float, float]:
    """(max |ours - ref|, that divided by max |ref|): error relative to the output's scale."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {ours.shape} vs reference {ref.shape}")
    err = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return err, err / max(scale, 1e-30)


class ParityReport:
    """Collects rows, prints a table, ends with a verdict line; `exit_code` is 0 iff all pass."""

    def __init__(self, title: str, stream=None):
        self.title = title
        self.rows: list[Row] = []
        self.stream = stream or sys.stdout

    def add(self, stage: str, ours, ref, tol: float) -> Row:
        max_abs, max_rel = compare(ours, ref)
        row = Row(stage, tuple(np.shape(ref)), max_abs, max_rel, tol, bool(max_rel <= tol))
        self.rows.append(row)
        return row

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def table(self) -> str:
        header = ("stage", "shape", "max abs err", "max rel err", "tolerance", "")
        rows = [
            (
                r.stage,
                "x".join(map(str, r.shape)),
                f"{r.max_abs:.3e}",
                f"{r.max_rel:.3e}",
                f"{r.tol:.0e}",
                "ok" if r.ok else "FAIL",
            )
            for r in self.rows
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        return "\n".join([self.title, fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows])

    def verdict(self) -> str:
        if not self.rows:
            return "PARITY FAIL: nothing was compared"
        worst = max(self.rows, key=lambda r: r.max_rel / r.tol)
        if self.ok:
            return (
                f"PARITY OK: {len(self.rows)} stages within tolerance "
                f"(worst {worst.stage}: rel {worst.max_rel:.2e} <= {worst.tol:.0e})"
            )
        failed = [r.stage for r in self.rows if not r.ok]
        return (
            f"PARITY FAIL: {len(failed)} of {len(self.rows)} stages above tolerance, first {failed[0]} "
            f"(worst {worst.stage}: rel {worst.max_rel:.2e} > {worst.tol:.0e})"
        )

    def print(self) -> int:
        print(self.table(), file=self.stream)
        print(self.verdict(), file=self.stream)
        self.stream.flush()
        return 0 if self.ok else 1


def low_memory_loading() -> bool:
    """`low_cpu_mem_usage` for diffusers/transformers `from_pretrained`: True when `accelerate` is
    installed (weights load straight into an empty model); without it diffusers falls back to a
    random init plus one shard at a time, and warns — we pass False to skip the warning."""
    return importlib.util.find_spec("accelerate") is not None
