"""The judge: detection accuracy, scores on clean / degraded / blank / noise images, wrong answers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qk_jax.data import records, scenes, vocab
from qk_jax.eval import degrade, detect, score

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def recs():
    """Records of every task, in-distribution and held-out, at two sizes."""
    out = [records.generate_record(t, i, s, 3, 64) for t in vocab.TASKS for s in ("train", "test") for i in range(6)]
    out += [records.generate_record(t, i, "validation", 3, 64, 96) for t in vocab.TASKS for i in range(3)]
    return out


def _objects(rec):
    graph = json.loads(rec["scene"])
    return scenes.Scene.from_dict(graph["target"]).objects


def test_detector_reads_clean_renders_exactly(recs):
    n = 0
    for rec in recs:
        if json.loads(rec["scene"])["target"].get("inverted"):
            continue
        dets = detect.detect(records.decode_image(rec["target"]))
        objs = _objects(rec)
        assert len(dets) == len(objs), rec["id"]
        for o in objs:
            d = min(dets, key=lambda d: (d.cx - o.cx) ** 2 + (d.cy - o.cy) ** 2)
            assert (d.shape, d.colour, d.size, d.cell, d.pattern) == (o.shape, o.colour, o.size, o.cell, o.pattern), (
                rec["id"]
            )
            assert abs(d.cx - o.cx) < 0.01 and abs(d.cy - o.cy) < 0.01 and abs(d.r / o.r - 1) < 0.06
            n += 1
    assert n > 100


def _mean(recs, image_fn):
    return score.score_records(recs, image_fn)


def test_own_renders_score_at_least_0_99(recs):
    report = _mean(recs, lambda r: records.decode_image(r["target"]))
    assert report["overall"] >= 0.99, [s["id"] for s in report["samples"] if s["score"] < 1]
    assert set(report["per_task"]) == set(vocab.TASKS)
    assert min(report["per_task"].values()) >= 0.95


def test_chance_level_judges_each_image_against_the_next_prompt(recs):
    """The chance level: a set's own renders, perfect for their own prompts, pass the next
    record's prompt only where the two prompts happen to agree; the pairing is the next record,
    cyclically, and an edit (judged against its own source) has no chance level."""
    for task in score.PROMPT_JUDGED_TASKS:
        group = [r for r in recs if r["task"] == task]
        targets = [records.decode_image(r["target"]) for r in group]
        others = score.against_next_prompts(group, targets)
        assert [o["id"] for o in others] == [r["id"] for r in group[1:] + group[:1]]
        own = np.mean([score.score_sample(r, t)["score"] for r, t in zip(group, targets)])
        chance = np.mean([o["score"] for o in others])
        assert own == 1.0 and chance <= 0.25, (task, chance)
    edits = [r for r in recs if r["task"] == "edit"]
    with pytest.raises(ValueError, match="edit"):
        score.against_next_prompts(edits, [records.decode_image(r["target"]) for r in edits])
    with pytest.raises(ValueError, match="at least two"):
        score.against_next_prompts(recs[:1], [records.decode_image(recs[0]["target"])])


@pytest.mark.parametrize("kind", ["blank", "black", "noise"])
def test_blank_and_noise_images_score_zero(recs, kind):
    def image_fn(r):
        img = records.decode_image(r["target"])
        if kind == "noise":
            return np.random.default_rng(len(r["id"])).integers(0, 256, img.shape, dtype=np.uint8)
        return np.full_like(img, 128 if kind == "blank" else 0)

    report = _mean(recs, image_fn)
    assert report["overall"] <= 0.02, report["per_task"]


@pytest.mark.parametrize("kind", ["blur", "noise", "jpeg", "quantise", "colour_shift", "combined"])
def test_robust_to_generator_like_degradations(recs, kind):
    fn = degrade.combined if kind == "combined" else degrade.DEGRADATIONS[kind]
    report = _mean(recs[::2], lambda r: fn(records.decode_image(r["target"]), seed=len(r["id"])))
    assert report["overall"] >= 0.95, (kind, report["per_task"])


def test_wrong_answers_fail():
    edits = [records.generate_record("edit", i, "train", 5, 64) for i in range(12)]
    # returning the unchanged source never satisfies an edit instruction
    assert all(score.score_sample(r, records.decode_image(r["source"]))["score"] == 0 for r in edits)
    # the right edit on a changed background: instruction yes, "rest preserved" no
    for r in edits[:4]:
        good = score.score_sample(r, records.decode_image(r["target"]))
        assert good["score"] == 1 and good["checks"]["preserved"]
        g = json.loads(r["scene"])["target"]
        g["background"] = {"kind": "checker", "tones": [90, 220], "tint": [0, 0, 0], "period": 5, "angle": 0}
        res = score.score_sample(r, scenes.render_scene(scenes.Scene.from_dict(g)))
        assert res["checks"]["instruction"] and not res["checks"]["preserved"] and res["score"] == 0
    # a customization with another texture is another subject
    for i in range(4):
        r = records.generate_record("customization", i, "train", 5, 64)
        g = json.loads(r["scene"])["target"]
        subject = g["objects"][0]
        subject["pattern"] = next(p for p in vocab.PATTERNS if p != subject["pattern"])
        res = score.score_sample(r, scenes.render_scene(scenes.Scene.from_dict(g)))
        assert res["score"] == 0 and res["checks"]["present"] and not res["checks"]["attributes"]
    # a t2i counting prompt with one object too many
    r = next(
        rr
        for rr in (records.generate_record("t2i", i, "train", 5, 64) for i in range(200))
        if rr["category"] == "counting" and len(_objects(rr)) < 4
    )
    g = json.loads(r["scene"])
    objs = g["target"]["objects"]
    extra = scenes.Obj(**objs[0])
    for cell in vocab.CELL_NAMES:
        try:
            scenes.place(
                np.random.default_rng(0), [extra], 64, 64, cells=[cell], fixed=[scenes.Obj(**o) for o in objs], tries=50
            )
            break
        except scenes.PlacementError:
            continue
    objs.append(extra.to_dict())
    res = score.score_sample(r, scenes.render_scene(scenes.Scene.from_dict(g["target"])))
    assert res["score"] == 0 and res["checks"]["present"] and not res["checks"]["count"]


def test_score_folder_and_cli(tmp_path):
    from PIL import Image

    recs = [records.generate_record("t2i", i, "test", 0, 64) for i in range(3)]
    for r in recs[:2]:
        Image.open(__import__("io").BytesIO(r["target"])).save(tmp_path / f"{r['id']}.png")
    rep = score.score_folder(recs, str(tmp_path))
    assert rep["n"] == 3 and rep["missing"] == 1 and abs(rep["overall"] - 2 / 3) < 1e-3
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / f"{recs[0]['id']}.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"generation .*{recs[0]['id']}.png cannot be decoded"):
        score.score_folder(recs, str(broken))
    env = dict(os.environ, PYTHONPATH=REPO)
    paths = [str(tmp_path / f"{r['id']}.png") for r in recs[:2]]
    out = subprocess.run(
        [sys.executable, "-m", "qk_jax.cli", "eval", "detect", *paths],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, r in zip(lines, recs):
        objs = json.loads(line)
        assert len(objs) == len(_objects(r))
        assert {"shape", "colour", "centre", "size", "area_frac"} <= set(objs[0])
        assert all(0 <= c <= 1 for c in objs[0]["centre"]) and objs[0]["size"] in vocab.SIZE_NAMES


def test_score_cli_writes_its_report_and_refuses_bad_flags_before_scoring(shapes_dir, tmp_path):
    def eval_score(*flags):
        return subprocess.run(
            [sys.executable, "-m", "qk_jax.cli", "eval", "score", "--data_dir", shapes_dir, *flags],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )

    out = tmp_path / "reports" / "targets.json"  # its folder is made
    run = eval_score("--self_check", "target", "--tasks", "t2i,edit", "--limit", "2", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["n"] == 4 and report["overall"] == 1.0 and set(report["per_task"]) == {"t2i", "edit"}
    assert run.stdout.strip().splitlines()[-1] == "overall 1.000 on 4 records (0 images missing)"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    run = eval_score("--self_check", "target", "--out", str(blocker / "r.json"))
    assert run.returncode == 2 and "overall" not in run.stdout, run.stdout
    assert run.stderr.strip().splitlines()[-1].startswith(f"qk-jax eval: --out {blocker / 'r.json'} cannot be written")
    run = eval_score("--self_check", "target", "--limit", "0")
    assert run.returncode != 0 and "flag --limit=0: 0 is not a positive integer" in run.stderr, run.stderr
