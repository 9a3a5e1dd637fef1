"""`benchmarks/run.py --quick --json` runs every benchmark at tiny sizes and writes well-formed
records in which both sides ran. Timings are never asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from cli_env import FAST_COMPILE_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"name", "ours_s", "reference_s", "ratio", "flops", "ours_tflops", "extra"}


def run_script(tmp_path, timeout: int, script: str, *args: str) -> str:
    """Runs `benchmarks/<script> args` as a user does (one CPU device, no compilation cache:
    compile times are part of the output; LLVM optimisation off, so its times are not a
    user's), checks it exits 0 and returns its stdout."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow  # ~50 s: three benchmarks, two frameworks, a dozen compilations
def test_quick_run_writes_records(tmp_path):
    out = tmp_path / "bench.jsonl"
    stdout = run_script(tmp_path, 300, "run.py", "--quick", "--json", str(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    records, machine = lines[:-1], lines[-1]["machine"]
    names = [r["name"] for r in records]
    assert {"vlm/forward", "vlm/train_step", "compile/forward_L1", "compile/train_step_L2"} <= set(names), names
    assert any(n.startswith("vlm/generate_") for n in names)
    assert {"mmdit/forward", "mmdit/train_step"} <= set(names) and any(n.startswith("mmdit/sample_") for n in names)
    for r in records:
        assert set(r) == FIELDS, r["name"]
        # Both sides ran: positive finite times, and the ratio is theirs.
        assert r["ours_s"] > 0 and r["reference_s"] > 0 and math.isfinite(r["ours_s"] + r["reference_s"]), r
        assert math.isclose(r["ratio"], r["ours_s"] / r["reference_s"], rel_tol=1e-9)
        if r["flops"] is not None:
            assert r["flops"] > 0 and math.isclose(r["ours_tflops"], r["flops"] / r["ours_s"] / 1e12, rel_tol=1e-9)
    by_name = {r["name"]: r for r in records}
    forward = by_name["vlm/forward"]["extra"]
    assert forward["logits_max_rel_err"] < 1e-3  # the two sides computed the same model
    assert by_name["vlm/forward"]["flops"] is not None and forward["peak_fraction"] > 0
    gen = next(r for r in records if r["name"].startswith("vlm/generate_"))["extra"]
    assert gen["new_tokens"] >= 1 and isinstance(gen["tokens_equal"], bool)
    train = by_name["vlm/train_step"]["extra"]
    assert math.isfinite(train["first_loss_ours"])
    assert abs(train["first_loss_ours"] - train["first_loss_reference"]) < 1e-3
    assert by_name["mmdit/forward"]["extra"]["output_max_rel_err"] < 1e-3
    sample = next(r for r in records if r["name"].startswith("mmdit/sample_"))["extra"]
    assert sample["sample_max_rel_err"] < 1e-3  # the same Euler trajectory on both sides
    assert by_name["compile/train_step_L2"]["extra"]["layers"] == 2
    assert machine["matmul_peak"]["jax_flops_per_s"] > 0 and machine["matmul_peak"]["torch_flops_per_s"] > 0
    assert machine["jax"] and machine["torch"] and machine["transformers"]
    # Each benchmark printed its table.
    assert "| vlm/forward" in stdout and "| mmdit/forward" in stdout and "Compile time" in stdout


@pytest.mark.slow  # two frameworks, a train step and a sampler each
def test_gpu_benchmark_tiny_on_cpu(tmp_path):
    """`benchmarks/gpu.py --size tiny` runs here: both implementations have a train-step and a
    sampler row with positive numbers, and they hold the same weights (one float32 forward)."""
    out = tmp_path / "gpu.json"
    stdout = run_script(tmp_path, 600, "gpu.py", "--size", "tiny", "--repeat", "1", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["size"] == "tiny" and report["forward_max_rel_err"] < 1e-4
    rows = {(r["name"], r["impl"]) for r in report["rows"]}
    programs = {"train_step", f"sample_{report['steps']}_steps"}
    assert rows == {(p, i) for p in programs for i in ("ours (JAX)", "diffusers (torch SDPA)")}
    for r in report["rows"]:
        assert r["step_s"] > 0 and r["samples_per_s"] > 0 and r["tflops"] > 0 and r["mfu"] > 0, r
        assert math.isclose(r["samples_per_s"], report["batch"] / r["step_s"], rel_tol=1e-9)
    assert "| train_step" in stdout and "diffusers (torch SDPA)" in stdout


@pytest.mark.slow  # ~60 s: the tiny stage-2 train step compiled for a few batch shapes
def test_condition_stream_benchmark_tiny(tmp_path):
    """`benchmarks/condition_stream.py` times the three variants on the same batches: without
    the template prefix the DiT's stream is narrower, with text buckets the VLM's text too, and
    the analytic FLOPs executed fall with them (times are printed, never compared)."""
    config = os.path.join(ROOT, "configs", "stage2.py") + ":tiny"
    stdout = run_script(
        tmp_path,
        600,
        "condition_stream.py",
        "--config",
        config,
        "--records",
        "6",
        "--repeats",
        "1",
        "--workdir",
        str(tmp_path / "w"),
    )
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("padded", "no prefix", "packed"):
            rows[cells[0]] = [float(c.rstrip("%")) for c in cells[1:]]
    (t0, s0, sec0, f0, _), (t1, s1, sec1, f1, u1), (t2, s2, sec2, f2, u2) = (
        rows["padded"],
        rows["no prefix"],
        rows["packed"],
    )
    assert t0 == t1 == 64 > t2  # VLM text tokens: max_text_len (tiny stage 2), then the buckets
    assert s0 == 64 + 4 > s1 > s2  # DiT condition tokens with K = 4 queries
    assert f0 > f1 > f2 > 0 and u2 > u1  # FLOPs executed; the useful share grows without padding
    assert min(sec0, sec1, sec2) > 0


@pytest.mark.slow  # two processes, each compiling and running the tiny stage-2 train step
def test_xla_cpu_flags_benchmark_tiny(tmp_path):
    """`benchmarks/xla_cpu_flags.py` under XLA's defaults and the suite's own flags
    (`FAST_COMPILE_FLAGS`): every phase is timed, and the suite's flags compute the loss the
    defaults compute, but for rounding."""
    from benchmarks.xla_cpu_flags import FLAG_SETS

    assert FLAG_SETS["suite"] == FAST_COMPILE_FLAGS  # what the benchmark measures is what the suite sets
    args = ("--config", "configs/stage2.py:tiny", "--steps", "2", "--flags", "defaults", "--flags", "suite")
    stdout = run_script(tmp_path, 600, "xla_cpu_flags.py", *args)
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[1] in FLAG_SETS:
            rows[cells[1]] = cells
    assert set(rows) == {"defaults", "suite"}, stdout
    assert rows["suite"][2] == FAST_COMPILE_FLAGS and rows["defaults"][2] == "(none)"
    for cells in rows.values():
        trace, lower, compile_, step = map(float, cells[4:8])
        assert min(trace, lower, compile_, step) > 0, cells
    assert float(rows["defaults"][8]) == 0.0 and float(rows["suite"][8]) < 1e-5
