"""The demo report's markdown: the learning signal's flat keys laid out as tables (a row per task
and timestep, a column per measure), the judge beside its chance level, "-" where a measure was
not taken; the scores table with its chance column; a workdir of other settings refused."""

import json
import logging
import os

import pytest

from qk_jax import demo


def _table(lines: list[str], header: str) -> dict[str, list[str]]:
    """{first cell: the other cells} of the markdown table under `header`."""
    start = lines.index(header) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_signal_tables_lay_out_each_measure_in_its_row_and_column():
    flat = {
        "gain/t2i@0.2": 0.085,
        "content/t2i@0.2": -0.013,
        "err/t2i@0.2": 0.0747,
        "err_uncond/t2i@0.2": 0.08161,
        "err_swapped/t2i@0.2": 0.07513,
        "gain/edit@1": 0.5,  # a run that measured no content gain or errors for it
        "completion_score/t2i@0.5": 0.25,
        "completion_psnr/t2i@0.5": 22.456,
        "judge/t2i": 0.375,
        "judge_chance/t2i": 0.125,
        "judge/edit": 0.0,
        "step": 450,
    }
    lines = demo.signal_markdown({"stage2": flat, "stage3": None})
    assert "**stage2** (step 450)" in lines and not any("stage3" in line for line in lines)
    gains = _table(lines, "| task @ t | condition gain | content gain | error | unconditional | another's condition |")
    assert gains == {
        "t2i @ 0.2": ["8.5%", "-1.3%", "0.0747", "0.08161", "0.07513"],
        "edit @ 1": ["50.0%", "-", "-", "-", "-"],
    }
    assert _table(lines, "| completion, task @ t0 | judge | PSNR to the target (dB) |") == {
        "t2i @ 0.5": ["0.250", "22.46"]
    }
    assert _table(lines, "| judge, task | score | chance |") == {"t2i": ["0.375", "0.125"], "edit": ["0.000", "-"]}


def test_scores_table_shows_each_task_beside_its_chance_level(tmp_path):
    report = {
        "mode": "default",
        "devices": "1 x cpu",
        "total_wall_seconds": 500.0,
        "scores": {"t2i": 0.25, "edit": 0.0, "overall": 0.125},
        "chance_scores": {"t2i": 0.0625},
        "n_scored": {"t2i": 16, "edit": 16},
        "per_category": {},
        "checks": {},
        "wall_seconds": {"data": 19.0},
        "final_losses": {"stage2": 0.2},
    }
    path = tmp_path / "report.md"
    demo.write_markdown(report, str(path))
    scores = _table(path.read_text().splitlines(), "| task | score | chance | samples |")
    assert scores == {"t2i": ["0.250", "0.062", "16"], "edit": ["0.000", "-", "16"], "overall": ["0.125", "-", ""]}


def test_an_unknown_size_stops_before_anything_is_written(tmp_path):
    workdir = tmp_path / "demo"
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        demo.run_demo(str(workdir), size="huge")
    assert not workdir.exists()  # no data phase ran, no folder was made


def test_a_workdir_of_other_settings_is_refused_before_anything_is_written(tmp_path, caplog):
    # The default demo's workdir rerun with --full would skip every phase and report the
    # default's models as the full run's.
    workdir = tmp_path / "demo"
    workdir.mkdir()
    phases = workdir / "phases.json"
    earlier = {"run": {"mode": "default", "size": "demo"}, "phases": {"data": 19.0, "stage1": 68.0}}
    phases.write_text(json.dumps(earlier))
    with pytest.raises(demo.DemoWorkdirError) as error:
        demo.run_demo(str(workdir), mode="full")
    assert str(error.value) == (
        f"--workdir {workdir} holds a demo run of --mode default --size demo (finished: data, stage1), "
        "not of --mode full --size demo: give this run another --workdir, or remove that one"
    )
    assert sorted(os.listdir(workdir)) == ["phases.json"]  # no phase ran
    # Same settings: the finished phases are taken (the resume itself: tests/test_demo.py).
    resumed = demo.Phases(str(workdir), {"mode": "default", "size": "demo"})
    assert resumed.run("data", lambda: pytest.fail("ran again")) is None
    # A phases.json written before the settings were recorded: its run's report.json says them.
    phases.write_text(json.dumps({"data": 19.0, "stage1": 68.0}))
    (workdir / "report.json").write_text(json.dumps({"mode": "default", "configs": {"stage1": {"size": "demo"}}}))
    with pytest.raises(demo.DemoWorkdirError, match="holds a demo run of --mode default --size demo"):
        demo.Phases(str(workdir), {"mode": "full", "size": "demo"})
    assert demo.Phases(str(workdir), {"mode": "default", "size": "demo"}).done == {"data": 19.0, "stage1": 68.0}
    # ... and without a report (a run stopped before it), the phases are taken with a warning.
    (workdir / "report.json").unlink()
    with caplog.at_level(logging.WARNING):
        legacy = demo.Phases(str(workdir), {"mode": "full", "size": "demo"})
    assert legacy.done == {"data": 19.0, "stage1": 68.0}
    assert any("does not say which --mode / --size" in r.getMessage() for r in caplog.records)


def test_a_stage_stopped_by_a_signal_stops_the_demo_unfinished(tmp_path, monkeypatch):
    # Ctrl-C in a stage: the trainer saves its step and returns; the demo used to mark the stage
    # finished and go on to the surgery of a half-trained stage.
    import signal

    from qk_jax import train as train_lib

    stopped = {"stopped_by_signal": True, "stop_signal": int(signal.SIGINT), "end_step": 7}
    monkeypatch.setattr(train_lib, "train", lambda config, workdir: stopped)
    phases = demo.Phases(str(tmp_path), {"mode": "default", "size": "demo"})
    with pytest.raises(demo.DemoStopped, match=r"^stage 2 stopped by signal 2 after saving step 7; the same command"):
        phases.run("stage2", lambda: demo.train_stage("stage 2", None, str(tmp_path / "stage2")))
    assert "stage2" not in phases.done
    finished = {"stopped_by_signal": False, "end_step": 9}
    monkeypatch.setattr(train_lib, "train", lambda config, workdir: finished)
    assert phases.run("stage2", lambda: demo.train_stage("stage 2", None, str(tmp_path / "stage2"))) == finished
    assert "stage2" in phases.done


def test_the_trainers_signal_handlers_are_the_callers_again_after_it():
    import signal

    from qk_jax.train import Stop

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop = Stop().install()
    assert all(signal.getsignal(sig) is not before[sig] for sig in before)
    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C while training: a flag, not a KeyboardInterrupt
    assert stop.requested and stop.signal == signal.SIGINT
    stop.uninstall()
    assert {sig: signal.getsignal(sig) for sig in before} == before
