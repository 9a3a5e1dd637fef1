"""The pieces of `benchmarks/condition_probe.py` that decide its numbers: the labels it reads
from a record's scene, the bag of words, and the ridge probe (which must find a linear code and
must not find one in noise)."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import condition_probe
from qk_jax.data import records as records_lib


def _record(objects, **spec):
    return {"scene": json.dumps({"spec": dict({"objects": objects, "relations": [], "exact": False}, **spec)})}


def test_attribute_labels_name_what_the_prompt_states():
    one = _record([{"shape": "circle", "colour": "red", "size": None, "cell": "top left"}])
    assert condition_probe.attribute_labels(one) == {"1 colour": "red", "1 shape": "circle", "1 cell": "top left"}
    two = _record([{"shape": "square", "colour": "blue"}, {"shape": "hexagon", "colour": None}])
    assert condition_probe.attribute_labels(two) == {"2a colour": "blue", "2a shape": "square", "2b shape": "hexagon"}
    counting = _record([{"shape": "circle", "colour": "red"}] * 2, exact=True)
    assert condition_probe.attribute_labels(counting) == {}
    assert condition_probe.attribute_labels({"scene": ""}) == {}


def test_bag_of_words_counts_ids_of_the_vocabulary_only():
    ids = np.array([[5, 7, 5, -1], [9, -1, -1, -1]])
    counts = condition_probe.bag_of_words(ids, np.array([5, 7]))
    np.testing.assert_array_equal(counts, [[2, 1], [0, 0]])


def test_ridge_probe_reads_a_linear_code_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 600)
    codes = rng.normal(size=(4, 32))
    x = codes[labels] * 0.8 + rng.normal(size=(600, 32))  # each class a direction, buried in noise
    fit, test = slice(0, 400), slice(400, 600)
    (acc,) = condition_probe.ridge_probe(x[fit], labels[fit].astype(str), [(x[test], labels[test].astype(str))])
    assert acc > 0.9
    shuffled = rng.permutation(labels)
    (chance,) = condition_probe.ridge_probe(x[fit], shuffled[fit].astype(str), [(x[test], shuffled[test].astype(str))])
    assert chance < 0.4
    # More features than records: the dual solve gives the same reading.
    wide = np.concatenate([x, rng.normal(size=(600, 800))], axis=1)
    (acc_wide,) = condition_probe.ridge_probe(
        wide[fit], labels[fit].astype(str), [(wide[test], labels[test].astype(str))]
    )
    assert acc_wide > 0.85


def _image_record(objects, image):
    return dict(_record(objects), target=records_lib.encode_png(image))


def test_prompt_ceiling_is_the_share_of_the_variance_the_prompt_leaves():
    red = [{"shape": "circle", "colour": "red", "size": None, "cell": None}]
    blue = [{"shape": "square", "colour": "blue", "size": None, "cell": "top left"}]
    # Each spec always drawn the same: the prompt's mean image is exact, nothing is left.
    recs = [_image_record(red, np.full((8, 8, 3), 200, np.uint8)) for _ in range(3)]
    recs += [_image_record(blue, np.full((8, 8, 3), 20, np.uint8)) for _ in range(4)]
    recs.append(_image_record([{"shape": "star", "colour": "red"}], np.zeros((8, 8, 3), np.uint8)))  # drawn once
    rows = {kind: (n, ratio) for kind, n, ratio in condition_probe.prompt_ceiling(recs)}
    assert rows == {"all": (7, 0.0), "1 object": (3, 0.0), "1 object, placed": (4, 0.0)}
    # Images that do not depend on the prompt: the ratio is 1 up to sampling noise (unbiased within-spec variance).
    rng = np.random.default_rng(0)
    noise = [_image_record(red if i % 2 else blue, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for i in range(400)]
    (_, n, ratio), *_ = condition_probe.prompt_ceiling(noise)
    assert n == 400 and abs(ratio - 1) < 0.02
