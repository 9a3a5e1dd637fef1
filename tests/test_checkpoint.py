"""Orbax checkpoints: cross-mesh restore, partial restore, corrupt steps, keep-N, JSON items."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from qk_jax import checkpoint as ckpt_lib
from qk_jax import sharding
from qk_jax.models.smoke_lm import SmokeLM
from qk_jax.profiling import counting_compiles
from xla_cache import dropping_entries_written

MODEL = SmokeLM(vocab_size=64, embed_dim=32, num_heads=4, mlp_dim=64, num_layers=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Params + optimizer-like state written on a (2, 4) mesh at steps 1 and 2."""
    mesh = sharding.make_mesh((2, 4, 1))
    params, shardings, _ = sharding.init_sharded(
        lambda r: MODEL.init(r, jnp.zeros((8, 16), jnp.int32))["params"], mesh, jax.random.key(0)
    )
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
    out = ckpt_lib.Checkpointer(directory).restore(
        params=target, opt_state=abstract(opt, lambda a: NamedSharding(mesh81, P()))
    )
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
        ckpt_lib.Checkpointer(directory).restore(
            1, params=abstract(params, lambda a: one), ema=abstract(params, lambda a: one)
        )


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


def test_keep_period_keeps_periodic_steps_beside_the_newest(devices, tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path / "p", max_to_keep=2, keep_period=3)
    for step in range(1, 9):
        ck.save(step, params={"w": jnp.full((4,), step, jnp.float32)})
    ck.wait()
    assert ck.steps() == [3, 6, 7, 8]
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


def test_a_step_never_saved_is_named_with_the_steps_there_are(saved):
    with pytest.raises(ckpt_lib.CheckpointError, match=r"no checkpoint step 7 in .*; its steps: \[1, 2\]"):
        ckpt_lib.Checkpointer(saved[0], create=False).restore(7, json_items=("config",))


def _copy_of(saved, tmp_path):
    import shutil

    directory = saved[0]
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    return copy


def _data_files(step_dir):
    return [
        f for f in glob.glob(str(step_dir / "params" / "**" / "*"), recursive=True) if os.path.isfile(f) and "/d/" in f
    ]


def test_checksums_do_not_depend_on_the_mesh(devices, saved):
    _, params, _, _ = saved
    one = SingleDeviceSharding(jax.devices()[0])
    on_one = jax.device_put(params, one)
    assert ckpt_lib.tree_checksums(on_one) == ckpt_lib.tree_checksums(params)
    changed = jax.tree.map(lambda x: x, params)
    changed["embed"] = params["embed"].at[3, 5].add(1e-6)
    sums, sums_changed = ckpt_lib.tree_checksums(params), ckpt_lib.tree_checksums(changed)
    assert sums["embed"] != sums_changed["embed"]
    assert {k: v for k, v in sums.items() if k != "embed"} == {k: v for k, v in sums_changed.items() if k != "embed"}


def test_flipped_bytes_are_caught_and_the_step_moved_aside(devices, saved, tmp_path, caplog):
    _, params, _, _ = saved
    copy = _copy_of(saved, tmp_path)
    # Flip 64 bytes in the middle of every params data file of step 2.
    for f in _data_files(copy / "2"):
        data = bytearray(open(f, "rb").read())
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
        open(f, "wb").write(bytes(data))
    one = SingleDeviceSharding(jax.devices()[0])
    ck = ckpt_lib.Checkpointer(copy)
    with caplog.at_level("WARNING"):
        out = ck.restore(params=abstract(params, lambda a: one), quarantine=True)
    assert out["step"] == 1
    assert_tree_equal(out["params"], params)
    warnings = [r.message for r in caplog.records if "step 2" in r.message]
    assert len(warnings) == 1 and "moved aside" in warnings[0], warnings
    assert (copy / "2.corrupt").is_dir() and not (copy / "2").exists() and ck.steps() == [1]
    # The step number is free again: a resumed run saves it without colliding.
    ck.save(2, params=params, force=True)
    ck.wait()
    assert ck.steps() == [1, 2]
    ck.close()


def test_a_changed_checksum_is_a_corrupt_step(devices, saved, tmp_path):
    import json

    _, params, _, _ = saved
    copy = _copy_of(saved, tmp_path)
    path = copy / "2" / "checksums" / "metadata"
    sums = json.loads(path.read_text())
    sums["params"]["embed"] = (sums["params"]["embed"] + 1) % 2**32
    path.write_text(json.dumps(sums))
    one = SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="step 2.*params/embed does not match its checksum"):
        ckpt_lib.Checkpointer(copy).restore(2, params=abstract(params, lambda a: one))
    assert ckpt_lib.Checkpointer(copy).restore(params=abstract(params, lambda a: one))["step"] == 1


@pytest.mark.parametrize("damage", ["item_folder", "metadata_file", "meta_item", "checksums_item"])
def test_incomplete_step_falls_back(devices, saved, tmp_path, damage):
    import shutil

    _, params, _, opt = saved
    copy = _copy_of(saved, tmp_path)
    if damage == "item_folder":
        shutil.rmtree(copy / "2" / "opt_state")
    elif damage == "metadata_file":
        os.remove(copy / "2" / "params" / "_METADATA")
    elif damage == "meta_item":
        shutil.rmtree(copy / "2" / "meta")
    else:
        shutil.rmtree(copy / "2" / "checksums")
    one = SingleDeviceSharding(jax.devices()[0])
    ck = ckpt_lib.Checkpointer(copy)
    out = ck.restore(params=abstract(params, lambda a: one), opt_state=abstract(opt, lambda a: one), quarantine=True)
    assert out["step"] == 1 and ck.steps() == [1] and (copy / "2.corrupt").is_dir()
    with pytest.raises(ckpt_lib.CheckpointError, match="no readable checkpoint.*steps \\[1\\]"):
        shutil.rmtree(copy / "1" / "opt_state")
        ck.restore(params=abstract(params, lambda a: one), opt_state=abstract(opt, lambda a: one))


def test_an_error_outside_the_checkpoint_stops_without_skipping(devices, saved, tmp_path, monkeypatch):
    _, params, _, _ = saved
    copy = _copy_of(saved, tmp_path)
    ck = ckpt_lib.Checkpointer(copy)

    def out_of_memory(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", out_of_memory)  # every array read
    one = SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ckpt_lib.CheckpointError, match="step 2 .*RESOURCE_EXHAUSTED.*nothing was skipped"):
        ck.restore(params=abstract(params, lambda a: one), quarantine=True)
    assert ck.steps() == [1, 2] and not (copy / "2.corrupt").exists()


def test_a_failed_background_save_surfaces_at_the_next_check(devices, tmp_path):
    import resource
    import signal
    import time

    ck = ckpt_lib.Checkpointer(tmp_path / "full", max_to_keep=1)
    big = {"w": jax.random.normal(jax.random.key(0), (200_000,))}
    ck.save(1, params=big)
    ck.wait()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, old_limit[1]))  # every larger file write fails: a full disk
    with dropping_entries_written():  # a program compiled under the limit is cached cut short
        try:
            ck.save(2, params=jax.tree.map(lambda x: x + 1, big))
            deadline = time.time() + 60
            with pytest.raises(ckpt_lib.CheckpointSaveError, match=r"saving checkpoint .*/2 failed: .*File too large"):
                while time.time() < deadline:
                    ck.check_save()
                    time.sleep(0.05)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)
    with pytest.raises(ckpt_lib.CheckpointSaveError):  # reported again, never swallowed
        ck.check_save()
    ck.close()  # releases the manager without a second report
    assert ckpt_lib.Checkpointer(tmp_path / "full").steps() == [1]  # the previous good step survives


def test_a_step_written_before_checksums_restores_unverified_with_a_warning(devices, saved, tmp_path, caplog):
    import json
    import shutil

    _, _, params2, _ = saved
    copy = _copy_of(saved, tmp_path)
    shutil.rmtree(copy / "2" / "checksums")
    meta = copy / "2" / "meta" / "metadata"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "checksummed"}))
    one = SingleDeviceSharding(jax.devices()[0])
    with caplog.at_level("WARNING"):
        out = ckpt_lib.Checkpointer(copy).restore(params=abstract(params2, lambda a: one))
    assert out["step"] == 2
    assert_tree_equal(out["params"], params2)
    assert any("step 2" in r.message and "no checksums" in r.message for r in caplog.records)


@pytest.mark.parametrize("min_slice_bytes,slices", [(ckpt_lib.REPLICA_PARALLEL_MIN_SLICE_BYTES, False), (0, True)])
def test_small_replicated_arrays_are_saved_without_slice_programs(devices, tmp_path, min_slice_bytes, slices):
    """Leaves replicated on 8 devices, of shapes no other test saves: below the threshold one copy
    writes each whole (no program per leaf and copy; the checksums' one or two programs remain),
    with 0 every copy writes a slice of each, cut by a program compiled per leaf and copy. Both
    restore bit for bit."""
    mesh = sharding.make_mesh((8, 1, 1))
    replicated = NamedSharding(mesh, P())
    width = 24 if slices else 20  # shapes of its own per case: nothing compiled is reused
    tree = {f"w{i}": jax.device_put(jnp.full((40 + 8 * i, width), float(i)), replicated) for i in range(12)}
    ck = ckpt_lib.Checkpointer(tmp_path, replica_parallel_min_slice_bytes=min_slice_bytes)

    with counting_compiles() as compiles:
        ck.save(1, params=tree)
        ck.wait()
    compiled = len(compiles)
    assert (compiled >= 12 * 8) if slices else (compiled <= 2), compiled
    out = ckpt_lib.Checkpointer(tmp_path).restore(params=abstract(tree, lambda a: replicated), json_items=())
    assert_tree_equal(out["params"], tree)
