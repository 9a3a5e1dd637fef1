"""Aspect-ratio buckets and the grain pipeline: static shapes, mixture, sharding, resume."""

import collections
import json

import numpy as np
import pytest
from absl import flags

from qk_jax.data import buckets, builders, grouping, importer, pipeline, records, tokenizer, vlm_inputs, vocab

flags.FLAGS.mark_as_parsed()  # grain worker processes need parsed absl flags


def test_bucket_tables():
    table = buckets.bucket_table(512 * 512, 16)
    assert len(table) == len(buckets.RATIOS) == 13
    for (h, w), ratio in zip(table, buckets.RATIOS):
        a, b = (int(x) for x in ratio.split(":"))
        assert h % 16 == 0 and w % 16 == 0
        assert abs(h * w / (512 * 512) - 1) < 0.1
        assert abs(np.log(h / w) - np.log(a / b)) < 0.06
    assert buckets.bucket_table(64 * 64, 16)[0] == (64, 64)
    assert buckets.bucket_size("3:5", 64 * 64, 16) == (48, 80)
    assert buckets.choose_bucket(64, 64, table) == 0
    assert table[buckets.choose_bucket(600, 1000, table)] == buckets.bucket_size("3:5", 512 * 512, 16)
    assert table[buckets.choose_bucket(1000, 560, table)] == buckets.bucket_size("16:9", 512 * 512, 16)
    _, vlm = buckets.paired_tables(64 * 64, 16, 56 * 56, 28)
    assert all(h % 28 == 0 and w % 28 == 0 for h, w in vlm)
    with pytest.raises(ValueError, match="h:w"):
        buckets.bucket_size("wide", 100, 16)


def test_resize_crop_covers_and_centres():
    img = np.zeros((40, 100, 3), np.uint8)
    img[:, 45:55] = 255  # a bar in the middle
    out = buckets.resize_crop(img, (64, 64))
    assert out.shape == (64, 64, 3)
    assert out[:, 28:36].mean() > 200 and out[:, :10].mean() < 5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    data = str(root / "data")
    builders.build_shapes(data, ["t2i", "edit", "multi_subject"], num=24, num_eval=4, height=64, seed=0)
    tok = str(root / "tok")
    tokenizer.build_tokenizer(tok)
    # real data of several aspect ratios (imported) next to the synthetic set
    imgs, lines = root / "imgs", []
    imgs.mkdir()
    for i, (h, w) in enumerate([(64, 64), (40, 72), (72, 40)] * 4):
        (imgs / f"{i}.png").write_bytes(records.encode_png(np.full((h, w, 3), 20 * i, np.uint8)))
        lines.append(json.dumps({"task": "t2i", "prompt": f"image {i}", "target": f"imgs/{i}.png", "id": f"r{i}"}))
    (root / "m.jsonl").write_text("\n".join(lines))
    importer.import_manifest(str(root / "m.jsonl"), data, name="real")
    return {"data": data, "processor": vlm_inputs.load_processor(tok), "tok": tok}


def _config(env, **kw):
    c = pipeline.default_config()
    c.data_dir = env["data"]
    c.mixture = {"t2i": 0.5, "edit": 0.25, "multi_subject": 0.25}
    c.batch_size = 4
    c.max_text_len = 160
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_static_shapes_and_vlm_inputs(env):
    c = _config(env)
    ds = pipeline.make_dataset(c, env["processor"], process_index=0, process_count=1)
    pad_id = env["processor"].image_token_id
    prefix = vlm_inputs.template_prefix(env["processor"])
    assert len(prefix) > 3  # system prompt + user-turn header
    seen, lengths = set(), set()
    for batch in _take(iter(ds), 12):
        n = int(batch["num_inputs"][0])
        seen.add(n)
        assert batch["target"].shape == (4, 64, 64, 3) and batch["target"].dtype == np.float32
        assert -1.0 <= batch["target"].min() and batch["target"].max() <= 1.0
        assert batch["cond_images"].shape == (4, 3, 64, 64, 3)
        assert (batch["cond_mask"] == (np.arange(3) < n)).all() and (batch["num_inputs"] == n).all()
        assert not batch["cond_images"][:, n:].any()
        # padded to the group's text length: the shortest of the buckets that holds every row
        t = batch["input_ids"].shape[1]
        assert batch["attention_mask"].shape == (4, t) and t in (40, 80, 160)
        real = batch["attention_mask"].sum(1)
        shorter = [x for x in (40, 80, 160) if x < t]
        assert (real <= t).all() and (not shorter or (real > shorter[-1]).all()), (t, real)
        lengths.add(t)
        # the DiT's stream starts after the chat-template prefix every prompt shares
        first = t - real
        assert (batch["prompt_start"] == first + len(prefix)).all()
        for row, start in zip(batch["input_ids"], first):
            assert row[start : start + len(prefix)].tolist() == prefix
        assert batch["pixel_values"].shape == (4, 3, 36, 3 * 2 * 14 * 14)  # 84x84 VLM images: 6x6 patches
        assert batch["image_grid_thw"].shape == (4, 3, 3)
        assert (batch["image_grid_thw"][:, :n] == [1, 6, 6]).all() and not batch["image_grid_thw"][:, n:].any()
        # every valid slot contributes grid_h * grid_w / 4 image-pad tokens; prompts end at the right edge
        assert ((batch["input_ids"] == pad_id).sum(1) == n * 9).all()
        assert (batch["attention_mask"][:, -1] == 1).all()
        pv, grid = vlm_inputs.flat_vlm_inputs(batch)
        assert pv.shape == (4 * n * 36, 1176) and grid.shape == (4 * n, 3)
        tasks = {vocab.TASKS[t] for t in batch["task_id"]}
        assert len({records.TASK_INPUTS[t][0] + records.TASK_INPUTS[t][1] > 0 for t in tasks}) == 1
        assert batch["valid"].all() and len(batch["prompt"]) == 4
    assert {0, 1} <= seen and seen & {2, 3}
    assert len(lengths) >= 2  # t2i prompts and prompts with input images fall in different buckets


def test_text_lengths():
    assert grouping.text_lengths(64, 3) == [16, 32, 64]
    assert grouping.text_lengths(160, 3) == [40, 80, 160]
    assert grouping.text_lengths(1024, 1) == [1024]
    assert grouping.text_lengths(12, 4) == [8, 12]  # multiples of 8, at least 8, deduplicated
    assert grouping.text_length(33, [16, 32, 64]) == 64
    with pytest.raises(ValueError, match="data.max_text_len=64"):
        grouping.text_length(65, [16, 32, 64])
    with pytest.raises(ValueError, match="data.text_buckets"):
        grouping.text_lengths(64, 0)


def test_row_lengths_count_what_the_processor_gives(env):
    # The plan groups records by `row_lengths` without processing their images: the count must
    # be the real length of each row the processor encodes (images expanded to their tokens).
    proc = env["processor"]
    prompts = ["a red circle", "two blue squares at the top left of the picture", "x"]
    for n, side in ((0, 84), (1, 84), (2, 112)):
        images = [[np.zeros((side, side, 3), np.uint8)] * n for _ in prompts]
        enc = vlm_inputs.encode(proc, prompts, images, 200)
        geo = vlm_inputs.vision_geometry(proc)
        per_image = vlm_inputs.tokens_per_image(geo, side, side)
        counted = vlm_inputs.row_lengths(proc, prompts, [n] * 3, [per_image] * 3)
        assert counted.tolist() == enc["attention_mask"].sum(1).tolist()


def test_aspect_ratio_buckets_group_real_images(env):
    c = _config(env, mixture={"real/t2i": 1.0}, batch_size=2)
    shapes = collections.Counter()
    for batch in _take(iter(pipeline.make_dataset(c, env["processor"], process_index=0, process_count=1)), 12):
        shapes[batch["target"].shape[1:3]] += 1
        assert batch["pixel_values"].shape[:2] == (2, 3)
    # 64x64 -> 1:1, 40x72 -> 9:16-like (h < w), 72x40 -> its transpose; each batch one bucket
    assert set(shapes) == {(64, 64), buckets.bucket_size("9:16", 64 * 64, 16), buckets.bucket_size("16:9", 64 * 64, 16)}


def test_mixture_proportions(env):
    # The plan alone (no decoding): 3000 steps of 2 samples; steps draw their group at random,
    # so the share of t2i samples is 0.75 within a few standard deviations (0.008).
    c = _config(env, mixture={"t2i": 0.75, "edit": 0.25}, batch_size=2)
    plan, parts = pipeline.make_plan(c, env["processor"])
    task = [records.normalize(part[0])["task"] for part in parts]
    counts = collections.Counter(task[part] for step in range(3000) for part, _ in plan.records(step))
    assert abs(counts["t2i"] / sum(counts.values()) - 0.75) < 0.03, counts
    # every step's records share one group; each part's records are all used, in reshuffled epochs
    used = collections.defaultdict(list)
    for step in range(300):
        picks = plan.records(step)
        assert len({grouping.image_group(records.normalize(parts[p][i]), _table(c)) for p, i in picks}) == 1
        for p, i in picks:
            used[p, plan.group(step)].append(i)
    # a group's first len(group) records of a part: each of them once (an epoch, reshuffled)
    edit = task.index("edit")
    groups = [g for g, members in plan.members[edit].items() if len(members)]
    assert sum(len(plan.members[edit][g]) for g in groups) == 24 and len(groups) >= 1
    for g in groups:
        members = sorted(plan.members[edit][g].tolist())
        assert sorted(used[edit, g][: len(members)]) == members


def _table(c):
    return buckets.paired_tables(c.area, c.multiple, c.vlm_area, c.vlm_multiple, c.ratios)[0]


def test_global_batch_does_not_depend_on_the_process_count(env):
    # 1 process x 4 rows vs 2 processes x 2 rows: the union of the shares of each step is the
    # single-process batch, in order (several groups: 0, 1 and 2-3 input images, and real
    # images of three aspect buckets)
    mix = {"t2i": 0.3, "edit": 0.3, "multi_subject": 0.2, "real/t2i": 0.2}
    one = _take(
        iter(pipeline.make_dataset(_config(env, mixture=mix), env["processor"], process_index=0, process_count=1)), 8
    )
    its = [
        iter(
            pipeline.make_dataset(
                _config(env, mixture=mix, batch_size=2), env["processor"], process_index=i, process_count=2
            )
        )
        for i in range(2)
    ]
    shapes = set()
    for batch in one:
        a, b = next(its[0]), next(its[1])
        assert a["target"].shape == b["target"].shape == (2, *batch["target"].shape[1:])
        assert list(a["id"]) + list(b["id"]) == list(batch["id"])
        for key in ("target", "cond_images", "input_ids", "pixel_values"):
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), batch[key], err_msg=key)
        shapes.add((batch["target"].shape, int(batch["num_inputs"][0])))
    assert len(shapes) >= 3, shapes
    # the iterator state is the same on both processes and that of the single process
    assert its[0].get_state() == its[1].get_state() == {"next_index": 8}


def test_process_shares_cover_one_epoch(env):
    # one epoch of 24 edit records (one group: one size, one input, one text length), global
    # batches of 10: two full steps, then 4 valid rows and 6 padding rows; process 0 feeds rows
    # 0-4 of each step, process 1 rows 5-9
    c = _config(env, mixture={"edit": 1.0}, batch_size=5, num_epochs=1, text_buckets=1)
    shares = []
    for index in range(2):
        ids, valid = [], []
        for batch in pipeline.make_dataset(c, env["processor"], process_index=index, process_count=2):
            ids += list(batch["id"][batch["valid"]])
            valid.append(int(batch["valid"].sum()))
            assert batch["target"].shape == (5, 64, 64, 3)
        assert len(ids) == len(set(ids))
        shares.append((set(ids), valid))
    assert shares[0][1] == [5, 5, 4] and shares[1][1] == [5, 5, 0]
    assert not shares[0][0] & shares[1][0]
    assert shares[0][0] | shares[1][0] == {f"edit-train-{i:07d}" for i in range(24)}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # worker start-up: ~20-40 s
def test_iterator_resumes_the_exact_sequence(env, workers):
    c = _config(env, num_workers=workers)
    it = iter(pipeline.make_dataset(c, env["processor"], process_index=0, process_count=1))
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what goes into the Orbax checkpoint
    expected = _take(it, 4)
    it2 = iter(pipeline.make_dataset(c, env["processor"], process_index=0, process_count=1))
    it2.set_state(state)
    for a, b in zip(expected, _take(it2, 4)):
        _same(a, b)
    for i in (it, it2):
        i.close()
    if workers == 0:  # another seed, another order
        other = iter(pipeline.make_dataset(_config(env, seed=1), env["processor"], process_index=0, process_count=1))
        assert [list(b["id"]) for b in _take(other, 7)] != [
            list(b["id"])
            for b in _take(iter(pipeline.make_dataset(c, env["processor"], process_index=0, process_count=1)), 7)
        ]


def test_stage_mixtures_name_known_tasks():
    for stage in (1, 2, 3):
        parsed = pipeline.parse_mixture(pipeline.default_config(stage).mixture, "kontext_shapes")
        assert abs(sum(w for _, _, w in parsed) - 1) < 1e-9
    assert {t for _, t, _ in pipeline.parse_mixture(pipeline.STAGE_MIXTURES[3], "x")} == set(vocab.TASKS)


def test_clear_errors(env):
    with pytest.raises(ValueError, match="unknown task 'paint'"):
        pipeline.make_dataset(_config(env, mixture={"paint": 1.0}), env["processor"], process_index=0, process_count=1)
    with pytest.raises(ValueError, match="weights must be > 0"):
        pipeline.make_dataset(_config(env, mixture={"t2i": 0.0}), env["processor"], process_index=0, process_count=1)
    with pytest.raises(ValueError, match="outside the processor"):
        pipeline.make_dataset(_config(env, vlm_area=28 * 28), env["processor"], process_index=0, process_count=1)
    with pytest.raises(builders.NotBuiltError, match="customization"):
        pipeline.make_dataset(
            _config(env, mixture={"customization": 1.0}), env["processor"], process_index=0, process_count=1
        )
    # a prompt that cannot fit is refused when the plan is made, naming the record, not mid-run
    with pytest.raises(ValueError, match=r"multi_subject record \S+: \d+ prompt tokens .* exceed data.max_text_len=40"):
        pipeline.make_dataset(
            _config(env, mixture={"multi_subject": 1.0}, max_text_len=40),
            env["processor"],
            process_index=0,
            process_count=1,
        )


def test_process_rows_keep_micro_batches_global():
    # 2 processes x 4 rows, 2 micro-batches: micro-batch 0 is global rows 0-3 (2 from each process)
    assert pipeline.process_rows(4, 0, 2) == [0, 1, 2, 3] and pipeline.process_rows(4, 1, 2) == [4, 5, 6, 7]
    assert pipeline.process_rows(4, 0, 2, micro_batches=2) == [0, 1, 4, 5]
    assert pipeline.process_rows(4, 1, 2, micro_batches=2) == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="not divisible by 3 micro-batches"):
        pipeline.process_rows(4, 0, 2, micro_batches=3)
