"""The declarative mapping machinery and streamed safetensors I/O on a synthetic model."""

import json
import os

import numpy as np
import pytest

from qk_jax.convert import safetensors_io
from qk_jax.convert.mapping import CONV, TRANSPOSE, Mapping, MappingError, Rule
from qk_jax.tree import flatten_tree

RULES = [
    Rule("embed.weight", "embed/embedding"),
    Rule("layers.{i}.proj.weight", "blocks/proj/kernel", TRANSPOSE, stack=("i",)),
    Rule("layers.{i}.proj.bias", "blocks/proj/bias", stack=("i",)),
    Rule("convs.{j}.weight", "conv_{j}/kernel", CONV),
]


def hf_tensors(rng):
    t = {"embed.weight": rng.normal(size=(10, 4)).astype(np.float32)}
    for i in range(3):
        t[f"layers.{i}.proj.weight"] = rng.normal(size=(6, 4)).astype(np.float32)
        t[f"layers.{i}.proj.bias"] = rng.normal(size=(6,)).astype(np.float32)
    for j in range(2):
        t[f"convs.{j}.weight"] = rng.normal(size=(5, 3, 3, 2)).astype(np.float32)
    t["rotary.inv_freq"] = np.ones(2, np.float32)
    return t


def test_round_trip_stacks_and_transforms():
    rng = np.random.default_rng(0)
    hf = hf_tensors(rng)
    mapping = Mapping(RULES, {"i": 3}, ignore_hf=[r"inv_freq$"])
    params = dict(mapping.to_jax(hf.items()))
    assert params["blocks/proj/kernel"].shape == (3, 4, 6)
    np.testing.assert_array_equal(params["blocks/proj/kernel"][1], hf["layers.1.proj.weight"].T)
    assert params["conv_1/kernel"].shape == (3, 2, 3, 5)  # (O,I,H,W) -> (H,W,I,O)
    back = dict(mapping.to_hf(params))
    assert set(back) == set(hf) - {"rotary.inv_freq"}
    for k, v in back.items():
        np.testing.assert_array_equal(v, hf[k])
    mapping.check_coverage(hf, params)


def test_coverage_names_what_is_missing():
    rng = np.random.default_rng(0)
    hf = hf_tensors(rng)
    mapping = Mapping(RULES, {"i": 3}, ignore_hf=[r"inv_freq$"])
    paths = set(dict(mapping.to_jax(hf.items())))
    with pytest.raises(MappingError, match="extra/param"):
        mapping.check_coverage(hf, paths | {"extra/param"})
    with pytest.raises(MappingError, match="unknown.weight"):
        mapping.check_coverage(list(hf) + ["unknown.weight"], paths)
    with pytest.raises(MappingError, match="unknown.weight"):
        list(mapping.to_jax([("unknown.weight", np.zeros(1))]))
    # A stacked parameter with a layer missing is an error naming the parameter.
    partial = {k: v for k, v in hf.items() if k != "layers.2.proj.bias"}
    with pytest.raises(MappingError, match="blocks/proj/bias.*2 of 3"):
        list(mapping.to_jax(partial.items()))


def test_sharded_folder_write_and_stream_back(tmp_path):
    rng = np.random.default_rng(1)
    hf = hf_tensors(rng)
    del hf["rotary.inv_freq"]
    mapping = Mapping(RULES, {"i": 3})
    params = dict(mapping.to_jax(hf.items()))
    folder = tmp_path / "out"
    files = safetensors_io.save_params(folder, params, mapping, max_shard_bytes=300, extra_files={"config.json": "{}"})
    assert len(files) > 1 and all(os.path.exists(folder / f) for f in files)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf)
    loaded = flatten_tree(safetensors_io.load_params(folder, mapping))
    for k, v in params.items():
        np.testing.assert_array_equal(loaded[k], v)
    # No temporary folders are left beside the result.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_write_leaves_previous_folder_intact(tmp_path):
    folder = tmp_path / "out"
    safetensors_io.write_sharded(folder, [("a", np.ones(3, np.float32))])

    def broken():
        yield "a", np.zeros(3, np.float32)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        safetensors_io.write_sharded(folder, broken())
    np.testing.assert_array_equal(dict(safetensors_io.iter_tensors(folder))["a"], np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_weights_are_named(tmp_path):
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        safetensors_io.safetensors_files(tmp_path / "pt")
