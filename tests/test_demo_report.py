"""The demo report's markdown: the learning signal's flat keys laid out as tables (a row per task
and timestep, a column per measure), the judge beside its chance level, "-" where a measure was
not taken; the scores table with its chance column."""

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
