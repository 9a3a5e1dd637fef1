"""LoRA as a tree transform: selection, zero-init no-op, merge == unmerged, stacked kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qk_jax.models.lora import apply_lora, init_lora, lora_collection, merge_lora, select_kernels
from qk_jax.models.qwen2_5_vl import Qwen25VL, dummy_inputs, get_config, init_params


@pytest.fixture(scope="module")
def vlm():
    cfg = get_config("tiny")
    model = Qwen25VL(cfg)
    params = nn.meta.unbox(init_params(model, jax.random.key(0)))
    return model, params, dummy_inputs(cfg)


def forward(model, params, inputs, lora=None, scale=1.0):
    variables = {"params": params}
    if lora is not None:  # unmerged: the factors as the `lora` collection that layers.Dense reads
        variables["lora"] = lora_collection(lora, scale)
    return model.apply(variables, **inputs)["logits"]


def test_select_kernels_and_typos(vlm):
    _, params, _ = vlm
    paths = select_kernels(params, [r"language_model/layers/(self_attn|mlp)/"])
    assert "language_model/layers/self_attn/q_proj/kernel" in paths and len(paths) == 7
    assert all(p.endswith("/kernel") for p in paths)
    with pytest.raises(ValueError, match="q_porj"):
        select_kernels(params, [r"q_porj"])


def test_zero_init_is_a_no_op_and_merge_equals_unmerged(vlm):
    model, params, inputs = vlm
    lora = init_lora(jax.random.key(1), params, [r"language_model/layers/(self_attn|mlp)/"], rank=4)
    a = lora["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]["a"]
    assert a.shape == (2, 64, 4)  # stacked over the scanned layers
    tree = {**params, "lora": lora}
    base = forward(model, params, inputs)
    np.testing.assert_array_equal(np.asarray(forward(model, apply_lora(tree, 2.0), inputs)), np.asarray(base))
    # Train-like perturbation of b, then merging must equal the unmerged forward.
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), lora)
    tree = {**params, "lora": lora}
    unmerged = forward(model, params, inputs, lora, 2.0)
    applied = forward(model, apply_lora(tree, 2.0), inputs)
    merged_params, merged_paths = merge_lora(tree, 2.0)
    assert "lora" not in merged_params and len(merged_paths) == 7
    merged = forward(model, merged_params, inputs)
    assert float(jnp.max(jnp.abs(unmerged - base))) > 1e-3  # the adapters do something
    for other in (merged, applied):
        rel = float(jnp.max(jnp.abs(other - unmerged)) / jnp.max(jnp.abs(unmerged)))
        assert rel <= 1e-6, rel


def test_merge_only_one_submodel_keeps_the_other():
    w = {"vlm": {"k": {"kernel": jnp.ones((3, 2))}}, "dit": {"k": {"kernel": jnp.ones((3, 2))}}}
    lora = {
        "vlm": {"k": {"kernel": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 2))}}},
        "dit": {"k": {"kernel": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 2))}}},
    }
    merged, paths = merge_lora({**w, "lora": lora}, {"vlm": 0.5, "dit": 2.0}, only="vlm")
    assert paths == ["vlm/k/kernel"] and set(merged["lora"]) == {"dit"}
    np.testing.assert_allclose(np.asarray(merged["vlm"]["k"]["kernel"]), 1.5)
    np.testing.assert_allclose(np.asarray(merged["dit"]["k"]["kernel"]), 1.0)
    full = apply_lora({**w, "lora": lora}, {"vlm": 0.5, "dit": 2.0})
    np.testing.assert_allclose(np.asarray(full["dit"]["k"]["kernel"]), 3.0)
