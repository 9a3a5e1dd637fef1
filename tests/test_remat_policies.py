"""Remat policies by `checkpoint_name`: the named attention projections are what
"save_attn_proj" keeps (MMDiT and VLM decoder blocks), the policy reaches the scanned
model from the config, and gradients equal those without remat."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qk_jax import config as config_lib
from qk_jax import model_config
from qk_jax.models import layers
from qk_jax.models.mmdit import MMDiT, init_params, mmdit_config
from qk_jax.models.mmdit.blocks import DoubleStreamBlock
from qk_jax.models.mmdit.model import dummy_inputs
from qk_jax.models.qwen2_5_vl.config import get_config
from qk_jax.models.qwen2_5_vl.text import DecoderLayer

PROJECTIONS = {"attn_q", "attn_k", "attn_v", "attn_out"}


def saved(fn, *args, capsys) -> list[str]:
    """The lines of `jax.ad_checkpoint.print_saved_residuals` (one per saved residual)."""
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
    return capsys.readouterr().out.splitlines()


def names(lines: list[str]) -> set[str]:
    return {m.group(1) for line in lines if (m := re.search(r"named '(\w+)'", line))}


def residual_bytes(lines: list[str]) -> int:
    sizes = (re.match(r"f32\[([\d,]*)\]", line) for line in lines)
    return sum(4 * int(np.prod([int(d) for d in m.group(1).split(",") if d])) for m in sizes if m)


def test_save_attn_proj_keeps_the_named_projections(capsys):
    cfg = mmdit_config("tiny")
    b, n, t, d = 2, 6, 3, cfg.inner_dim
    ctx = dict(vec=jnp.ones((b, d)), cos=jnp.ones((b, n + t, cfg.head_dim // 2)), sin=jnp.zeros((b, n + t, 8)))
    carry = (jnp.ones((b, n, d)), jnp.ones((b, t, d)))
    for remat, expect in (("save_attn_proj", PROJECTIONS), ("full", set())):
        block = nn.remat(DoubleStreamBlock, policy=layers.remat_policy(remat))(cfg)
        p = block.init(jax.random.key(0), carry, ctx)
        lines = saved(lambda p: jnp.sum(block.apply(p, carry, ctx)[0][0]), p, capsys=capsys)
        assert names(lines) == expect, (remat, lines)
    # Without remat the MLP's hidden activation is among the saved values (it is what the policy drops).
    block = DoubleStreamBlock(cfg)
    p = block.init(jax.random.key(0), carry, ctx)
    assert layers.MLP_HIDDEN_NAME in names(saved(lambda p: jnp.sum(block.apply(p, carry, ctx)[0][0]), p, capsys=capsys))

    vcfg = get_config("tiny").text
    x = jnp.ones((2, 5, vcfg.hidden_size))
    cos = jnp.ones((2, 5, vcfg.head_dim))
    mask = jnp.ones((2, 1, 5, 5), bool)
    layer = nn.remat(DecoderLayer, policy=layers.remat_policy("save_attn_proj"))(vcfg)
    p = layer.init(jax.random.key(0), x, cos, cos, mask, None, None, None)
    lines = saved(lambda p: jnp.sum(layer.apply(p, x, cos, cos, mask, None, None, None)[0]), p, capsys=capsys)
    assert names(lines) == PROJECTIONS, lines


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["save_attn_proj", "offload_attn_proj"])
def test_scanned_model_gradients_equal_no_remat(remat, capsys):
    """Through `model.remat` in a config: the scanned MMDiT keeps less on device than without
    remat, with the same gradients."""
    config = config_lib.load_config("configs/stage2.py:tiny", [f"model.remat={remat}"])
    kcfg = model_config.build_kontext_config(config)
    assert kcfg.generator.remat == remat and kcfg.vlm.remat == remat
    cfg = mmdit_config("tiny", num_layers=1, num_single_layers=1)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(1)))
    x = dummy_inputs(cfg, batch=2, n=8, t=4)

    def loss(r):
        return lambda p: jnp.sum(MMDiT(cfg.replace(remat=r)).apply({"params": p}, **x) ** 2)

    size = {r: residual_bytes(saved(loss(r), params, capsys=capsys)) for r in ("none", remat, "full")}
    if remat == "save_attn_proj":
        assert size["none"] > size[remat] > size["full"], size
    else:  # the projections go to host memory: the device keeps no more than full remat's
        assert size[remat] <= size["full"] < size["none"], size
    g0, g1 = jax.jit(jax.grad(loss("none")))(params), jax.jit(jax.grad(loss(remat)))(params)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
