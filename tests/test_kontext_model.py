"""Query-Kontext: trainable sets per stage, overfitting one batch in every stage, sharded ==
unsharded train step, and the analytic FLOP count against XLA's."""

import jax
import numpy as np
import optax
import pytest

import kontext_util as ku
from qk_jax import flops, optim, sharding
from qk_jax.data.model_inputs import condition_index, place_batch
from qk_jax.models.kontext import QueryKontext
from qk_jax.train_state import init_state
from qk_jax.train_step import make_loss_fn, make_train_step

EXPECTED_TRAINABLE = {
    1: ({"queries", "connector", "head", "lora/vlm"}, {"vlm"}),
    2: ({"queries", "connector", "dit"}, {"vlm"}),
    3: ({"queries", "connector", "lora/dit"}, {"vlm", "dit"}),
}


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return ku.processor_dir(tmp_path_factory)


def top_keys(tree):
    out = set()
    for k, v in tree.items():
        if k == "lora":
            out |= {f"lora/{kk}" for kk in v}
        else:
            out.add(k)
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainable_sets_and_no_frozen_optimizer_state(stage, shapes_dir, proc):
    config = ku.stage_config(stage, shapes_dir)
    model = QueryKontext(ku.model_config(config, proc))
    abstract, _ = sharding.abstract_init(model.init, jax.random.key(0))
    trainable, frozen = optim.partition(abstract, config.train.trainable)
    want_train, want_frozen = EXPECTED_TRAINABLE[stage]
    assert top_keys(trainable) == want_train
    assert top_keys(frozen) == want_frozen
    tx = optim.make_optimizer(config.train)
    opt = jax.eval_shape(tx.init, trainable)
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    n_opt = sum(x.size for x in jax.tree.leaves(opt) if x.ndim)
    assert n_opt == 2 * n_train  # Adam's two moments of the trainable parameters, nothing of the frozen ones
    with pytest.raises(ValueError, match="selects no parameter"):
        optim.partition(abstract, ["queries", "lora/vmm"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage,mixture,lr,steps",
    [
        (1, {"reconstruction": 1.0}, 1e-2, 60),
        (2, {"t2i": 1.0}, 1e-2, 70),
        (3, {"edit": 1.0}, 1e-2, 150),
    ],
)
def test_overfitting_one_batch_lowers_the_loss_tenfold(stage, mixture, lr, steps, shapes_dir, proc):
    config = ku.stage_config(stage, shapes_dir)
    kcfg = ku.model_config(config, proc)
    model = QueryKontext(kcfg)
    params = jax.jit(lambda r: sharding.unbox_abstract(model.init(r)))(jax.random.key(0))
    trainable, frozen = optim.partition(params, config.train.trainable)
    batch = ku.prepared(kcfg, ku.first_batch(config, proc, mixture))
    loss_fn = make_loss_fn(model)
    tx = optax.adam(lr)
    rng = jax.random.key(1)  # the same noise, timesteps and dropout every step: a fixed target

    @jax.jit
    def step(trainable, opt_state):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    opt_state = tx.init(trainable)
    losses = []
    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[-1] * 10 <= losses[0], (stage, losses[0], losses[-1])


def test_sharded_train_step_equals_unsharded(shapes_dir, proc):
    config = ku.stage_config(1, shapes_dir, "train.ema_decay=0.9")
    kcfg = ku.model_config(config, proc)
    model = QueryKontext(kcfg)
    batch = ku.prepared(kcfg, ku.first_batch(config, proc, {"reconstruction": 1.0}))
    tx = optax.sgd(0.5)  # linear in the gradient (see test_sharding)
    step = make_train_step(model, tx, seed=0, ema_decay=0.9)
    out = {}
    for name, shape in (("single", (1, 1, 1)), ("sharded", (2, 4, 1))):
        mesh = sharding.make_mesh(shape)
        with jax.set_mesh(mesh), sharding.activation_rules_context():
            params, _, _ = sharding.init_sharded(model.init, mesh, jax.random.key(0))
            state = init_state(params, config.train.trainable, tx, ema=True)
            new_state, metrics = jax.jit(step)(state, place_batch(batch, mesh))
        out[name] = jax.device_get((new_state["trainable"], new_state["ema"], metrics))
        if name == "sharded":
            kernel = new_state["trainable"]["head"]["double_blocks"]["attn"]["img_q"]["kernel"]
            assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    (t1, e1, m1), (t2, e2, m2) = out["single"], out["sharded"]
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-6 * abs(float(m1["loss"]))
    for a, b in zip(jax.tree.leaves((t1, e1)), jax.tree.leaves((t2, e2))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _sgd_setup(stage, mixture, shapes_dir, proc, *overrides):
    """(config, model config, model, first prepared batch, SGD, train state) of a stage."""
    config = ku.stage_config(stage, shapes_dir, *overrides)
    kcfg = ku.model_config(config, proc)
    model = QueryKontext(kcfg)
    batch = ku.prepared(kcfg, ku.first_batch(config, proc, mixture))
    params = jax.jit(lambda r: sharding.unbox_abstract(model.init(r)))(jax.random.key(0))
    tx = optax.sgd(0.1)
    return config, kcfg, model, batch, tx, init_state(params, config.train.trainable, tx, ema=False)


@pytest.mark.parametrize("stage,mixture", [(1, {"reconstruction": 1.0}), (2, {"t2i": 1.0}), (3, {"edit": 1.0})])
def test_flop_count_matches_the_traced_train_step(stage, mixture, shapes_dir, proc):
    """The analytic count equals the matmuls of the traced train step (scans multiplied by
    their length): stage 1 with the unmerged VLM LoRA, stage 3 with the DiT LoRA and the
    low-level image segment."""
    config, kcfg, model, batch, tx, state = _sgd_setup(stage, mixture, shapes_dir, proc)
    traced = flops.traced_matmul_flops(make_train_step(model, tx, seed=0), state, batch)
    ours = flops.kontext_train_step_flops(kcfg, batch, config.train.trainable, state["trainable"].get("lora"))
    assert abs(ours["total"] / traced - 1) < 0.01, (ours["total"], traced)
    assert set(ours["parts"]) >= {"llm", "connector", "vae", kcfg.generator_key}


@pytest.mark.parametrize("stage,mixture", [(2, {"t2i": 1.0})])
def test_flop_count_matches_xla_cost_analysis(stage, mixture, shapes_dir, proc):
    """With one layer per stack (XLA's cost analysis counts a scanned body once), the
    analytic train-step FLOPs agree with XLA's count of the compiled step (XLA also counts
    element-wise work, and removes the unused text stream of a last double block)."""
    depth1 = [
        "model.generator.overrides={'in_channels': 48, 'out_channels': 12, 'joint_attention_dim': 32, "
        "'num_layers': 1, 'num_heads': 8, 'head_dim': 32, 'axes_dims_rope': (8, 12, 12)}",
        "model.connector.hidden_dim=512",
    ]
    config, kcfg, model, batch, tx, state = _sgd_setup(stage, mixture, shapes_dir, proc, *depth1)
    xla = flops.xla_flops_per_device(jax.jit(make_train_step(model, tx, seed=0)).lower(state, batch).compile())
    ours = flops.kontext_train_step_flops(kcfg, batch, config.train.trainable, state["trainable"].get("lora"))["total"]
    assert 0.85 <= ours / xla <= 1.05, (ours, xla, ours / xla)


def test_condition_index_packs_each_rows_prompt_then_its_queries():
    # left padding, 2 queries; row 0 has 3 real tokens, row 1 five; both skip a 1-token prefix
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    index = condition_index(mask, 2, prompt_start=np.array([3, 1]))
    # prompt (T = 5) then queries at 5, 6; W = 5 - 1 = 4, so 6 columns; -1 = padding
    assert index.tolist() == [[3, 4, 5, 6, -1, -1], [1, 2, 3, 4, 5, 6]]
    assert condition_index(mask, 1).tolist() == [[2, 3, 4, 5, -1, -1], [0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="same template prefix"):
        condition_index(mask, 2, prompt_start=np.array([3, 2]))


def test_the_dit_sees_the_same_condition_whatever_the_padding(shapes_dir, proc):
    # The same edit records padded to max_text_len (one text bucket) and to their bucket's
    # shorter length: the VLM input and the DiT's condition stream are shorter, the velocity
    # is the same (padding and the shared template prefix never reach the DiT).
    from qk_jax.data import builders, pipeline, records, vlm_inputs

    config = ku.stage_config(3, shapes_dir)
    kcfg = ku.model_config(config, proc)
    model = QueryKontext(kcfg)
    processor = vlm_inputs.load_processor(proc)
    source = builders.load_source(shapes_dir, builders.SHAPES_NAME, "edit", "train")
    recs = [records.normalize(source[i]) for i in range(3)]
    batches = {}
    for buckets in (1, 3):
        config.data.text_buckets = buckets
        batches[buckets] = ku.prepared(kcfg, pipeline.collate_records(recs, config.data, processor))
    full, packed = batches[1], batches[3]
    prefix = len(vlm_inputs.template_prefix(processor))
    assert full["input_ids"].shape[1] == config.data.max_text_len > packed["input_ids"].shape[1]
    for b in (full, packed):
        assert b["cond_index"].shape[1] == b["input_ids"].shape[1] - prefix + kcfg.num_queries
    params = jax.jit(lambda r: sharding.unbox_abstract(model.init(r)))(jax.random.key(0))
    out = []
    for b in (full, packed):
        cond, mask, _ = model.condition(params, b)
        x0 = model.encode(params, b["target"])
        t = jax.numpy.full((x0.shape[0],), 0.7)
        xt = 0.3 * x0 + 0.7 * jax.random.normal(jax.random.key(1), x0.shape)
        tokens = model.encode_conditions(params, b["cond_images"])
        out.append(np.asarray(model.velocity(params, xt, tokens, b["img_ids"], cond, mask, t)))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5)
    # data.drop_template_prefix=False: the stream starts at each row's first token
    config.data.drop_template_prefix = False
    whole = ku.prepared(kcfg, pipeline.collate_records(recs, config.data, processor))
    first = np.argmax(whole["attention_mask"] > 0, axis=1)
    assert whole["cond_index"].shape[1] == whole["input_ids"].shape[1] + kcfg.num_queries
    assert (whole["cond_index"][:, 0] == first).all()
