"""tfds ArrayRecord builders, atomic builds, and the JSONL importer with corrupt inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qk_jax.data import builders, importer, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    counts = builders.build_shapes(out, ["t2i", "multi_subject"], num=6, num_eval=3, height=64, seed=1)
    assert counts == {
        "t2i": {"train": 6, "validation": 3, "test": 3},
        "multi_subject": {"train": 6, "validation": 3, "test": 3},
    }
    return out


def test_build_and_read_back_with_data_source(shapes_dir):
    src = builders.load_source(shapes_dir, builders.SHAPES_NAME, "multi_subject", "train")
    got = {r["id"]: r for r in (records.normalize(src[i]) for i in range(len(src)))}
    assert sorted(got) == [f"multi_subject-train-{i:07d}" for i in range(6)]
    for i in range(6):
        expected = records.generate_record("multi_subject", i, "train", seed=1, height=64)
        assert got[expected["id"]] == expected  # bytes-identical round trip, references included
    assert "tensorflow" not in sys.modules  # reading needs no TensorFlow
    with pytest.raises(builders.NotBuiltError, match="no split 'dev'"):
        builders.load_source(shapes_dir, builders.SHAPES_NAME, "t2i", "dev")


def test_rebuild_reuses_and_refuses_other_parameters(shapes_dir):
    assert builders.build_shapes(shapes_dir, ["t2i"], num=6, num_eval=3, height=64, seed=1)["t2i"]["train"] == 6
    with pytest.raises(ValueError, match="was built with"):
        builders.build_shapes(shapes_dir, ["t2i"], num=6, num_eval=3, height=64, seed=2)


def test_plain_background_option(tmp_path, shapes_dir):
    out = str(tmp_path / "plain")
    builders.build_shapes(out, ["t2i", "edit"], num=12, num_eval=2, height=64, plain_background=1.0)
    for task in ("t2i", "edit"):
        src = builders.load_source(out, builders.SHAPES_NAME, task, "train")
        kinds = {json.loads(records.normalize(src[i])["scene"])["target"]["background"]["kind"] for i in range(12)}
        assert kinds == {"plain"}, (task, kinds)
    assert builders.built_params(out, builders.SHAPES_NAME, "t2i")["plain_background"] == 1.0
    # The default keeps the metadata of earlier builds (no new key) and draws textures too.
    assert "plain_background" not in builders.built_params(shapes_dir, builders.SHAPES_NAME, "t2i")
    with pytest.raises(ValueError, match="plain_background"):
        builders.build_shapes(out, ["t2i"], num=12, num_eval=2, height=64, plain_background=1.5)


def test_interrupted_build_is_never_taken_as_complete(tmp_path, monkeypatch):
    out = str(tmp_path)
    real = records.generate_record
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(records, "generate_record", flaky)
    with pytest.raises(KeyboardInterrupt):
        builders.build_shapes(out, ["edit"], num=8, num_eval=2)
    assert builders.dataset_dir(out, builders.SHAPES_NAME, "edit") is None
    with pytest.raises(builders.NotBuiltError):
        builders.load_source(out, builders.SHAPES_NAME, "edit", "train")
    # a hard kill leaves tfds' temporary directory with shard files behind: still not a dataset
    leftover = tmp_path / builders.SHAPES_NAME / "edit" / "incomplete.ABC123_1.0.0"
    leftover.mkdir(parents=True)
    (leftover / "kontext_shapes-train.array_record-00000-of-00001").write_bytes(b"partial")
    with pytest.raises(builders.NotBuiltError, match="interrupted build"):
        builders.load_source(out, builders.SHAPES_NAME, "edit", "train")
    monkeypatch.setattr(records, "generate_record", real)
    assert builders.build_shapes(out, ["edit"], num=8, num_eval=2)["edit"] == {"train": 8, "validation": 2, "test": 2}
    assert len(builders.load_source(out, builders.SHAPES_NAME, "edit", "train")) == 8


def _png(path, h=32, w=32, value=100):
    path.write_bytes(records.encode_png(np.full((h, w, 3), value, np.uint8)))
    return path.name


def _manifest(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    a, b, c, d = (_png(img / f"{n}.png", value=v) for n, v in zip("abcd", (10, 60, 120, 200)))
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    lines = [
        {"task": "t2i", "prompt": "a red circle", "target": f"imgs/{a}", "id": "ok1"},
        {
            "task": "edit",
            "prompt": "make it blue",
            "target": f"imgs/{b}",
            "source": f"imgs/{a}",
            "id": "ok2",
            "split": "validation",
        },
        {
            "task": "customization",
            "prompt": "this subject on the left",
            "target": f"imgs/{c}",
            "references": [f"imgs/{d}"],
            "id": "ok3",
        },
        {
            "task": "multi_subject",
            "prompt": "both subjects",
            "target": str(img / c),  # absolute path
            "references": [f"imgs/{a}", f"imgs/{b}"],
            "id": "ok4",
        },
        {"task": "t2i", "prompt": "missing file", "target": "imgs/nope.png"},
        {"task": "t2i", "prompt": "broken image", "target": "imgs/broken.png"},
        "{this is not json",
        {"task": "paint", "prompt": "unknown task", "target": f"imgs/{a}"},
        {"task": "multi_subject", "prompt": "too many", "target": f"imgs/{a}", "references": [f"imgs/{a}"] * 4},
        {"task": "t2i", "target": f"imgs/{a}"},  # no prompt
        {"task": "t2i", "prompt": "same id again", "target": f"imgs/{b}", "id": "ok1"},
        {"task": "edit", "prompt": "no source", "target": f"imgs/{b}"},
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n")
    return path, img


def test_importer_skips_and_reports_bad_records(tmp_path):
    manifest, img = _manifest(tmp_path)
    out = tmp_path / "out"
    report = importer.import_manifest(str(manifest), str(out), name="real")
    assert (report.total, report.valid, report.skipped) == (12, 4, 8)
    assert report.reasons == {
        "missing file": 1,
        "undecodable image": 1,
        "malformed JSON": 1,
        "unknown task": 1,
        "reference count": 1,
        "missing prompt": 1,
        "duplicate id": 1,
        "source image": 1,
    }
    lines = dict(report.examples)
    assert "nope.png" in lines[5] and "decodable" in lines[6] and "malformed JSON" in lines[7]
    assert "'paint'" in lines[8] and "got 4" in lines[9]
    assert report.per_task == {
        "t2i": {"train": 1},
        "edit": {"validation": 1},
        "customization": {"train": 1},
        "multi_subject": {"train": 1},
    }
    rec = records.normalize(builders.load_source(str(out), "real", "multi_subject", "train")[0])
    assert rec["references"] == [(img / "a.png").read_bytes(), (img / "b.png").read_bytes()]
    assert rec["target"] == (img / "c.png").read_bytes() and rec["task"] == "multi_subject"
    saved = json.loads((out / "real" / "import_report.json").read_text())
    assert saved["skipped"] == 8 and saved["first_examples"][0]["line"] == 5
    with pytest.raises(importer.ManifestError, match="already exists"):
        importer.import_manifest(str(manifest), str(out), name="real")


def test_importer_rejects_empty_missing_and_all_bad_manifests(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(importer.ManifestError, match="is empty"):
        importer.import_manifest(str(empty), str(tmp_path / "o1"))
    with pytest.raises(importer.ManifestError, match="does not exist"):
        importer.import_manifest(str(tmp_path / "nope.jsonl"), str(tmp_path / "o2"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "t2i", "prompt": "x", "target": "missing.png"}\n[1, 2]\n')
    with pytest.raises(importer.ManifestError, match="none of its 2 records is valid"):
        importer.import_manifest(str(bad), str(tmp_path / "o3"))
    assert not (tmp_path / "o3" / "imported").exists()


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "qk_jax.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def test_cli_shapes_and_import(tmp_path):
    r = _cli(
        "data",
        "shapes",
        "--out",
        str(tmp_path / "ds"),
        "--num",
        "4",
        "--num_eval",
        "2",
        "--tasks",
        "edit",
        "--height",
        "48",
        "--width",
        "80",
    )
    assert r.returncode == 0, r.stderr
    assert "edit: train=4, validation=2, test=2" in r.stdout
    rec = records.normalize(builders.load_source(str(tmp_path / "ds"), builders.SHAPES_NAME, "edit", "test")[0])
    assert records.decode_image(rec["target"]).shape == (48, 80, 3)
    manifest, _ = _manifest(tmp_path)
    r = _cli("data", "import", "--manifest", str(manifest), "--out", str(tmp_path / "imp"))
    assert r.returncode == 0, r.stderr
    assert "12 records, 4 valid, 8 skipped" in r.stdout and "line 7: malformed JSON" in r.stdout
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = _cli("data", "import", "--manifest", str(empty), "--out", str(tmp_path / "imp2"))
    assert r.returncode == 2 and "is empty" in r.stderr
    # Flags that cannot make a dataset stop before anything is written, naming the flag.
    out = str(tmp_path / "bad")
    for flags, message in (
        (["--tasks", ""], "--tasks is empty"),
        (["--seed", "-5"], "flag --seed=-5: -5 is not a non-negative integer"),
        (["--num", "0"], "--num must be >= 1"),
    ):
        r = _cli("data", "shapes", "--out", out, "--num", "4", *flags)
        assert r.returncode != 0 and message in r.stderr, (flags, r.stderr[-2000:])
    assert not os.path.exists(out)
