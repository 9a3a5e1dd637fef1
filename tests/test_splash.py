"""The splash (Pallas TPU) attention backend against the XLA path, run in Pallas interpret
mode on CPU: the MMDiT's joint attention over padded text (also sharded over a mesh), the
VLM decoder's causal attention over left-padded rows, and the config switch reaching the model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qk_jax import config as config_lib
from qk_jax import model_config, sharding
from qk_jax.models import layers
from qk_jax.models import splash as splash_mod
from qk_jax.models.mmdit import MMDiT, init_params, mmdit_config
from qk_jax.models.mmdit import positions as pos
from qk_jax.models.mmdit.model import dummy_inputs
from qk_jax.models.qwen2_5_vl import Qwen25VL
from qk_jax.models.qwen2_5_vl.config import get_config
from qk_jax.models.qwen2_5_vl.model import init_params as vlm_init


@pytest.mark.slow  # Pallas interpret mode
def test_kernel_matches_xla_with_padding_gqa_and_gradients():
    """Lengths off the 128 block (padded inside), GQA, key padding and causal segments."""
    k = jax.random.split(jax.random.key(0), 3)
    b, t, h, kvh, d = 2, 70, 4, 2, 16
    q = jax.random.normal(k[0], (b, t, h, d))
    kk, v = (jax.random.normal(r, (b, t, kvh, d)) for r in k[1:])
    valid = jnp.arange(t)[None] < jnp.array([[50], [70]])
    pad = layers.SegmentMask.key_padding(valid)
    ids = (jnp.arange(t)[None] >= jnp.array([[20], [0]])).astype(jnp.int32)  # left padding
    causal = layers.SegmentMask(ids, ids, causal=True)
    for mask, rows in ((pad, np.ones((b, t), bool)), (causal, np.asarray(ids, bool))):
        ours = layers.dot_product_attention(q, kk, v, mask, impl="splash")
        ref = layers.dot_product_attention(q, kk, v, mask, impl="xla")
        assert ours.shape == ref.shape == (b, t, h, d)
        np.testing.assert_allclose(np.asarray(ours)[rows], np.asarray(ref)[rows], atol=1e-5)
    loss = lambda impl: lambda q: jnp.sum(layers.dot_product_attention(q, kk, v, pad, impl=impl) ** 2)  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss("splash"))(q), jax.grad(loss("xla"))(q), atol=1e-5)


@pytest.mark.slow  # Pallas interpret mode
def test_mmdit_joint_attention_padded_text_sharded(devices):
    """The MMDiT forward with padded condition tokens: splash == XLA, unsharded and on a
    (data 4, tensor 2) mesh (the kernel then runs per shard inside a shard_map)."""
    cfg = mmdit_config("tiny", num_layers=1, num_single_layers=1, num_heads=4, head_dim=16, axes_dims_rope=(4, 6, 6))
    params = nn.meta.unbox(init_params(cfg, jax.random.key(1)))
    rng = np.random.default_rng(0)
    b, n, tl = 4, 12, 9
    img = rng.standard_normal((b, n, cfg.in_channels)).astype(np.float32)
    txt = rng.standard_normal((b, tl, cfg.joint_attention_dim)).astype(np.float32)
    mask = np.ones((b, tl), bool)
    mask[1, 4:] = False
    mask[3, 7:] = False
    ts = rng.uniform(size=b).astype(np.float32)
    ids = pos.batch_ids(pos.segment_ids([(3, 4)]), b)

    def fwd(c):
        return jax.jit(lambda p: MMDiT(c).apply({"params": p}, img, ids, txt, mask, ts))

    ref = np.asarray(fwd(cfg)(params))
    ours = np.asarray(fwd(cfg.replace(attention_impl="splash"))(params))
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    mesh = sharding.make_mesh((4, 1, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.activation_rules()):
        sharded = np.asarray(fwd(cfg.replace(attention_impl="splash"))(params))
    np.testing.assert_allclose(sharded, ref, atol=1e-5)


@pytest.mark.slow  # Pallas interpret mode
def test_vlm_decoder_causal_left_padded():
    """The VLM decoder over left-padded rows: splash (causal + segment ids) == XLA on real tokens."""
    cfg = get_config("tiny")
    params = nn.meta.unbox(vlm_init(Qwen25VL(cfg), jax.random.key(2)))
    b, t = 2, 40
    embeds = np.random.default_rng(1).standard_normal((b, t, cfg.text.hidden_size)).astype(np.float32)
    am = np.ones((b, t), np.int32)
    am[0, :11] = 0
    position_ids = np.broadcast_to(np.maximum(np.cumsum(am, axis=1) - 1, 0)[None], (3, b, t))

    def decode(c):
        return np.asarray(Qwen25VL(c).apply({"params": params}, embeds, position_ids, am, method="decode"))

    ref, ours = decode(cfg), decode(cfg.replace(attention_impl="splash"))
    np.testing.assert_allclose(ours[am > 0], ref[am > 0], atol=1e-5)


def test_config_switch_reaches_the_kernel(monkeypatch):
    """`model.attention_impl=splash` reaches both sub-models, and the DiT forward calls the kernel."""
    config = config_lib.load_config("configs/stage2.py:tiny", ["model.attention_impl=splash"])
    kcfg = model_config.build_kontext_config(config)
    assert kcfg.generator.attention_impl == "splash" and kcfg.vlm.attention_impl == "splash"
    calls = []
    real = splash_mod.splash_attention
    monkeypatch.setattr(splash_mod, "splash_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    dit = kcfg.generator.replace(num_layers=1, num_single_layers=0)
    jax.eval_shape(lambda: MMDiT(dit).init(jax.random.key(0), **dummy_inputs(dit)))
    assert calls and not calls[0]["causal"]


@pytest.mark.slow  # a libtpu compile
def test_compiles_for_a_v5p_topology_as_a_mosaic_kernel():
    """The MMDiT's gradient with splash attention, compiled ahead of time for v5p:2x2x1 on a
    (data 2, fsdp 2) mesh: the program holds the Mosaic (Pallas TPU) kernel, not interpret mode."""
    from qk_jax import aot

    mesh, kind = aot.topology_mesh("v5p:2x2x1", sharding.parse_mesh("data=2,fsdp=2"))
    cfg = mmdit_config("tiny", num_layers=1, num_single_layers=0, attention_impl="splash")
    params = jax.eval_shape(lambda: nn.meta.unbox(init_params(cfg, jax.random.key(0))))
    x = jax.eval_shape(lambda: dummy_inputs(cfg, batch=4, n=16, t=8))
    loss = lambda p, x: jnp.sum(MMDiT(cfg).apply({"params": p}, **x) ** 2)  # noqa: E731
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.activation_rules()):
        compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    assert "TPU v5" in kind
    assert "tpu_custom_call" in compiled.as_text()
