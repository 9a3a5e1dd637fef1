"""Orbax checkpoints: cross-mesh restore, partial restore, corrupt steps, keep-N, JSON items."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from qk_jax import checkpoint as ckpt_lib
from qk_jax import sharding
from qk_jax.models.smoke_lm import SmokeLM

MODEL = SmokeLM(vocab_size=64, embed_dim=32, num_heads=4, mlp_dim=64, num_layers=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Params + optimizer-like state written on a (2, 4) mesh at steps 1 and 2."""
    mesh = sharding.make_mesh((2, 4, 1))
    params, shardings, _ = sharding.init_sharded(
        lambda r: MODEL.init(r, jnp.zeros((8, 16), jnp.int32))["params"], mesh, jax.random.key(0))
    opt = {"mu": jax.tree.map(lambda x: x * 0.5, params), "count": jnp.array(3, jnp.int32)}
    directory = tmp_path_factory.mktemp("ckpt")
    ck = ckpt_lib.Checkpointer(directory, max_to_keep=3)
    ck.save(1, params=params, opt_state=opt, config={"name": "tiny"}, data={"next_index": 7})
    params2 = jax.tree.map(lambda x: x + 1, params)
    ck.save(2, params=params2, opt_state=opt, ema=params, config={"name": "tiny"}, data={"next_index": 9})
    ck.wait()
    return directory, params, params2, opt


def abstract(tree, sharding_for):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_for(a)), tree)


def assert_tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_onto_other_mesh_bit_exact(devices, saved):
    directory, _, params2, opt = saved
    mesh81 = sharding.make_mesh((8, 1, 1))
    target = abstract(params2, lambda a: NamedSharding(mesh81, P("data") if a.shape[0] % 8 == 0 else P()))
    out = ckpt_lib.Checkpointer(directory).restore(params=target, opt_state=abstract(opt, lambda a: NamedSharding(mesh81, P())))
    assert out["step"] == 2
    assert_tree_equal(out["params"], params2)
    assert out["params"]["embed"].sharding.mesh.shape["data"] == 8
    assert out["data"] == {"next_index": 9} and out["config"] == {"name": "tiny"} and out["meta"]["step"] == 2
    assert_tree_equal(out["opt_state"], opt)


def test_restore_onto_single_device(devices, saved):
    directory, params, _, _ = saved
    one = SingleDeviceSharding(jax.devices()[3])
    out = ckpt_lib.Checkpointer(directory).restore(1, params=abstract(params, lambda a: one))
    assert_tree_equal(out["params"], params)
    assert out["params"]["embed"].sharding == one


def test_partial_restore_of_subtree(devices, saved):
    directory, _, params2, _ = saved
    one = SingleDeviceSharding(jax.devices()[0])
    sub = {"blocks": {"qkv": abstract(params2["blocks"]["qkv"], lambda a: one)}}
    out = ckpt_lib.Checkpointer(directory).restore_subtree(2, "params", sub)
    assert set(out) == {"blocks"} and set(out["blocks"]) == {"qkv"}
    assert_tree_equal(out["blocks"]["qkv"], params2["blocks"]["qkv"])


def test_mismatched_target_names_the_path(devices, saved):
    directory, params, _, _ = saved
    one = SingleDeviceSharding(jax.devices()[0])
    bad = abstract(params, lambda a: one)
    bad["embed"] = jax.ShapeDtypeStruct((65, 32), jnp.float32, sharding=one)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"params/embed: .*\(64, 32\).*\(65, 32\)"):
        ckpt_lib.Checkpointer(directory).restore(2, params=bad)
    with pytest.raises(ckpt_lib.CheckpointError, match="no item 'ema'"):
        ckpt_lib.Checkpointer(directory).restore(1, params=abstract(params, lambda a: one), ema=abstract(params, lambda a: one))


def test_truncated_step_is_skipped(devices, saved, tmp_path, caplog):
    import shutil
    directory, params, _, _ = saved
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    # Truncate every data file of step 2's params, as a crash during a copy would.
    for f in glob.glob(str(copy / "2" / "params" / "**" / "*"), recursive=True):
        if os.path.isfile(f) and ("ocdbt" in f or "/d/" in f):
            open(f, "wb").close()
    one = SingleDeviceSharding(jax.devices()[0])
    with caplog.at_level("WARNING"):
        out = ckpt_lib.Checkpointer(copy).restore(params=abstract(params, lambda a: one))
    assert out["step"] == 1
    assert_tree_equal(out["params"], params)
    assert any("step 2" in r.message and "skipping" in r.message for r in caplog.records)


def test_keep_n_and_listing(devices, tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path / "k", max_to_keep=2)
    for step in range(1, 5):
        ck.save(step, params={"w": jnp.full((4,), step, jnp.float32)})
    ck.wait()
    assert ck.steps() == [3, 4] and ck.latest_step() == 4
    one = SingleDeviceSharding(jax.devices()[0])
    out = ck.restore(params={"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=one)})
    np.testing.assert_array_equal(np.asarray(out["params"]["w"]), np.full((4,), 4.0))
    assert ck.abstract_item(4)["w"].shape == (4,)
    ck.close()


def test_relative_directory(devices, tmp_path, monkeypatch):
    # `qk-jax train --workdir runs/x` passes a relative path; Orbax only takes absolute ones.
    monkeypatch.chdir(tmp_path)
    ck = ckpt_lib.Checkpointer(os.path.join("runs", "rel"))
    ck.save(1, params={"w": jnp.arange(4.0)}, config={"a": 1})
    ck.wait()
    one = SingleDeviceSharding(jax.devices()[0])
    out = ck.restore(params={"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=one)})
    np.testing.assert_array_equal(np.asarray(out["params"]["w"]), np.arange(4.0))
    ck.close()
    assert (tmp_path / "runs" / "rel" / "1").is_dir()
    assert str(ckpt_lib.absolute_path("gs://bucket/run")).startswith("gs://")


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint steps"):
        ckpt_lib.Checkpointer(tmp_path / "empty").restore(params={"w": jax.ShapeDtypeStruct((1,), jnp.float32)})
