"""The tiny configuration through stage 1 -> surgery -> stage 2 -> surgery -> stage 3 -> sample:
exact resume after SIGTERM, surgery reports and bit-identical kept tensors, LoRA merge
equivalence, the CLI tools, deterministic sampling and clear errors for bad inputs."""

import json
import logging
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

import kontext_util as ku
from cli_env import FAST_COMPILE_FLAGS, log_message
from qk_jax import checkpoint as ckpt_lib
from qk_jax import model_config, sharding, surgery
from qk_jax.data import buckets, records
from qk_jax.models.kontext import QueryKontext
from qk_jax.sample import Sampler
from qk_jax.train import train

pytestmark = pytest.mark.slow  # trains all three stages and runs surgery and sampling through the CLI: minutes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}  # not the learning-signal lines


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "qk_jax.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=900, **kw
    )


@pytest.fixture(scope="module")
def stage1(shapes_dir, tmp_path_factory):
    """An uninterrupted stage-1 run, and the same run stopped by SIGTERM after step 1 and resumed."""
    base = tmp_path_factory.mktemp("stage1")
    overrides = [
        f"data.data_dir={shapes_dir}",
        f"train.steps={STEPS}",
        "train.log_every=1",
        "train.checkpoint_every=100",
    ]
    full = str(base / "full")
    train(ku.stage_config(1, shapes_dir, *overrides[1:]), full)

    stopped = str(base / "stopped")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qk_jax.cli",
            "train",
            "--config",
            "configs/stage1.py:tiny",
            "--workdir",
            stopped,
            *[f"--config.{o}" for o in overrides],
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # SIGTERM as soon as the model is built: the first step is still compiling
        lines.append(line)
        if log_message(line).startswith("parameters:"):
            proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=600)
    log = "".join(lines)
    train(ku.stage_config(1, shapes_dir, *overrides[1:]), stopped)  # resume
    return {"full": full, "stopped": stopped, "code": code, "log": log}


def test_sigterm_checkpoints_and_resume_is_exact(stage1):
    assert stage1["code"] == 0, stage1["log"][-3000:]
    assert "checkpoint written at step 1; exiting" in stage1["log"], stage1["log"][-3000:]
    full, resumed = metrics(stage1["full"]), metrics(stage1["stopped"])
    assert sorted(full) == sorted(resumed) == list(range(1, STEPS + 1))
    for step in full:  # the same loss curve, step for step
        assert resumed[step]["loss"] == full[step]["loss"], (step, resumed[step]["loss"], full[step]["loss"])
    for r in full.values():
        assert r["tflops_per_device"] > 0 and 0 < r["mfu"] < 1 and r["tokens_per_second"] > 0
    assert os.path.isdir(os.path.join(stage1["full"], "tb"))


@pytest.fixture(scope="module")
def stage2(stage1, shapes_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("stage2")
    dst = str(base / "ckpt2")
    run = cli("surgery", "--from", "1", "--to", "2", "--src", stage1["full"], "--dst", dst)
    assert run.returncode == 0, run.stderr[-3000:]
    workdir = str(base / "run")
    train(
        ku.stage_config(2, shapes_dir, "train.steps=2", f"train.init_from={dst}", "data.mixture={'t2i': 1.0}"), workdir
    )
    return {"ckpt": dst, "run": workdir, "stdout": run.stdout}


def test_condition_diagnostics_run_on_a_trained_run(stage2, tmp_path):
    """`benchmarks/condition_use.py`, `judge_run.py`, `noise_dependence.py` and `condition_probe.py` as
    a user runs them on a stage-2 run: the attention shares, prediction changes, judge scores, noise
    share and probe accuracies they print."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS  # one CPU device, as a user runs them (batches of any size)

    def run(script, *args):
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "benchmarks", script), "--checkpoint", stage2["run"], *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.splitlines()

    out = run("condition_use.py", "--records", "4", "--timesteps", "1.0")
    shares = [list(map(float, line.split()[2:])) for line in out if line.startswith(" 1.0 ") and len(line.split()) == 5]
    assert len(shares) == 3  # one row per DiT block of the tiny model
    for prompt, kontext, image in shares:  # the image tokens' attention, all of it accounted for
        assert prompt > 0 and kontext > 0 and abs(prompt + kontext + image - 1) < 1e-3
    changes = next(line for line in out if line.startswith(" 1.0 ") and len(line.split()) == 4)
    assert all(np.isfinite(float(v)) for v in changes.split()[1:])
    assert any(line.startswith("condition tokens: kontext across records cos") for line in out)

    *_, chance, judged = run("judge_run.py", "--limit", "8", "--steps", "2")  # "judge S; checks passed: present P, ..."
    assert judged.startswith("judge ") and 0 <= float(judged.split()[1].rstrip(";")) <= 1
    assert "present" in judged
    assert chance.startswith("against the next record's prompt (chance): judge ")
    assert 0 <= float(chance.split()[-1]) <= 1
    # Finished in one step from the targets barely noised (t0 = 0.01), the pictures are the targets
    # to within the tiny model's error: the judge passes nearly all, and fewer against the
    # neighbours' prompts.
    *_, chance, judged = run("judge_run.py", "--limit", "8", "--steps", "1", "--from_t0", "0.01")
    assert float(judged.split()[1].rstrip(";")) >= 0.75, judged
    assert float(chance.split()[-1]) < float(judged.split()[1].rstrip(";")), (chance, judged)

    def by_steps(line, prefix):  # "PREFIX...: 1 steps X dB, 2 steps Y dB" -> [X, Y]
        assert line.startswith(prefix) and ": 1 steps " in line, line
        return [float(part.split()[2]) for part in line.split(": ")[1].split(", ")]

    recon = ("--records", "4", "--seeds", "2", "--task", "reconstruction", "--steps", "1,2")
    grid = tmp_path / "predictions.png"
    out = run("noise_dependence.py", *recon, "--grid", str(grid))

    def printed(prefix):  # the one line of `out` that starts with `prefix`
        found = [text for text in out if text.startswith(prefix)]
        assert len(found) == 1, (prefix, out)
        return found[0]

    dependence = printed("t = 1 prediction: variance across noises ")
    alone = printed("a picture of the target's background alone, PSNR to the target: ")
    predicted = printed("predictions from the target noised to t, PSNR to the target: t = 1 ")
    filtered = printed("a linear filter of the same, told the background colour: t = 0.9 ")
    wrote = printed(f"wrote {grid}")
    sampled = printed("samples from noise, PSNR to the target")
    assert 0 <= float(dependence.split()[-1]) <= 1
    assert 5 < float(alone.split()[-2]) < 60  # the targets hold objects: not their background alone
    per_t = [float(part.split()[-2]) for part in predicted.split(": ", 1)[1].split(", ")]
    assert len(per_t) == 5 and all(0 < p <= 60 for p in per_t)
    per_t = [float(part.split()[-2]) for part in filtered.split(": ", 1)[1].split(", ")]
    assert len(per_t) == 4 and all(float(alone.split()[-2]) - 0.5 <= p <= 60 for p in per_t)  # never below it
    assert wrote.endswith("then the predictions at t = 1, 0.9, 0.8, 0.7, 0.5")
    side = np.asarray(Image.open(grid)).shape
    assert side[0] * 4 == 6 * side[1]  # a row of the 4 records' targets, then one per t
    psnrs = by_steps(sampled, "samples from noise, PSNR to the target")
    assert len(psnrs) == 2 and all(0 < p <= 60 for p in psnrs)
    *_, sampled, spread = run("noise_dependence.py", *recon, "--plain")
    assert len(by_steps(sampled, "samples from noise, PSNR to the target")) == 2
    spreads = by_steps(spread, "samples from noise, spread of their ")
    assert len(spreads) == 2 and all(0 <= s < 128 for s in spreads)

    rows = [line for line in run("condition_probe.py", "--fit", "24", "--min-records", "3") if line.startswith("| 1 ")]
    assert rows, "no attribute probed"
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert 0 <= float(cells[2]) <= 1 and len(cells) == 7
        for cell in cells[3:]:
            assert all(0 <= float(a) <= 1 for a in cell.split(" / "))
    probed = run("condition_probe.py", "--fit", "24", "--min-records", "3", "--task", "reconstruction")
    rows = {row.split(" | ")[0].strip("| "): row.strip("| ").split(" | ") for row in probed if row.startswith("| ")}
    assert {"largest cell (3 x 3)", "largest cell (8 x 8)", "largest colour", "objects"} <= set(rows)
    for cells in (rows[a] for a in rows if a != "attribute" and not a.startswith("-")):
        assert 0 <= float(cells[2]) <= 1 and len(cells) == 6  # majority, then the three features
        for cell in cells[3:]:
            assert all(0 <= float(a) <= 1 for a in cell.split(" / "))


def test_learning_signal_of_a_trained_run(stage2, tmp_path):
    """The learning signal as training logs it: per-timestep errors with and without the
    condition, completions, judge scores; to metrics.jsonl and TensorBoard."""
    from tensorboardX import SummaryWriter

    from qk_jax.eval import signal as signal_lib
    from qk_jax.sample import Sampler
    from qk_jax.train import measure_signal

    sampler = Sampler.from_checkpoint(stage2["run"])
    config = sampler.config
    config.train.signal.update(samples=2, noise_seeds=1, completion_steps=2, judge_samples=2)
    config.sample.steps = 2
    signal = signal_lib.LearningSignal.from_config(config)
    assert set(signal.records) == {"t2i", "reconstruction"} and set(signal.judge_records) == {"t2i"}
    for recs in signal.records["t2i"], signal.records["reconstruction"]:
        assert len({len(r["references"]) + bool(r["source"]) for r in recs}) == 1  # one batch
    degrees = [signal_lib.fixing_degree("t2i", r) for r in signal.records["t2i"]]
    assert degrees == sorted(degrees, reverse=True) and degrees[0] >= 1  # the most content-fixing prompts first
    writer = SummaryWriter(str(tmp_path / "tb"))
    flat = measure_signal(
        signal,
        config,
        sampler.kcfg,
        sampler.params,
        sampler.processor,
        sampler.mesh,
        2,
        str(tmp_path / "metrics.jsonl"),
        writer,
    )
    writer.close()
    for task in ("t2i", "reconstruction"):
        for t in signal_lib.GAIN_TIMESTEPS:
            e, e_u = flat[f"err/{task}@{t:g}"], flat[f"err_uncond/{task}@{t:g}"]
            assert 0 < e < 100 and 0 < e_u < 100
            assert flat[f"gain/{task}@{t:g}"] == pytest.approx(1 - e / e_u, abs=1e-4)
            e_s = flat[f"err_swapped/{task}@{t:g}"]
            assert 0 < e_s < 100 and flat[f"content/{task}@{t:g}"] == pytest.approx(1 - e / e_s, abs=1e-4)
        for t0 in signal_lib.COMPLETION_T0:
            assert 0 <= flat[f"completion_score/{task}@{t0:g}"] <= 1 and flat[f"completion_psnr/{task}@{t0:g}"] > 0
    assert 0 <= flat["judge/t2i"] <= 1 and 0 <= flat["judge_chance/t2i"] <= 1  # the chance level beside it
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert logged == [{"step": 2, "signal": flat}]
    assert os.listdir(tmp_path / "tb")


def test_learning_signal_on_imported_real_data(stage2, tmp_path):
    """Imported text-to-image data without scene graphs and no reconstruction task: the signal
    measures what it can (the gains, the completions' PSNR) instead of none of it."""
    from qk_jax.data import importer
    from qk_jax.eval import signal as signal_lib
    from qk_jax.sample import Sampler

    rng = np.random.default_rng(0)
    lines = []
    for i, split in enumerate(["train"] * 4 + ["validation"] * 3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"task": "t2i", "prompt": f"photo {i}", "target": f"{i}.png", "split": split}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    importer.import_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "data"), name="mine")
    sampler = Sampler.from_checkpoint(stage2["run"])
    config = sampler.config
    config.data.update(data_dir=str(tmp_path / "data"), dataset="mine")
    config.train.signal.update(samples=2, noise_seeds=1, completion_steps=2, judge_samples=2)
    signal = signal_lib.LearningSignal.from_config(config)
    assert set(signal.records) == {"t2i"} and signal.judge_records == {}  # no scene graphs: nothing to judge
    values = signal.measure(sampler)
    flat = signal_lib.flatten(values)
    assert set(flat) >= {f"gain/t2i@{t:g}" for t in signal_lib.GAIN_TIMESTEPS}
    assert {k for k in flat if k.startswith("completion")} == {
        f"completion_psnr/t2i@{t0:g}" for t0 in signal_lib.COMPLETION_T0
    }
    assert "complete[t2i] 0.5:" in signal_lib.summary_line(values)


def _restore(path, kcfg):
    root, _ = surgery.resolve_run(path)
    model = QueryKontext(kcfg)
    mesh = sharding.make_mesh((1, 1, 1))
    with jax.set_mesh(mesh):
        abstract, specs = sharding.abstract_init(model.init, jax.random.key(0))
        target = sharding.abstract_with_shardings(abstract, sharding.tree_shardings(abstract, specs, mesh))
        return model, ckpt_lib.Checkpointer(root, create=False).restore(params=target, json_items=())["params"]


def _kcfg(path):
    root, proc = surgery.resolve_run(path)
    step = ckpt_lib.Checkpointer(root, create=False).latest_step()
    cfg = ml_collections.ConfigDict(ckpt_lib.read_json_item(root, step, "config"))
    return cfg, model_config.build_kontext_config(cfg, model_config.read_special_token_ids(proc))


def test_a_run_saved_before_the_text_buckets_samples_as_it_was_trained(stage2, tmp_path):
    """A checkpoint whose saved config predates `data.text_buckets` / `data.drop_template_prefix`
    (runs saved before the condition stream was packed) is read with the values it was trained
    under (one text length, the template prefix in the stream), not today's defaults, and samples."""
    import shutil

    old = str(tmp_path / "old_run")
    shutil.copytree(stage2["run"], old)
    step_dir = os.path.join(old, "checkpoints", max(os.listdir(os.path.join(old, "checkpoints")), key=int))
    meta = os.path.join(step_dir, "config", "metadata")
    saved = json.load(open(meta))
    assert saved["data"]["text_buckets"] == 3 and saved["data"]["drop_template_prefix"] is True
    del saved["data"]["text_buckets"], saved["data"]["drop_template_prefix"]
    json.dump(saved, open(meta, "w"))
    sampler = Sampler.from_checkpoint(old)
    assert sampler.config.data.text_buckets == 1 and sampler.config.data.drop_template_prefix is False
    batch = sampler.model_batch(sampler.records(["a red circle"]))
    assert batch["input_ids"].shape[1] == sampler.config.data.max_text_len  # one text length: the longest
    assert sampler.generate(sampler.records(["a red circle"]), steps=1).shape[0] == 1
    now = Sampler.from_checkpoint(stage2["run"]).config.data
    assert now.text_buckets == 3 and now.drop_template_prefix is True


def test_surgery_1_to_2_report_and_lora_merge(stage1, stage2):
    assert "bit-identical: True" in stage2["stdout"]
    report = json.load(open(os.path.join(stage2["ckpt"], "surgery_report.json")))
    statuses = {r["path"]: r["status"] for r in report["paths"]}
    assert all(s.startswith(("kept", "merged", "added", "removed", "reinitialised")) for s in statuses.values())
    assert statuses["queries/embedding"] == "kept"
    assert statuses["vlm/language_model/layers/self_attn/q_proj/kernel"] == "merged"
    assert statuses["vlm/language_model/embed_tokens/embedding"] == "kept"
    assert all(s == "removed" for p, s in statuses.items() if p.startswith("head/"))
    assert all(s == "added" for p, s in statuses.items() if p.startswith("dit/"))
    assert any(p.startswith("lora/vlm/") and s.startswith("removed") for p, s in statuses.items())
    # Complete: every path of the source and of the destination is listed.
    cfg1, k1 = _kcfg(stage1["full"])
    cfg2, k2 = _kcfg(stage2["ckpt"])
    from qk_jax.tree import flatten_tree

    m1, p1 = _restore(stage1["full"], k1)
    m2, p2 = _restore(stage2["ckpt"], k2)
    assert set(statuses) == set(flatten_tree(p1)) | set(flatten_tree(p2))
    assert report["bit_identical"]["ok"] and report["bit_identical"]["checked"] == sum(
        1 for s in statuses.values() if s == "kept"
    )
    # The merged VLM gives the kontext tokens the stage-1 VLM gave with its adapters attached.
    host = ku.first_batch(cfg1, os.path.join(stage1["full"], "processor"), {"reconstruction": 1.0})
    batch = ku.prepared(k1, host)
    _, _, kontext1 = jax.jit(m1.condition)(p1, batch)  # adapters unmerged (the training path)
    _, _, kontext2 = jax.jit(m2.condition)(p2, batch)
    # float32: W + s B A rounds differently from W x + s B (A x); measured 1.1e-6 on a loaded machine.
    assert ku.max_rel(kontext2, kontext1) <= 3e-6


@pytest.fixture(scope="module")
def stage3(stage2, shapes_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("stage3")
    dst = str(base / "ckpt3")
    report = surgery.run(2, 3, stage2["run"], dst)
    workdir = str(base / "run")
    train(ku.stage_config(3, shapes_dir, "train.steps=2", f"train.init_from={dst}", "train.sample_images=2"), workdir)
    return {"ckpt": dst, "run": workdir, "report": report}


def test_training_writes_tensorboard_scalars_and_sample_images(stage3):
    from PIL import Image as PILImage

    png = os.path.join(stage3["run"], "samples", "step_2.png")
    assert PILImage.open(png).size == (64, 32)  # 2 validation prompts, 32x32 each
    events = [f for f in os.listdir(os.path.join(stage3["run"], "tb")) if f.startswith("events")]
    assert events and os.path.getsize(os.path.join(stage3["run"], "tb", events[0])) > 1000


def test_surgery_2_to_3_adds_a_zero_lora_and_keeps_everything(stage2, stage3):
    report = stage3["report"]
    statuses = {r["path"]: r["status"] for r in report["paths"]}
    assert set(s for p, s in statuses.items() if p.startswith("lora/dit/")) == {"added"}
    assert all(s == "kept" for p, s in statuses.items() if not p.startswith("lora/"))
    assert report["bit_identical"]["ok"]
    _, k2 = _kcfg(stage2["run"])
    _, k3 = _kcfg(stage3["ckpt"])
    assert k3.low_level and not k2.low_level
    m2, p2 = _restore(stage2["run"], k2)
    m3, p3 = _restore(stage3["ckpt"], k3)
    # b = 0: the adapted DiT (unmerged adapters, as in training) predicts exactly what the stage-2 DiT predicts.
    x = jax.random.normal(jax.random.key(0), (2, 64, 48))
    ids = jnp.zeros((2, 64, 3))
    cond = jax.random.normal(jax.random.key(1), (2, 6, 32))
    mask = jnp.ones((2, 6), bool)
    t = jnp.full((2,), 0.5)
    v2 = m2.velocity(p2, x, None, ids, cond, mask, t)
    v3 = m3.velocity(p3, x, None, ids, cond, mask, t)
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(v3))


def test_surgery_refuses_a_tree_that_does_not_fit(stage1, tmp_path):
    import shutil

    src = tmp_path / "bad"
    shutil.copytree(stage1["full"], src)
    step = ckpt_lib.Checkpointer(str(src / "checkpoints"), create=False).latest_step()
    meta = src / "checkpoints" / str(step) / "config" / "metadata"
    cfg = json.loads(meta.read_text())
    cfg["model"]["num_queries"] = 5  # the stored queries are (4, D)
    meta.write_text(json.dumps(cfg))
    with pytest.raises(surgery.SurgeryError, match=r"queries.*embedding.*\(4, 64\).*\(5, 64\)"):
        surgery.run(1, 2, str(src), str(tmp_path / "out"))
    with pytest.raises(surgery.SurgeryError, match="not stage 2"):
        surgery.run(2, 3, stage1["full"], str(tmp_path / "out2"))


def test_init_from_a_run_workdir(stage1, shapes_dir, tmp_path, caplog):
    """`train.init_from=RUN` (a workdir, as `qk-jax sample --checkpoint` takes) starts from its newest step."""
    workdir = str(tmp_path / "again")
    with caplog.at_level(logging.INFO):  # a log record (qk_jax.logs)
        train(ku.stage_config(1, shapes_dir, "train.steps=2", f"train.init_from={stage1['full']}"), workdir)
    out = "\n".join(r.getMessage() for r in caplog.records)
    assert f"initialised from {os.path.join(stage1['full'], 'checkpoints')} step {STEPS}" in out, out[-2000:]
    assert sorted(os.listdir(os.path.join(workdir, "processor"))) == sorted(
        os.listdir(os.path.join(stage1["full"], "processor"))
    )  # its tokenizer came along


@pytest.fixture(scope="module")
def sampler(stage3):
    return Sampler.from_checkpoint(stage3["run"])


def _png(tmp_path, name, rec_image):
    path = str(tmp_path / name)
    Image.fromarray(rec_image).save(path)
    return path


def test_sampling_is_deterministic_per_seed(sampler, tmp_path):
    recs = sampler.records(["a red circle", "two blue squares"])
    a = sampler.generate(recs, steps=3, seed=7)
    b = sampler.generate(recs, steps=3, seed=7)
    c = sampler.generate(recs, steps=3, seed=8)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0
    # An edit (source + dual guidance) and a multi-subject generation run too.
    rec = records.generate_record("edit", 0, "test", height=32)
    src = _png(tmp_path, "src.png", records.decode_image(rec["source"]))
    edit = sampler.generate(sampler.records([rec["prompt"]], source=src), steps=3, seed=0, image_guidance=1.5)
    assert edit.shape == (1, 32, 32, 3)
    rec = records.generate_record("multi_subject", 0, "test", height=32)
    refs = [_png(tmp_path, f"r{i}.png", records.decode_image(r)) for i, r in enumerate(rec["references"])]
    multi = sampler.generate(sampler.records([rec["prompt"]], references=refs), steps=2, seed=0)
    assert multi.shape == (1, 32, 32, 3)


def test_sampling_draws_at_the_chosen_size(sampler):
    token = sampler.kcfg.downsample  # the side of one DiT token in pixels
    assert sampler.output_size() == (32, 32)  # the training bucket of data.area, square
    # Without a chosen size an edit gets the training bucket nearest its source's aspect ratio.
    wide = sampler.output_size(source_shape=(40, 81))
    assert wide[0] < wide[1] and wide in buckets.bucket_table(32 * 32, sampler.config.data.multiple)
    assert sampler.output_size(height=token, width=3 * token) == (token, 3 * token)  # exactly as asked
    assert sampler.output_size(height=2 * token, source_shape=(40, 81)) == (2 * token, 4 * token)  # the source's ratio
    assert sampler.output_size(width=2 * token) == (2 * token, 2 * token)
    images = sampler.generate(sampler.records(["a red circle"]), steps=1, size=(token, 3 * token))
    assert images.shape == (1, token, 3 * token, 3)
    with pytest.raises(ValueError, match=f"--width {token + 1}: must be a positive multiple of {token}"):
        sampler.output_size(height=token, width=token + 1)
    with pytest.raises(ValueError, match="--height 0"):
        sampler.output_size(height=0)
    with pytest.raises(ValueError, match="steps=0"):
        sampler.generate(sampler.records(["a red circle"]), steps=0)


def test_bad_sampling_inputs_give_clear_errors(sampler, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        sampler.records(["edit it"], source=str(tmp_path / "missing.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        sampler.records(["edit it"], source=str(bad))
    img = _png(tmp_path, "ok.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="4 input images.*image_slots=3"):
        sampler.records(["too many"], source=img, references=[img, img, img])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.records(["fine", "  "])
    too_long = " ".join(["a red circle left of a blue square"] * 40)
    with pytest.raises(ValueError, match=r"record sample-1: \d+ prompt tokens .* exceed data.max_text_len=\d+"):
        sampler.generate(sampler.records(["fine", too_long]), steps=1)


def test_samples_are_written_in_the_format_their_name_asks_for(tmp_path):
    from qk_jax.sample import save_grid

    images = np.random.default_rng(0).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    for name, fmt in (("a.png", "PNG"), ("a.JPG", "JPEG"), ("a.jpeg", "JPEG"), ("a.webp", "WEBP"), ("a", "PNG")):
        grid = save_grid(images, str(tmp_path / name))
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt and im.size == (48, 16), name
            if fmt != "JPEG":  # lossless: the pixels as drawn
                np.testing.assert_array_equal(np.asarray(im.convert("RGB")), grid)
    with pytest.raises(ValueError, match=r"--out .*a.gif: cannot write .gif images"):
        save_grid(images, str(tmp_path / "a.gif"))
    assert not (tmp_path / "a.gif").exists()


def test_sample_cli_writes_a_grid(stage3, tmp_path):
    out = str(tmp_path / "grid.png")
    run = cli(
        "sample",
        "--checkpoint",
        stage3["run"],
        "--prompt",
        "a red circle",
        "--prompt",
        "a green star",
        "--batch",
        "2",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "48",
        "--out",
        out,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert Image.open(out).size == (96, 32)  # 2 prompts x 2 samples of 16x48, the size asked for
    run = cli("sample", "--checkpoint", stage3["run"], "--prompt", "", "--out", out)
    assert run.returncode != 0 and "empty" in run.stderr
    # A size the DiT cannot draw, or no sampling step, stops with the flag named.
    run = cli("sample", "--checkpoint", stage3["run"], "--prompt", "a red circle", "--width", "17", "--out", out)
    assert run.returncode != 0 and "--width 17: must be a positive multiple of" in run.stderr, run.stderr[-2000:]
    run = cli("sample", "--checkpoint", stage3["run"], "--prompt", "a red circle", "--steps", "0", "--out", out)
    assert run.returncode != 0 and "--steps 0" in run.stderr, run.stderr[-2000:]
    run = cli("sample", "--checkpoint", stage3["run"], "--prompt", "a red circle", "--guidance", "nan", "--out", out)
    assert run.returncode != 0 and "--guidance nan: must be a finite number" in run.stderr, run.stderr[-2000:]
