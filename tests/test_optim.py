"""Weight decay by parameter role (`optim.decays`) on the real parameter trees of the tiny
stages, whose layer stacks are scanned (every leaf of a stack, biases and norm scales too,
has a leading layer axis): kernels and LoRA factors decay; biases, norm scales and
embeddings do not, and an AdamW step with a zero gradient leaves them as they were."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qk_jax import model_config, optim, sharding, train_state
from qk_jax.config import load_config
from qk_jax.models.kontext import QueryKontext
from qk_jax.tree import flatten_tree

# Decayed leaves of each stage's trainable tree, counted from the tree (kernels of the
# stage-1 head / stage-2 DiT stacks and projections, LoRA factors a and b).
DECAYED = {1: 36, 2: 22, 3: 26}
# Looked up in the trees: (path, decays).
SPECIFIC = {
    1: [
        ("head/double_blocks/attn/txt_q/kernel", True),
        ("head/double_blocks/attn/txt_q/bias", False),  # (layers, heads): 2-D inside the scanned stack
        ("head/double_blocks/attn/img_q_norm/scale", False),  # (layers, head_dim)
        ("head/double_blocks/img_mod/bias", False),
        ("queries/embedding", False),  # the kontext queries (K, D)
        ("lora/vlm/language_model/layers/mlp/down_proj/kernel/a", True),
        ("lora/vlm/language_model/layers/mlp/down_proj/kernel/b", True),
    ],
    2: [
        ("dit/double_blocks/img_mlp/fc1/kernel", True),
        ("dit/double_blocks/img_mlp/fc1/bias", False),
        ("dit/double_blocks/attn/txt_k_norm/scale", False),
        ("connector/out_norm/scale", False),
        ("connector/fc1/kernel", True),
        ("dit/txt_norm/scale", False),
    ],
    3: [
        ("lora/dit/double_blocks/attn/img_k/kernel/a", True),
        ("lora/dit/double_blocks/attn/img_out/kernel/b", True),
        ("connector/fc2/bias", False),
        ("queries/embedding", False),
    ],
}


def _trees(stage):
    config = load_config(f"configs/stage{stage}.py:tiny")
    model = QueryKontext(model_config.build_kontext_config(config))
    params = train_state.params_target(model, sharding.make_mesh((1, 1, 1)))
    return config, params, optim.partition(params, config.train.trainable)[0]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_decay_mask_marks_kernels_only(devices, stage):
    config, params, trainable = _trees(stage)
    mask = flatten_tree(optim.decay_mask(trainable))
    shapes = flatten_tree(trainable)
    assert sum(mask.values()) == DECAYED[stage]
    for path, decays in SPECIFIC[stage]:
        assert mask[path] is decays, path
    if stage in (1, 2):  # stage 3 trains no stack but its LoRA factors
        # Inside the scanned stacks biases and scales are 2-D: their rank does not tell them from kernels.
        undecayed_2d = [p for p, d in mask.items() if not d and len(shapes[p].shape) >= 2]
        assert any("blocks" in p and p.endswith("/bias") for p in undecayed_2d), undecayed_2d
        assert any("blocks" in p and p.endswith("/scale") for p in undecayed_2d), undecayed_2d
    # Every parameter of the whole tree (frozen VLM, VAE, ...) has a role.
    whole = flatten_tree(optim.decay_mask(params))
    assert whole["vlm/language_model/embed_tokens/embedding"] is False


def test_an_unknown_leaf_name_is_refused():
    with pytest.raises(ValueError, match=r"'dit/pos_table'.*no weight-decay role"):
        optim.decay_mask({"dit": {"pos_table": jnp.zeros((4, 4))}})


def test_a_zero_gradient_step_shrinks_kernels_only(devices):
    config, _, trainable = _trees(1)
    cfg = config.train
    cfg.update(learning_rate=0.1, weight_decay=0.5, warmup_steps=0)
    ones = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), trainable)
    tx = optim.make_optimizer(cfg)

    @jax.jit
    def step(params):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        return jax.tree.map(lambda p, u: p + u, params, updates)

    new = flatten_tree(step(ones))
    for path in ("head/double_blocks/attn/txt_q/kernel", "lora/vlm/language_model/layers/mlp/down_proj/kernel/a"):
        np.testing.assert_allclose(np.asarray(new[path]), 1 - 0.1 * 0.5, rtol=1e-6, err_msg=path)  # p - lr * wd * p
    for path in ("head/double_blocks/attn/txt_q/bias", "head/double_blocks/attn/img_q_norm/scale", "queries/embedding"):
        np.testing.assert_array_equal(np.asarray(new[path]), 1.0, err_msg=path)
