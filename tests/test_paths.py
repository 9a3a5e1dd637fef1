"""Workdirs as URLs: `qk_jax.paths` and the tools on a `gs://` workdir (mapped onto a local
folder by `gcs_fake`), with nothing written to a local folder named like the URL."""

import json
import os

import pytest

import gcs_fake
import kontext_util as ku
from qk_jax import paths, surgery
from qk_jax.sample import Sampler, save_grid
from qk_jax.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """(backend, folder behind gs://); the test runs in an empty cwd."""
    root = tmp_path / "gcs"
    root.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    backend = gcs_fake.install(monkeypatch, str(root))
    yield backend, root
    assert os.listdir(cwd) == [], "a URL was written as a local relative path"
    assert not os.path.exists(os.path.join(REPO, "gs:"))


def test_paths_on_a_url(bucket):
    backend, root = bucket
    paths.append_text("gs://b/run/metrics.jsonl", "1\n")
    paths.append_text("gs://b/run/metrics.jsonl", "2\n")
    assert (root / "b/run/metrics.jsonl").read_text() == "1\n2\n"
    assert paths.join("gs://b/run", "tb") == "gs://b/run/tb"
    assert paths.normalize("gs://b/run/") == "gs://b/run" and paths.dirname("gs://b/run/ckpt") == "gs://b/run"
    paths.write_text("gs://b/src/sub/a.txt", "a")
    paths.write_text("gs://b/src/report.json", "{}")
    paths.move_folder("gs://b/src", "gs://b/dst", last=("report.json",))
    assert sorted(os.listdir(root / "b/dst")) == ["report.json", "sub"] and not (root / "b/src").exists()
    local = paths.local_folder("gs://b/dst")
    assert open(os.path.join(local, "sub/a.txt")).read() == "a" and not paths.is_url(local)
    assert backend.calls > 0


@pytest.mark.slow  # two short tiny stage-1 runs, a surgery and one sample: minutes on 2 shared CPU cores
def test_train_resume_surgery_and_sample_on_a_gs_workdir(bucket, shapes_dir):
    backend, root = bucket
    run, run_dir = "gs://bkt/runs/stage1", root / "bkt/runs/stage1"

    def config(steps):
        return ku.stage_config(
            1, shapes_dir, f"train.steps={steps}", "train.checkpoint_every=2", "data.mixture={'t2i': 1.0}"
        )

    first = config(2)
    first.train.profile_steps = "0:1"  # traced locally, then copied to the URL
    assert train(first, run)["end_step"] == 2
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["2"]
    assert list((run_dir / "profile").rglob("*.xplane.pb"))
    assert (run_dir / "processor/tokenizer_config.json").is_file()
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir / "tb"))
    # a resume reads the processor and the metrics back from the URL and appends to them
    summary = train(config(3), run)
    assert (summary["start_step"], summary["end_step"]) == (2, 3)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "3"]

    report = surgery.run(1, 2, run, "gs://bkt/ckpt2")
    assert report["bit_identical"]["ok"] and report["source_step"] == 3
    assert json.loads((root / "bkt/ckpt2/surgery_report.json").read_text())["bit_identical"]["ok"]
    assert (root / "bkt/ckpt2/processor/tokenizer_config.json").is_file()
    assert not (root / "bkt/ckpt2.partial").exists()
    assert surgery.require_complete("gs://bkt/ckpt2")["transition"] == "1->2"

    out = "gs://bkt/samples/one.png"
    paths.check_output_file(out)
    sampler = Sampler.from_checkpoint(run)
    assert sampler.step == 3
    grid = save_grid(sampler.generate(sampler.records(["a red circle"]), steps=2, seed=0), out)
    from PIL import Image

    with Image.open(root / "bkt/samples/one.png") as im:
        assert im.size == (grid.shape[1], grid.shape[0])
    assert backend.calls > 0
