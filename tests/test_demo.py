"""`qk-jax demo` end to end on the smoke schedule with the tiny model: every phase runs, the
report holds scores per task and overall, wall seconds per phase and the configs; a re-run
resumes (skips finished phases)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_smoke_writes_a_complete_report(tmp_path):
    workdir = str(tmp_path / "demo")
    cmd = [sys.executable, "-m", "qk_jax.cli", "demo", "--workdir", workdir, "--mode", "smoke", "--size", "tiny"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.load(open(os.path.join(workdir, "report.json")))
    assert set(report["scores"]) == {"t2i", "edit", "customization", "multi_subject", "overall"}
    assert all(0.0 <= v <= 1.0 for v in report["scores"].values())
    # The judge's partial checks per task (t2i has at least "present" and "attributes").
    assert {"t2i/present", "t2i/attributes", "edit/preserved"} <= set(report["checks"])
    assert all(0.0 <= v <= 1.0 for v in report["checks"].values())
    phases = {"data", "stage1", "surgery12", "stage2", "surgery23", "stage3", "evaluate"}
    assert set(report["wall_seconds"]) == phases
    assert set(report["configs"]) == {"stage1", "stage2", "stage3"}
    for name in ("report.md", "grid.png", "stage1/tb", "stage3/samples"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert "== stage3:" in run.stdout and "scores (held-out test split)" in run.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage2: done in an earlier run" in again.stdout
