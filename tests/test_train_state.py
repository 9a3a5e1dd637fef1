"""One train state, one train program (`qk_jax.train_state`): on a data=2, fsdp=2, tensor=2
mesh, where the stage-2 DiT's query and output kernels have the same shape and dtype but
are sharded differently, a resumed run's state has every leaf sharded exactly like a fresh
start's (the optimizer moments included), and the program `qk-jax aot` compiles is the
one training runs."""

from __future__ import annotations

import jax
import pytest

import kontext_util as ku
from qk_jax import checkpoint as ckpt_lib
from qk_jax import model_config, optim, sharding, train, train_state
from qk_jax.data.model_inputs import place_batch, prepare_batch
from qk_jax.models.kontext import QueryKontext
from qk_jax.tree import flatten_tree

MESH = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
# Two trainable kernels of one shape, (layers, embed, heads) and (layers, heads, embed).
Q_KERNEL = "dit/double_blocks/attn/txt_q/kernel"
OUT_KERNEL = "dit/double_blocks/attn/txt_out/kernel"


def _config(shapes_dir, *overrides):
    return ku.stage_config(2, shapes_dir, *MESH, "data.mixture={'t2i': 1.0}", *overrides)


def _state(config, workdir):
    """`train.build_state` for `workdir` (a fresh start when it holds no checkpoint)."""
    processor = train.ensure_processor(config, workdir)
    kcfg = model_config.build_kontext_config(config, model_config.read_special_token_ids(processor))
    mesh = sharding.make_mesh(config.mesh)
    checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints")
    with jax.set_mesh(mesh), sharding.activation_rules_context():
        state, _, step = train.build_state(
            QueryKontext(kcfg), config, mesh, optim.make_optimizer(config.train), checkpointer
        )
    checkpointer.close()
    return state, step


def _shardings(state):
    """{leaf path: (sharding, rank)} of a state."""
    return {jax.tree_util.keystr(p): (x.sharding, x.ndim) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def _same(a, b) -> bool:
    return a[1] == b[1] and a[0].is_equivalent_to(b[0], a[1])


@pytest.mark.slow
def test_a_resumed_state_is_sharded_like_a_fresh_start(devices, shapes_dir, tmp_path):
    """Two steps trained and checkpointed by `train.train`, then the workdir's state rebuilt
    by `train.build_state` (the resume path) against a fresh start's."""
    workdir = str(tmp_path / "run")
    train.train(_config(shapes_dir, "train.steps=2", "train.checkpoint_every=2"), workdir)
    fresh, start = _state(_config(shapes_dir), str(tmp_path / "fresh"))
    resumed, step = _state(_config(shapes_dir), workdir)
    assert (start, step) == (0, 2)

    # The premise: two trainable kernels share shape and dtype, not sharding.
    q, out = (flatten_tree(fresh["trainable"])[p] for p in (Q_KERNEL, OUT_KERNEL))
    assert q.shape == out.shape and q.dtype == out.dtype
    assert q.sharding.spec != out.sharding.spec, (q.sharding.spec, out.sharding.spec)
    # Adam's moments of the output kernel follow it, not the first kernel of its shape.
    mu = flatten_tree(optim.partition(resumed["opt_state"][1][0].mu, ["dit"])[0])  # chain: (clip, adamw)
    assert mu[OUT_KERNEL].sharding.spec == out.sharding.spec

    want, got = _shardings(fresh), _shardings(resumed)
    assert want.keys() == got.keys() and len(want) > 100
    wrong = {k: (want[k], got[k]) for k in want if not _same(want[k], got[k])}
    assert not wrong, list(wrong.items())[:5]
    # Both are the abstract state's shardings (what the jitted step takes and returns).
    cfg = _config(shapes_dir).train
    params = optim.combine(fresh["trainable"], fresh["frozen"])
    abstract = _shardings(train_state.abstract_state(params, cfg.trainable, optim.make_optimizer(cfg), True))
    assert abstract.keys() == want.keys() and all(_same(abstract[k], want[k]) for k in want)


def test_aot_compiles_the_program_training_runs(devices, shapes_dir, tmp_path):
    """The train step `qk-jax aot` lowers (abstract state and batch) and the one `train.py`
    builds and runs on the real state and a placed batch of the same shapes: the same text."""
    from qk_jax import aot

    config = _config(shapes_dir, "train.batch_size=8")
    workdir = str(tmp_path / "run")
    processor = train.ensure_processor(config, workdir)
    kcfg = model_config.build_kontext_config(config, model_config.read_special_token_ids(processor))
    model = QueryKontext(kcfg)
    mesh = sharding.make_mesh(config.mesh)
    tx = optim.make_optimizer(config.train)

    params = train_state.params_target(model, mesh, sharding.rules_from_config(config))
    batch_abs = aot.abstract_batch(kcfg, config.data, mesh, 8, 0)
    lowered_aot, _, _ = aot.lower_train(model, config, mesh, params, batch_abs)

    abstract = train_state.state_target(model, config, mesh, tx)
    checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints")
    with jax.set_mesh(mesh), sharding.activation_rules_context():
        state, _, _ = train.build_state(model, config, mesh, tx, checkpointer, abstract=abstract)
        batch = place_batch(prepare_batch(kcfg, aot.example_host_batch(kcfg, config.data, 8, 0)), mesh)
        step = train_state.jit_train_step(model, tx, config.train, train_state.state_shardings(abstract))
        lowered_train = step.lower(state, batch)
    checkpointer.close()
    text = lowered_train.as_text()
    assert "sdy.sharding" in text and "tf.aliasing_output" in text  # sharded, state donated
    assert text == lowered_aot.as_text()
