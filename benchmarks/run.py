"""Runs every benchmark, prints each table, and writes the records as JSON lines.

    python benchmarks/run.py [--quick] [--only vlm,mmdit,compile_time] [--json OUT.jsonl]

Benchmarks are the modules listed in `BENCHMARKS`; each exposes
`run(quick: bool, peak: dict) -> list[record]` and prints its own table. Adding one is a
new module with that function and one line here (`mmdit.py` is an example: ~190 lines,
most of them the two models' calls). `data_pipeline.py` and `judge.py` are standalone
throughput scripts without a PyTorch reference and are not run from here.

The JSON file holds one record per line (see `benchmarks/common.py` for the fields:
name, ours_s, reference_s, ratio, flops, ours_tflops, extra), then a last line
`{"machine": {...}}` with the CPU, thread count, versions and XLA_FLAGS, and the measured
matmul peak. Threads: both frameworks use as many as the process may run on, so
`taskset -c 0 python benchmarks/run.py` gives the single-thread comparison.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common

# name -> module (each with `run(quick, peak)`).
BENCHMARKS: dict[str, str] = {
    "vlm": "benchmarks.vlm",
    "mmdit": "benchmarks.mmdit",
    "compile_time": "benchmarks.compile_time",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (a smoke run)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", default=None, help="write the records here (JSON lines)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; known: {list(BENCHMARKS)}")

    machine = common.machine_info()
    print(
        f"machine: {machine.get('cpu')}, {machine['cpu_threads']} threads, {machine.get('memory_gib')} GiB; "
        f"python {machine['python']}, jax {machine['jax']}, flax {machine['flax']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}; XLA_FLAGS={machine['XLA_FLAGS']!r}\n"
    )
    peak = common.default_peak(args.quick)
    machine["matmul_peak"] = peak
    print(
        f"float32 matmul peak ({peak['n']}^3): JAX {peak['jax_flops_per_s'] / 1e9:.1f} GFLOP/s, "
        f"PyTorch {peak['torch_flops_per_s'] / 1e9:.1f} GFLOP/s\n"
    )
    records = []
    t0 = time.time()
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        records.extend(module.run(quick=args.quick, peak=peak))
    machine["wall_s"] = time.time() - t0
    if args.json:
        common.write_json(args.json, records, machine)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
