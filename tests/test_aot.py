"""`qk-jax aot`: the tiny stage-2 config compiled for a small TPU topology (v5e:2x2) through
libtpu on this CPU machine; the report's fields, FSDP-sharded state, the verdict line, and
the CLI (sampling program only, to keep the test short)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli_env import tpu_init_errors, user_env
from qk_jax import aot, aot_report, sharding, train_state
from qk_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x2"


@pytest.fixture(scope="module")
def report():
    config = load_config("configs/stage2.py:tiny")
    return aot.run(config, TOPOLOGY, sharding.parse_mesh("data=2,fsdp=2"), batch=8, log=lambda *a, **k: None)


@pytest.mark.slow
def test_train_and_sample_compile_and_report(report):
    assert report["chip"] == "v5e" and report["num_devices"] == 4 and report["hbm_bytes"] == 16 * aot.GIB
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert report["config"]["global_batch"] == 8 and report["config"]["input_images"] == 1
    # The batch has the prepared layout: 8 images (one per sample) as (I, P, D) for the vision tower.
    assert report["config"]["batch_shapes"]["pixel_values"][0] == 8
    assert len(report["config"]["batch_shapes"]["pixel_values"]) == 3
    train, sample = report["programs"]["train"], report["programs"]["sample"]
    for entry in (train, sample):
        m = entry["memory"]
        assert set(m) == {"arguments", "outputs", "temporaries", "aliases", "generated_code", "peak"}
        assert m["arguments"] > 0 and m["peak"] >= m["arguments"]
        assert entry["flops"]["analytic"] > 0 and entry["flops"]["xla_per_device"] > 0
        assert entry["compile_seconds"] > 0 and entry["fits"]
    # The state is donated: its buffers alias the outputs.
    assert train["memory"]["aliases"] > 0.5 * train["state_bytes_per_device"]
    # FSDP over 2 devices: each holds about half of the state (the tiny model's small
    # leaves that do not divide stay replicated).
    params = train["params"]["trainable"] + train["params"]["frozen"]
    assert params == report["params_total"]
    assert train["flops"]["parts"]["dit"] > 0 and set(train["flops"]["parts"]) >= {"vit", "llm", "connector", "dit"}
    assert sample["steps"] == 20 and sample["branches"] == 2
    text = aot_report.format_report(report)
    last = text.splitlines()[-1]
    assert last.startswith("FITS: ") and "v5e:2x2" in last and "global batch 8" in last
    assert "arguments" in text and "temporaries" in text and "aliases" in text
    json.dumps(report)  # the --json output is plain JSON


@pytest.mark.slow
def test_verdict_says_does_not_fit_without_room(report):
    tight = json.loads(json.dumps(report))
    tight["hbm_bytes"] = tight["programs"]["train"]["memory"]["peak"]  # exactly full: no headroom left
    aot_report.judge(tight, headroom=0.1)
    assert not tight["fits"] and not tight["programs"]["train"]["fits"]
    assert aot_report.format_report(tight).splitlines()[-1].startswith("DOES NOT FIT: ")


def test_fsdp_shards_the_state():
    config = load_config("configs/stage2.py:tiny")
    mesh, kind = aot.topology_mesh(TOPOLOGY, sharding.parse_mesh("data=1,fsdp=4"))
    assert "v5" in kind.lower()
    from qk_jax import model_config
    from qk_jax.models.kontext import QueryKontext

    with config.unlocked():
        config.mesh = dict(mesh.shape)
    params = train_state.params_target(QueryKontext(model_config.validate(config, 4)), mesh)
    per_device, total = aot._tree_bytes(params), sum(x.size * x.dtype.itemsize for x in _leaves(params))
    assert per_device < 0.5 * total, (per_device, total)


def test_doubling_fsdp_halves_each_devices_train_state():
    """The abstract train state `qk-jax aot` compiles (parameters, AdamW moments, EMA) on
    meshes fsdp=1, 2, 4 of the same 4 chips: every leaf that FSDP shards holds half as many
    bytes per device each time fsdp doubles, the others stay whole, and the sharded leaves
    are nearly all of the state."""
    import jax

    from qk_jax import model_config, optim
    from qk_jax.models.kontext import QueryKontext

    per_leaf = {}
    for fsdp in (1, 2, 4):
        config = load_config("configs/stage2.py:tiny")
        mesh, _ = aot.topology_mesh(TOPOLOGY, sharding.parse_mesh(f"data={4 // fsdp},fsdp={fsdp}"))
        with config.unlocked():
            config.mesh = dict(mesh.shape)
        params = train_state.params_target(QueryKontext(model_config.validate(config, 4)), mesh)
        state = train_state.abstract_state(
            params, config.train.trainable, optim.make_optimizer(config.train), config.train.ema_decay > 0
        )
        leaves = jax.tree_util.tree_flatten_with_path(state)[0]
        per_leaf[fsdp] = {jax.tree_util.keystr(p): aot._tree_bytes(leaf) for p, leaf in leaves}
    assert per_leaf[1].keys() == per_leaf[2].keys() == per_leaf[4].keys()
    sharded = {k for k in per_leaf[1] if per_leaf[4][k] < per_leaf[1][k]}
    for k in per_leaf[1]:
        if k in sharded:
            assert per_leaf[2][k] * 2 == per_leaf[1][k] and per_leaf[4][k] * 2 == per_leaf[2][k], k
        else:
            assert per_leaf[1][k] == per_leaf[2][k] == per_leaf[4][k], k
    total = sum(per_leaf[1].values())
    assert sum(per_leaf[1][k] for k in sharded) > 0.9 * total
    whole = total - sum(per_leaf[1][k] for k in sharded)
    assert sum(per_leaf[2].values()) == whole + sum(per_leaf[1][k] for k in sharded) // 2


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown chip"):
        aot.chip_of("v9z:2x2")
    with pytest.raises(ValueError, match="--mesh"):
        sharding.parse_mesh("data=2,pipeline=2")
    with pytest.raises(ValueError, match="cover the topology"):
        aot.topology_mesh(TOPOLOGY, sharding.parse_mesh("data=2"))
    with pytest.raises(ValueError, match="not a TPU topology"):
        aot.topology_mesh("v5e:3x7x9x2", sharding.parse_mesh("data=-1"))


@pytest.mark.slow
def test_cli_sample_program_writes_json_and_verdict(tmp_path):
    out = tmp_path / "aot.json"
    # a user's environment: no JAX_PLATFORMS / TPU_* variables; the tool sets what libtpu needs
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qk_jax.cli",
            "aot",
            "--config",
            "configs/stage3.py:tiny",
            "--topology",
            TOPOLOGY,
            "--programs",
            "sample",
            "--batch",
            "4",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tpu_init_errors(proc.stderr) == [], proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("FITS: sample "), lines[-3:]
    report = json.loads(out.read_text())
    assert list(report["programs"]) == ["sample"] and report["verdict"] == lines[-1]
    # Stage 3: input images join the image stream and sampling runs dual guidance (3 branches).
    assert report["programs"]["sample"]["branches"] == 3
    # A --json that cannot be written stops before the compiles (it failed after them).
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "qk_jax.cli", "aot", "--config", "configs/stage3.py:tiny", "--topology", TOPOLOGY]
        + ["--json", str(blocker / "aot.json")],
        cwd=ROOT,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith(f"qk-jax aot: error: OutputError: --json {blocker / 'aot.json'}")
    assert "compile" not in proc.stdout, proc.stdout


def test_two_slice_topology_mesh_and_compile():
    """`mesh.num_slices=2`: two v5p:2x2x1 slices, `data` across them (DCN), `fsdp` inside
    each (ICI); a sharded step compiles for that topology."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from qk_jax.models.mmdit import MMDiT, init_params, mmdit_config
    from qk_jax.models.mmdit.model import dummy_inputs

    mesh, _ = aot.topology_mesh("v5p:2x2x1", sharding.parse_mesh("data=2,fsdp=4,num_slices=2"))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    slice_of = [[d.slice_index for d in row.flat] for row in mesh.devices]
    assert slice_of == [[0] * 4, [1] * 4]
    with pytest.raises(ValueError, match="mesh.num_slices=2"):
        aot.topology_mesh("v5p:2x2x1", sharding.parse_mesh("data=1,fsdp=8,num_slices=2"))
    cfg = mmdit_config("tiny", num_layers=1, num_single_layers=0)
    params = jax.eval_shape(lambda: nn.meta.unbox(init_params(cfg, jax.random.key(0))))
    x = jax.eval_shape(lambda: dummy_inputs(cfg, batch=8, n=16, t=8))
    loss = lambda p, x: jnp.sum(MMDiT(cfg).apply({"params": p}, **x) ** 2)  # noqa: E731
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch), x)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.activation_rules()):
        compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_xla_out_of_memory_message_gives_the_bytes_asked_for():
    # libtpu's words for a program larger than the chip (v5e:2x2, seen compiling the case below)
    error = RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(136.79G) exceeds available HBM (15.75G).\nmore detail"
    )
    oom = aot.out_of_memory(error)
    assert oom["requested_bytes"] == int(136.79 * aot.GIB) and oom["available_bytes"] == int(15.75 * aot.GIB)
    assert oom["message"].startswith("RESOURCE_EXHAUSTED: Ran out of memory") and "\n" not in oom["message"]
    assert aot.out_of_memory(RuntimeError("INVALID_ARGUMENT: bad shape")) is None
    unparsed = aot.out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: something new"))
    assert unparsed["requested_bytes"] is None and unparsed["message"] == "RESOURCE_EXHAUSTED: something new"


@pytest.mark.slow
def test_a_program_larger_than_the_chip_is_a_verdict_not_an_error():
    """The tiny stage-2 train step at a global batch of 65 536 on v5e:2x2 (16 GiB chips): XLA
    refuses it at compile time; the report says DOES NOT FIT with the memory it asked for."""
    config = load_config("configs/stage2.py:tiny")
    report = aot.run(
        config, TOPOLOGY, sharding.parse_mesh("data=4"), batch=65536, programs=("train",), log=lambda *a, **k: None
    )
    train = report["programs"]["train"]
    assert not report["fits"] and not train["fits"] and train["memory"] is None
    asked = train["out_of_memory"]["requested_bytes"]
    assert asked > report["hbm_bytes"] > train["out_of_memory"]["available_bytes"] > 0.9 * report["hbm_bytes"]
    assert train["flops"]["analytic"] > 0  # the analytic count needs no compiled program
    text = aot_report.format_report(report)
    last = text.splitlines()[-1]
    assert last == report["verdict"] and last.startswith("DOES NOT FIT: train out of memory: asks for ")
    assert sharding.format_bytes(asked) in last and "v5e:2x2" in last
    assert "(out of memory)" in aot_report.markdown_table([report])
    json.dumps(report)
