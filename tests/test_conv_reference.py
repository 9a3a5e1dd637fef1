"""`benchmarks/conv_reference.py`: its picture measure tells drawn shapes from a mosaic, and the
script trains, samples and reports on a real Kontext-Shapes folder."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import conv_reference  # noqa: E402
from tests.test_benchmarks import run_script  # noqa: E402


def test_picture_measure_tells_shapes_from_a_mosaic():
    """Rendered training targets are clean (every coloured pixel inside a fitted outline); the
    same targets with one-token tiles of palette colours scattered over them are not: each
    8 x 8-pixel tile is a square to the detector, so a picture holds more objects than a
    Kontext-Shapes scene has."""
    from qk_jax.data import records, vocab

    targets = [records.decode_image(records.generate_record("t2i", i, height=64)["target"]) for i in range(8)]
    clean = conv_reference.picture_stats(targets)
    assert clean["clean"] == 1.0 and clean["stray"] < 0.02 and 1 <= clean["objects"] <= 4

    rng = np.random.default_rng(0)
    palette = list(vocab.COLOURS.values())
    mosaic = []
    for img in targets:
        img = img.copy()
        for _ in range(12):
            y, x = rng.integers(0, 8, 2) * 8
            img[y : y + 8, x : x + 8] = palette[rng.integers(len(palette))]
        mosaic.append(img)
    tiled = conv_reference.picture_stats(mosaic)
    assert tiled["clean"] == 0.0 and tiled["objects"] > 4


@pytest.mark.slow  # ~60 s: a U-Net compiled for training and for a 20-step sampler
def test_script_reports_targets_and_samples(tmp_path, shapes_dir):
    out = tmp_path / "out"
    stdout = run_script(
        tmp_path,
        600,
        "conv_reference.py",
        "--data_dir",
        shapes_dir,
        "--out",
        str(out),
        "--steps",
        "3",
        "--samples",
        "4",
        "--limit",
        "16",
    )
    rows = json.loads((out / "results.json").read_text())
    assert rows["training targets"]["clean"] == 1.0
    unet = rows["U-Net, 3 steps of 16"]
    assert unet["parameters"] > 1_000_000 and np.isfinite(unet["final_loss"])
    assert (out / "unet_samples.png").exists() and "| U-Net, 3 steps of 16 |" in stdout
