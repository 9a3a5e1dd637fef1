"""Mesh construction, sharded init, sharded == unsharded steps, batch placement."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from qk_jax import sharding
from qk_jax.models.smoke_lm import SmokeLM
from qk_jax.smoke import make_train_step, synthetic_batch

MODEL = SmokeLM(vocab_size=64, embed_dim=32, num_heads=4, mlp_dim=64, num_layers=2)
TOKENS = jnp.zeros((8, 16), jnp.int32)


def init_fn(rng):
    return MODEL.init(rng, TOKENS)["params"]


def expected(mesh, *axes):
    """The spec the default (DIT) rules give: logical axes -> mesh axes of size > 1."""
    table = dict(sharding.DIT_RULES)
    out = []
    for a in axes:
        m = table.get(a)
        out.append(m if m is not None and mesh.shape[m] > 1 else None)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 2, 4)])
def test_sharded_init_follows_rules(devices, shape):
    mesh = sharding.make_mesh(shape)
    params, shardings, specs = sharding.init_sharded(init_fn, mesh, jax.random.key(0))
    blocks = params["blocks"]
    assert blocks["qkv"]["kernel"].sharding.spec == expected(mesh, "layers", "embed", "heads")
    assert blocks["down"]["kernel"].sharding.spec == expected(mesh, "layers", "mlp", "embed")
    assert params["embed"].sharding.spec == expected(mesh, "vocab", "embed")
    assert blocks["attn_norm"]["scale"].sharding.spec == P()
    # Each device holds only its shard: bytes per device shrink with the mapped axes.
    kernel = blocks["qkv"]["kernel"]
    shard = kernel.addressable_shards[0].data
    n_split = np.prod([mesh.shape[a] for a in ("fsdp", "tensor")])
    assert shard.size * n_split == kernel.size
    # Values equal an unsharded init with the same key.
    ref = jax.jit(init_fn)(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(nn_unbox(ref)["blocks"]["qkv"]["kernel"]))


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def test_sharded_step_equals_unsharded(devices):
    # SGD keeps the update linear in the gradient; Adam's g/sqrt(v) would amplify the
    # last-bit differences of a reordered reduction on near-zero gradients.
    tx = optax.sgd(0.1)
    step = make_train_step(MODEL, tx)
    batch = synthetic_batch(np.random.default_rng(0), 8, 16, 64)

    ref_params = nn_unbox(jax.jit(init_fn)(jax.random.key(1)))
    ref_state = tx.init(ref_params)
    ref_out = jax.jit(step)(ref_params, ref_state, jnp.asarray(batch))

    mesh = sharding.make_mesh((2, 4, 1))
    params, _, _ = sharding.init_sharded(init_fn, mesh, jax.random.key(1))
    state = jax.jit(tx.init)(params)
    with jax.set_mesh(mesh):
        out = jax.jit(step)(params, state, sharding.place_batch(batch, mesh))
    np.testing.assert_allclose(float(out[2]), float(ref_out[2]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(ref_out[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # Outputs stay sharded like the inputs (no silent gather).
    assert out[0]["blocks"]["qkv"]["kernel"].sharding.spec == params["blocks"]["qkv"]["kernel"].sharding.spec


def test_indivisible_parameter_names_path(devices):
    mesh = sharding.make_mesh((1, 1, 8))
    odd = SmokeLM(vocab_size=64, embed_dim=32, num_heads=4, mlp_dim=36, num_layers=1)
    with pytest.raises(ValueError, match=r"blocks/(gate|up|down)/kernel.*'mlp'.*36"):
        sharding.init_sharded(lambda r: odd.init(r, TOKENS)["params"], mesh, jax.random.key(0))


def test_mesh_from_config_rest_axis(devices):
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="mesh.data"):
        sharding.make_mesh({"data": 16, "fsdp": 1, "tensor": 1})
    with pytest.raises(ValueError, match="mesh.fsdp"):
        sharding.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})


def test_place_batch_splits_rows_and_reports_bad_sizes(devices):
    mesh = sharding.make_mesh((2, 4, 1))
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    placed = sharding.place_batch({"x": x, "s": np.float32(2.0)}, mesh)
    assert placed["x"].sharding.spec == P(("data", "fsdp"), None)
    assert len({tuple(s.index[0].indices(8)) for s in placed["x"].addressable_shards}) == 8
    np.testing.assert_array_equal(np.asarray(placed["x"]), x)
    with pytest.raises(ValueError, match="train.batch_size"):
        sharding.place_batch(np.zeros((6, 3)), mesh)


def test_sharding_table_lists_every_array(devices):
    mesh = sharding.make_mesh((2, 4, 1))
    params, _, _ = sharding.init_sharded(init_fn, mesh, jax.random.key(0))
    table = sharding.sharding_table(params)
    n = len(jax.tree.leaves(params))
    assert f"{n} arrays" in table
    assert "blocks/qkv/kernel" in table and "(2, 32, 96)" in table and "'fsdp'" in table


def test_lora_rank_takes_fsdp_only_where_free_and_divisible(devices):
    mesh = sharding.make_mesh((1, 4, 2))
    rules = sharding.DIT_RULES
    # a (embed, r): embed holds fsdp, so the rank stays whole.
    assert sharding.logical_to_mesh_spec(P("embed", "lora_rank"), rules, mesh, (64, 8)) == P("fsdp")
    # b (r, mlp): mlp goes to tensor; the weight's fsdp axis (embed) is missing, so the rank takes it.
    assert sharding.logical_to_mesh_spec(P("lora_rank", "mlp"), rules, mesh, (8, 64)) == P("fsdp", "tensor")
    # Stacked (layers, r, out) likewise, and a rank the axis does not divide is replicated, not an error.
    assert sharding.logical_to_mesh_spec(P("layers", "lora_rank", "mlp"), rules, mesh, (3, 8, 64)) == P(
        None, "fsdp", "tensor"
    )
    assert sharding.logical_to_mesh_spec(P("lora_rank", "mlp"), rules, mesh, (6, 64)) == P(None, "tensor")
    # Required axes still fail loudly.
    with pytest.raises(ValueError, match="not divisible"):
        sharding.logical_to_mesh_spec(P("embed", "lora_rank"), rules, mesh, (6, 8), where="dit/x/a")


def _dit_mlp_kernel(state):
    """A DiT MLP up-projection kernel (logical axes: embed, mlp) of the train state."""
    from qk_jax.convert.mapping import flatten_tree

    flat = flatten_tree(state["trainable"]["dit"])
    path = next(p for p in sorted(flat) if "img_mlp" in p and p.endswith("kernel") and "lora" not in p)
    return path, flat[path]


def test_config_rules_reach_the_train_state(devices, tmp_path):
    """`config.sharding.rules.dit` overrides the DiT's table: its MLP moved from `tensor` to
    `fsdp` (and its embedding replicated) changes the kernel's PartitionSpec in the state
    `train.build_state` makes; the default config gives today's rules."""
    from qk_jax import checkpoint as ckpt_lib
    from qk_jax import model_config, optim, train
    from qk_jax.config import load_config
    from qk_jax.models.kontext import QueryKontext

    def state_for(overrides):
        config = load_config("configs/stage2.py:tiny", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *overrides])
        assert sharding.rules_from_config(config)["vlm"] == sharding.VLM_RULES
        kcfg = model_config.build_kontext_config(config)
        mesh = sharding.make_mesh(config.mesh)
        checkpointer = ckpt_lib.Checkpointer(str(tmp_path / f"ck{len(overrides)}"))
        with jax.set_mesh(mesh), sharding.activation_rules_context():
            state, _, _ = train.build_state(
                QueryKontext(kcfg), config, mesh, optim.make_optimizer(config.train), checkpointer
            )
        return state

    path, kernel = _dit_mlp_kernel(state_for([]))
    assert kernel.sharding.spec == P(None, "fsdp", "tensor"), path  # (layers, embed, mlp)
    moved = [[a, "fsdp" if a == "mlp" else None if a == "embed" else m] for a, m in sharding.DIT_RULES]
    _, kernel = _dit_mlp_kernel(state_for([f"sharding.rules.dit={moved!r}"]))
    assert kernel.sharding.spec == P(None, None, "fsdp"), path


def test_config_rules_are_checked():
    cfg = {"sharding": {"rules": {"ditt": []}}}
    with pytest.raises(ValueError, match="sharding.rules.ditt: unknown sub-model"):
        sharding.rules_from_config(cfg)
    with pytest.raises(ValueError, match=r"sharding.rules.dit: logical axis 'mlp' names mesh axes \['model'\]"):
        sharding.rules_from_config({"sharding": {"rules": {"dit": [["mlp", "model"]]}}})
    assert sharding.rules_from_config({}) == sharding.RULES_BY_SUBMODEL  # a config saved before the field
