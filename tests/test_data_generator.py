"""Kontext-Shapes generator: vocabulary, determinism, tasks, splits and held-out compositions."""

import json

import numpy as np
import pytest

from qk_jax.data import records, render, scenes, splits, vocab

SIZES = [(64, 64), (48, 80)]


def test_vocabulary_is_the_issue_palette():
    assert vocab.SHAPES == ("circle", "square", "triangle", "star", "hexagon")
    assert vocab.COLOURS == {
        "red": (230, 25, 75),
        "green": (60, 180, 75),
        "blue": (0, 130, 200),
        "yellow": (255, 225, 25),
        "orange": (245, 130, 48),
        "purple": (145, 30, 180),
        "cyan": (70, 240, 240),
        "magenta": (240, 50, 230),
    }
    assert (
        vocab.SIZES["small"]
        < vocab.SIZE_BOUNDS[0]
        < vocab.SIZES["medium"]
        < vocab.SIZE_BOUNDS[1]
        < vocab.SIZES["large"]
    )
    # the jittered radii never cross a size boundary
    assert vocab.SIZES["small"] * (1 + vocab.SIZE_JITTER) < vocab.SIZE_BOUNDS[0]
    assert vocab.SIZES["large"] * (1 - vocab.SIZE_JITTER) > vocab.SIZE_BOUNDS[1]
    assert len(vocab.GRID) == 9 and set(vocab.RELATIONS) == {"left of", "right of", "above", "below"}
    assert vocab.TASKS == ("t2i", "reconstruction", "transformation", "edit", "customization", "multi_subject")
    assert set(vocab.CATEGORIES["t2i"]) == {
        "single_object",
        "two_objects",
        "counting",
        "colors",
        "position",
        "attribute_binding",
    }


def test_render_is_antialiased_and_exact_in_area():
    canvas = np.full((64, 64, 3), 128.0, np.float32)
    render.draw_object(canvas, "circle", vocab.COLOURS["red"], 0.5, 0.5, 0.2)
    img = render.to_uint8(canvas)
    red = np.asarray(vocab.COLOURS["red"], np.float64)
    cov = (img[..., 0].astype(np.float64) - 128.0) / (red[0] - 128.0)
    assert np.isclose(cov.sum(), np.pi * (0.2 * 64) ** 2, rtol=0.01)  # coverage integrates to the area
    edge_values = np.unique(img[..., 0])
    assert len(edge_values) > 5  # partial coverage at the edge, not a hard binary mask
    for shape in vocab.SHAPES:
        u, v = np.meshgrid(np.linspace(-1.2, 1.2, 601), np.linspace(-1.2, 1.2, 601))
        inside = (render.shape_sdf(shape, u, v) < 0).mean() * 2.4**2
        assert np.isclose(inside, render.AREA[shape], rtol=0.02), shape


@pytest.mark.parametrize("task", vocab.TASKS)
def test_records_are_deterministic_valid_and_independent_of_global_state(task):
    a = records.generate_record(task, 3, "train", seed=7, height=64)
    np.random.seed(123)  # global numpy state must not matter
    b = records.generate_record(task, 3, "train", seed=7, height=64)
    assert a == b
    assert records.generate_record(task, 4, "train", seed=7) != a
    assert records.generate_record(task, 3, "train", seed=8) != a
    assert records.validate(a) == []
    n_src, lo, hi = records.TASK_INPUTS[task]
    assert bool(a["source"]) == bool(n_src) and lo <= len(a["references"]) <= hi
    assert a["category"] in vocab.CATEGORIES[task]
    graph = json.loads(a["scene"])
    assert set(graph) == {"target", "source", "references", "spec"}


@pytest.mark.parametrize("height,width", SIZES)
def test_every_task_renders_its_scene_graph_at_any_size(height, width):
    for task in vocab.TASKS:
        for i in range(4):
            rec = records.generate_record(task, i, "train", 0, height, width)
            graph = json.loads(rec["scene"])
            target = records.decode_image(rec["target"])
            assert target.shape == (height, width, 3), (task, rec["category"])
            scene = scenes.Scene.from_dict(graph["target"])
            if "transform" not in scene.background:  # pixel-transformed targets are checked below
                np.testing.assert_array_equal(scenes.render_scene(scene), target)
            for obj in scene.objects:  # every object lies inside the image
                r_px = obj.r * min(height, width)
                assert r_px <= obj.cx * width <= width - r_px and r_px <= obj.cy * height <= height - r_px


def test_transformations_are_pixel_exact_and_rotations_only_for_square_images():
    seen = set()
    for i in range(60):
        rec = records.generate_record("transformation", i, "train", 0, 64)
        seen.add(rec["category"])
        if rec["category"] != "recolor":
            src = records.decode_image(rec["source"])
            np.testing.assert_array_equal(
                scenes.transform_image(src, rec["category"]), records.decode_image(rec["target"])
            )
    assert seen == set(vocab.TRANSFORMS)
    wide = {records.generate_record("transformation", i, "train", 0, 48, 80)["category"] for i in range(60)}
    assert not wide & {"rotate90", "rotate270"}


def test_edits_change_only_the_edited_region():
    seen = set()
    for i in range(60):
        rec = records.generate_record("edit", i, "train", 0, 64)
        spec = json.loads(rec["scene"])["spec"]
        seen.add(spec["type"])
        src, tgt = records.decode_image(rec["source"]), records.decode_image(rec["target"])
        x0, y0, x1, y1 = spec["region"]
        outside = np.ones((64, 64), bool)
        outside[int(np.floor(y0 * 64)) : int(np.ceil(y1 * 64)), int(np.floor(x0 * 64)) : int(np.ceil(x1 * 64))] = False
        np.testing.assert_array_equal(src[outside], tgt[outside])
        assert not np.array_equal(src, tgt)
    assert seen == set(vocab.EDIT_TYPES)


def _all_keys(graph):
    scenes_ = [graph["target"]] + ([graph["source"]] if graph["source"] else []) + graph["references"]
    return [splits.scene_keys(s) for s in scenes_]


def test_held_out_compositions_never_in_train_or_validation_and_always_in_test():
    for task in vocab.TASKS:
        for split in splits.SPLITS:
            for i in range(8):
                graph = json.loads(records.generate_record(task, i, split, 0, 64)["scene"])
                held = [splits.held_out_in(keys) for keys in _all_keys(graph)]
                if split == "test":
                    assert any(held), (task, i)
                else:
                    assert not any(held), (task, split, i)
                    for keys in _all_keys(graph):
                        assert not keys & splits.HELD_OUT_PAIRS
    assert splits.held_out_in({("green", "circle"), ("orange", "square"), ("red", "circle")})
    assert not splits.held_out_in({("green", "circle"), ("red", "circle")})
    with pytest.raises(ValueError, match="unknown split"):
        splits.accepts("dev", {"target": {"objects": []}})


def test_test_split_prompts_name_the_colours_they_ask_for():
    for i in range(12):
        rec = records.generate_record("t2i", i, "test", 0, 64)
        for obj in json.loads(rec["scene"])["spec"]["objects"]:
            assert obj["colour"] and obj["colour"] in rec["prompt"] and obj["shape"] in rec["prompt"]


def test_splits_use_separate_streams():
    ids = {records.generate_record("t2i", 0, s, 0, 64)["target"] for s in splits.SPLITS}
    assert len(ids) == 3
