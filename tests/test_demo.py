"""`qk-jax demo` end to end on the smoke schedule with the tiny model: every phase runs, the
report holds scores per task and overall, wall seconds per phase and the configs; a re-run
resumes (skips finished phases)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the whole demo, twice: several minutes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_smoke_writes_a_complete_report(tmp_path):
    workdir = str(tmp_path / "demo")
    cmd = [
        sys.executable,
        "-m",
        "qk_jax.cli",
        "demo",
        "--workdir",
        workdir,
        "--mode",
        "smoke",
        "--size",
        "tiny",
        "--ablation",
    ]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.load(open(os.path.join(workdir, "report.json")))
    assert set(report["scores"]) == {"t2i", "edit", "customization", "multi_subject", "overall"}
    assert all(0.0 <= v <= 1.0 for v in report["scores"].values())
    # Beside each score its chance level (the samples against the next record's prompt); edits have none.
    assert set(report["chance_scores"]) == {"t2i", "customization", "multi_subject"}
    assert all(0.0 <= v <= 1.0 for v in report["chance_scores"].values())
    assert "| task | score | chance | samples |" in open(os.path.join(workdir, "report.md")).read()
    # The judge's partial checks per task (t2i has at least "present" and "attributes").
    assert {"t2i/present", "t2i/attributes", "edit/preserved"} <= set(report["checks"])
    assert all(0.0 <= v <= 1.0 for v in report["checks"].values())
    phases = {"data", "stage1", "surgery12", "stage2", "surgery23", "stage3", "evaluate"}
    ablation = {"ablation_kontext_only_stage3", "ablation_kontext_only_evaluate"}
    assert set(report["wall_seconds"]) == phases | ablation
    assert report["total_wall_seconds"] == pytest.approx(sum(report["wall_seconds"][p] for p in phases), abs=1e-6)
    # The learning signal of every stage, measured at its end (stage 3 also on edits).
    for stage, tasks in (("stage1", ("t2i", "reconstruction")), ("stage3", ("t2i", "edit", "reconstruction"))):
        signal = report["learning_signal"][stage]
        assert signal["step"] == 3
        for task in tasks:
            assert 0 < signal[f"err/{task}@0.9"] and 0 < signal[f"err_uncond/{task}@0.9"]
            assert 0 <= signal[f"completion_score/{task}@0.8"] <= 1
    assert 0 <= report["learning_signal"]["stage3"]["judge/edit"] <= 1
    assert 0 <= report["learning_signal"]["stage2"]["judge_chance/t2i"] <= 1
    assert "judge_chance/edit" not in report["learning_signal"]["stage3"]  # an edit has no chance level
    markdown = open(os.path.join(workdir, "report.md")).read()
    assert "| t2i @ 0.9 | " in markdown and "| judge, task | score | chance |" in markdown
    # The stage-3 ablation: the same steps without the VAE path, edits scored both ways.
    assert report["ablation"]["steps"] == 3
    for arm in ("with_vae_path", "kontext_only"):
        assert 0 <= report["ablation"][arm]["edit"] <= 1
    assert report["configs"]["stage3"]["model"]["low_level"] is True
    from qk_jax import checkpoint

    ablation_root = os.path.join(workdir, "ablation_kontext_only", "stage3", "checkpoints")
    step = checkpoint.Checkpointer(ablation_root, create=False).latest_step()
    assert step == 3 and checkpoint.read_json_item(ablation_root, step, "config")["model"]["low_level"] is False
    assert "Ablation: the low-level VAE path" in open(os.path.join(workdir, "report.md")).read()
    assert set(report["configs"]) == {"stage1", "stage2", "stage3"}
    for name in ("report.md", "grid.png", "stage1/tb", "stage3/samples"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert "== stage3:" in run.stdout + run.stderr and "scores (held-out test split)" in run.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage2: done in an earlier run" in again.stdout + again.stderr
