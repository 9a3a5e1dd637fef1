"""MMDiT against diffusers' QwenImageTransformer2DModel / FluxTransformer2DModel (tiny, float32),
plus configs, sizes, packing, position ids, remat and sharding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, QwenImagePipeline, QwenImageTransformer2DModel

from dit_testing import FLUX_TINY, QWEN_TINY, rel_err, save_tiny, t
from qk_jax import sharding
from qk_jax.convert import flux, qwen_image
from qk_jax.convert.diffusers_configs import from_diffusers, to_diffusers
from qk_jax.models.mmdit import MMDiT, MMDiTConfig, init_params, mmdit_config, param_count
from qk_jax.models.mmdit import positions as pos
from qk_jax.models.mmdit.blocks import depthwise_grid_conv
from qk_jax.models.mmdit.cell_conv import GridCellConvs, cells_to_tokens, tokens_to_cells

TOL = 1e-4


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_transformer")
    model = save_tiny(QwenImageTransformer2DModel, path, QWEN_TINY)
    config, params = qwen_image.load(path)
    return model, config, params


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux_transformer")
    model = save_tiny(FluxTransformer2DModel, path, FLUX_TINY)
    config, params = flux.load(path)
    return model, config, params


def _inputs(config, batch, n, txt_len, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((batch, n, config.in_channels)).astype(np.float32)
    txt = rng.standard_normal((batch, txt_len, config.joint_attention_dim)).astype(np.float32)
    mask = np.ones((batch, txt_len), bool)
    mask[1, txt_len - 3 :] = False
    return img, txt, mask, np.array([0.85, 0.3], np.float32)[:batch]


@pytest.mark.slow  # parity against diffusers
def test_qwen_padded_text_mask_default_ids(qwen):
    model, config, params = qwen
    img, txt, mask, ts = _inputs(config, 2, 5 * 6, 9)
    with torch.no_grad():
        ref = model(
            hidden_states=t(img),
            encoder_hidden_states=t(txt),
            encoder_hidden_states_mask=t(mask),
            timestep=t(ts),
            img_shapes=[[(1, 5, 6)]] * 2,
        ).sample.numpy()
    img_ids, _ = pos.qwen_image_ids([(1, 5, 6)], 9)
    fwd = jax.jit(lambda p, x, txt: MMDiT(config).apply({"params": p}, x, pos.batch_ids(img_ids, 2), txt, mask, ts))
    out = fwd(params, img, txt)  # txt_ids=None: the default diagonal must equal diffusers' text positions
    assert rel_err(out, ref) < TOL
    # padded text tokens are invisible to the image stream
    txt2 = txt.copy()
    txt2[1, -3:] = 100.0
    np.testing.assert_allclose(np.asarray(fwd(params, img, txt2)), np.asarray(out), rtol=0, atol=1e-5)


@pytest.mark.slow  # parity against diffusers
def test_qwen_edit_two_condition_segments(qwen):
    """Qwen-Image-Edit layout: target + 2 condition images, each its own frame index; output = target."""
    model, config, params = qwen
    shapes = [(1, 4, 6), (1, 2, 4), (1, 4, 4)]
    n = sum(f * h * w for f, h, w in shapes)
    img, txt, mask, ts = _inputs(config, 2, n, 7, seed=1)
    with torch.no_grad():
        ref = model(
            hidden_states=t(img),
            encoder_hidden_states=t(txt),
            encoder_hidden_states_mask=t(mask),
            timestep=t(ts),
            img_shapes=[shapes] * 2,
        ).sample.numpy()
    img_ids, txt_ids = pos.qwen_image_ids(shapes, 7)
    np.testing.assert_array_equal(img_ids, pos.segment_ids([(4, 6), (2, 4), (4, 4)], scheme="frame", centred=True))
    out = MMDiT(config).apply(
        {"params": params},
        img,
        pos.batch_ids(img_ids, 2),
        txt,
        mask,
        ts,
        txt_ids=pos.batch_ids(txt_ids, 2),
        num_target_tokens=24,
    )
    assert out.shape == (2, 24, config.out_features)
    assert rel_err(out, ref[:, :24]) < TOL


@pytest.mark.slow  # parity against diffusers
def test_qwen_zero_cond_t(tmp_path):
    """Qwen-Image-Edit-2511's zero_cond_t: condition segments modulated with t = 0."""
    model = save_tiny(QwenImageTransformer2DModel, tmp_path, dict(QWEN_TINY, zero_cond_t=True), seed=3)
    config, params = qwen_image.load(tmp_path)
    assert config.zero_cond_t
    shapes = [(1, 4, 4), (1, 4, 2)]
    img, txt, mask, ts = _inputs(config, 2, 24, 6, seed=2)
    with torch.no_grad():
        ref = model(
            hidden_states=t(img),
            encoder_hidden_states=t(txt),
            encoder_hidden_states_mask=t(mask),
            timestep=t(ts),
            img_shapes=[shapes] * 2,
        ).sample.numpy()
    img_ids, txt_ids = pos.qwen_image_ids(shapes, 6)
    out = MMDiT(config).apply(
        {"params": params},
        img,
        pos.batch_ids(img_ids, 2),
        txt,
        mask,
        ts,
        txt_ids=pos.batch_ids(txt_ids, 2),
        num_target_tokens=16,
    )
    assert rel_err(out, ref[:, :16]) < TOL


@pytest.mark.slow  # parity against diffusers
def test_flux_kontext_segments_padded_mask(flux_model):
    """FLUX.1-Kontext layout (context image i at frame i) with a padded text mask, vs FluxTransformer2DModel
    given the concatenated ids and the same key mask."""
    model, config, params = flux_model
    segs = [(4, 6), (2, 4), (4, 4)]
    img, txt, mask, ts = _inputs(config, 2, 24 + 8 + 16, 7, seed=4)
    pooled = np.random.default_rng(5).standard_normal((2, 8)).astype(np.float32)
    guidance = np.array([3.5, 1.5], np.float32)
    img_ids, txt_ids = pos.flux_ids(segs, 7)
    keys = np.concatenate([mask, np.ones((2, 48), bool)], 1)[:, None, None, :]
    with torch.no_grad():
        ref = model(
            hidden_states=t(img),
            encoder_hidden_states=t(txt),
            pooled_projections=t(pooled),
            timestep=t(ts),
            img_ids=t(img_ids),
            txt_ids=t(txt_ids),
            guidance=t(guidance),
            joint_attention_kwargs={"attention_mask": t(keys)},
        ).sample.numpy()
    out = MMDiT(config).apply(
        {"params": params},
        img,
        pos.batch_ids(img_ids, 2),
        txt,
        mask,
        ts,
        guidance=guidance,
        pooled=pooled,
        num_target_tokens=24,
    )  # txt_ids=None: FLUX default zeros
    assert rel_err(out, ref[:, :24]) < TOL
    out_all, inter = MMDiT(config).apply(
        {"params": params},
        img,
        pos.batch_ids(img_ids, 2),
        txt,
        mask,
        ts,
        guidance=guidance,
        pooled=pooled,
        return_intermediates=True,
    )
    assert rel_err(out_all, ref) < TOL
    assert inter["single"].shape == (config.num_single_layers, 2, 7 + 48, config.inner_dim)


@pytest.mark.slow  # parity against diffusers
def test_flux_no_mask(flux_model):
    model, config, params = flux_model
    img, txt, _, ts = _inputs(config, 2, 12, 5, seed=6)
    pooled = np.zeros((2, 8), np.float32)
    img_ids, txt_ids = pos.flux_ids([(3, 4)], 5)
    with torch.no_grad():
        ref = model(
            hidden_states=t(img),
            encoder_hidden_states=t(txt),
            pooled_projections=t(pooled),
            timestep=t(ts),
            img_ids=t(img_ids),
            txt_ids=t(txt_ids),
            guidance=t(np.full(2, 4.0, np.float32)),
        ).sample.numpy()
    out = MMDiT(config).apply(
        {"params": params},
        img,
        pos.batch_ids(img_ids, 2),
        txt,
        None,
        ts,
        guidance=np.full(2, 4.0, np.float32),
        pooled=pooled,
    )
    assert rel_err(out, ref) < TOL


def test_patchify_matches_diffusers_packing():
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, 6, 8, 5)).astype(np.float32)  # NHWC
    nchw = t(np.transpose(lat, (0, 3, 1, 2)).copy())
    ref = FluxPipeline._pack_latents(nchw, 2, 5, 6, 8).numpy()
    np.testing.assert_array_equal(np.asarray(pos.patchify(jnp.asarray(lat))), ref)
    ref_q = QwenImagePipeline._pack_latents(nchw, 2, 5, 6, 8).numpy()
    np.testing.assert_array_equal(np.asarray(pos.patchify(jnp.asarray(lat))), ref_q)
    np.testing.assert_array_equal(np.asarray(pos.unpatchify(pos.patchify(jnp.asarray(lat)), 6, 8)), lat)
    # FLUX's unpack (pixel sizes with vae_scale_factor 8) lands on the same latent
    unpacked = FluxPipeline._unpack_latents(t(ref), 48, 64, 8).numpy()
    np.testing.assert_array_equal(np.transpose(unpacked, (0, 2, 3, 1)), lat)
    with pytest.raises(ValueError, match="not divisible"):
        pos.patchify(jnp.zeros((1, 5, 4, 3)))


def test_position_id_schemes():
    ids = pos.segment_ids([(2, 3), (2, 2)], scheme="shifted_2d", centred=False)
    assert ids.shape == (10, 3)
    assert np.all(ids[:, 0] == 0)
    np.testing.assert_array_equal(ids[6:, 2], [3, 4, 3, 4])  # second segment starts right of the first
    ids = pos.segment_ids([(2, 2), (2, 2)], scheme="shifted_2d", centred=False, offsets=[(0, 0), (-2, -2)])
    np.testing.assert_array_equal(ids[4:, 1:], [[-2, -2], [-2, -1], [-1, -2], [-1, -1]])
    img, txt = pos.flux_ids([(2, 2), (2, 2)], 3)
    np.testing.assert_array_equal(img[:, 0], [0] * 4 + [1] * 4)
    assert not txt.any()
    img, txt = pos.qwen_image_ids([(1, 4, 6)], 2)
    np.testing.assert_array_equal(np.unique(img[:, 1]), [-2, -1, 0, 1])
    np.testing.assert_array_equal(txt, [[3, 3, 3], [4, 4, 4]])  # diagonal after max(h//2, w//2) = 3
    default = pos.default_txt_ids(jnp.asarray(img)[None], 2, "diagonal")
    np.testing.assert_array_equal(np.asarray(default)[0], txt)
    with pytest.raises(ValueError, match="scheme"):
        pos.segment_ids([(2, 2)], scheme="diagonal")


def test_config_round_trip_and_errors():
    for name in ("qwen_image_20b", "flux_12b", "tiny", "tiny_flux", "head_870m", "dit_10b"):
        cfg = mmdit_config(name)
        assert from_diffusers(MMDiTConfig, to_diffusers(cfg)) == cfg
    assert from_diffusers(MMDiTConfig, dict(QWEN_TINY, _class_name="QwenImageTransformer2DModel")) == mmdit_config(
        "tiny"
    )
    with pytest.raises(ValueError, match="sums to"):
        MMDiTConfig(head_dim=64)
    # a key diffusers' class does not take is ignored (with a warning), as diffusers ignores it
    assert from_diffusers(MMDiTConfig, {"_class_name": "FluxTransformer2DModel", "foo": 1}) == from_diffusers(
        MMDiTConfig, {"_class_name": "FluxTransformer2DModel"}
    )
    with pytest.raises(ValueError, match="_class_name"):
        from_diffusers(MMDiTConfig, {"_class_name": "SD3Transformer2DModel"})
    with pytest.raises(ValueError, match="txt shape"):
        cfg = mmdit_config("tiny")
        MMDiT(cfg).init(
            jax.random.key(0), jnp.zeros((1, 4, 16)), jnp.zeros((1, 4, 3)), jnp.zeros((1, 2, 7)), None, jnp.zeros((1,))
        )


def test_absolute_positions_tell_identical_tokens_apart():
    """RoPE is relative: identical image tokens get identical outputs wherever they sit. With
    `absolute_positions` each token also carries a code of its (row, col); the option adds no
    parameters and cannot be exported to diffusers."""
    plain = dataclasses.replace(mmdit_config("tiny"), num_layers=1)
    placed = dataclasses.replace(plain, absolute_positions=True)
    img = jnp.ones((1, 4, plain.in_channels))
    ids = jnp.asarray(pos.batch_ids(pos.qwen_image_ids([(1, 2, 2)], 3)[0], 1))
    txt, mask, t = jnp.ones((1, 3, plain.joint_attention_dim)), jnp.zeros((1, 3), bool), jnp.full((1,), 0.5)
    params = MMDiT(plain).init(jax.random.key(0), img, ids, txt, mask, t)
    placed_params = MMDiT(placed).init(jax.random.key(0), img, ids, txt, mask, t)
    assert jax.tree.structure(params) == jax.tree.structure(placed_params)
    same = MMDiT(plain).apply(params, img, ids, txt, mask, t)[0]
    differ = MMDiT(placed).apply(params, img, ids, txt, mask, t)[0]
    assert float(jnp.abs(same - same[:1]).max()) < 1e-5
    assert bool((jnp.abs(differ[1:] - differ[:1]).max(axis=-1) > 1e-3).all())
    with pytest.raises(ValueError, match="absolute_positions"):
        to_diffusers(placed)


@pytest.mark.parametrize("scheme", ["shifted_2d", "frame"])
def test_local_mixing_is_a_depthwise_conv_over_the_target_grid(scheme):
    """`local_mixing`'s convolution equals XLA's depthwise 3x3 convolution (zero-padded) of the
    noisy target's token grid; the condition tokens get none, even where shifted 2-D ids put
    their grid right next to the target's."""
    h, w, f = 3, 4, 5
    ids = jnp.asarray(pos.batch_ids(pos.segment_ids([(h, w), (h, w)], scheme=scheme), 2))
    x = jax.random.normal(jax.random.key(0), (2, 2 * h * w, f))
    kernel = jax.random.normal(jax.random.key(1), (9, f))
    out = depthwise_grid_conv(x, *pos.grid_neighbours(ids, h * w), kernel)
    want = jax.lax.conv_general_dilated(
        x[:, : h * w].reshape(2, h, w, f),
        kernel.reshape(3, 3, 1, f),
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=f,
    )
    np.testing.assert_allclose(out[:, : h * w], want.reshape(2, h * w, f), atol=1e-5)
    assert not bool(out[:, h * w :].any())


def _grid_inputs(cfg, side: int):
    """One picture of side x side image tokens and 3 condition tokens (random, seed 0), t = 0.5:
    (img, img_ids, txt, txt_mask, timestep) for `MMDiT(cfg)`."""
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.normal(size=(1, side * side, cfg.in_channels)), jnp.float32)
    ids = jnp.asarray(pos.batch_ids(pos.qwen_image_ids([(1, side, side)], 3)[0], 1))
    txt = jnp.asarray(rng.normal(size=(1, 3, cfg.joint_attention_dim)), jnp.float32)
    return img, ids, txt, jnp.ones((1, 3), bool), jnp.full((1,), 0.5)


def test_local_mixing_starts_as_the_plain_dit():
    """The convolution's weight (one (9, mlp_dim) per double block) starts at zero, so a DiT
    with `local_mixing` computes what the plain one does until it is trained; with a weight,
    a token's output depends on its neighbours' inputs beyond attention. It cannot be exported."""
    plain = dataclasses.replace(mmdit_config("tiny"), num_layers=2)
    mixing = dataclasses.replace(plain, local_mixing=True)
    img, ids, txt, mask, t = _grid_inputs(plain, 4)
    params = nn.meta.unbox(MMDiT(plain).init(jax.random.key(0), img, ids, txt, mask, t))
    mixed = nn.meta.unbox(MMDiT(mixing).init(jax.random.key(0), img, ids, txt, mask, t))
    weight = mixed["params"]["double_blocks"]["img_mlp"]["local_mix"]["weight"]
    assert weight.shape == (2, 9, plain.mlp_dim) and not bool(weight.any())
    del mixed["params"]["double_blocks"]["img_mlp"]["local_mix"]
    assert jax.tree.structure(mixed) == jax.tree.structure(params)
    mixed["params"]["double_blocks"]["img_mlp"]["local_mix"] = {"weight": weight}
    np.testing.assert_allclose(
        MMDiT(mixing).apply(mixed, img, ids, txt, mask, t),
        MMDiT(plain).apply(params, img, ids, txt, mask, t),
        atol=1e-6,
    )
    mixed["params"]["double_blocks"]["img_mlp"]["local_mix"]["weight"] = jnp.ones_like(weight)
    assert (
        float(
            jnp.abs(
                MMDiT(mixing).apply(mixed, img, ids, txt, mask, t) - MMDiT(plain).apply(params, img, ids, txt, mask, t)
            ).max()
        )
        > 1e-3
    )
    with pytest.raises(ValueError, match="local_mixing"):
        to_diffusers(mixing)
    with pytest.raises(ValueError, match="local_mixing"):
        dataclasses.replace(mixing, family="flux", num_layers=0, num_single_layers=1, out_channels=None)


def test_patch_bottleneck_projects_each_token_through_a_narrow_layer():
    """`patch_bottleneck=k` adds `img_in_bottleneck` (in_channels -> k) before `img_in` (k ->
    width), so the image stream starts from a rank-k function of each token; with the two kernels
    multiplied into one, the plain DiT computes the same. It cannot be exported, and k must be
    narrower than a token."""
    plain = dataclasses.replace(mmdit_config("tiny"), num_layers=2)
    narrow = dataclasses.replace(plain, patch_bottleneck=4)
    img, ids, txt, mask, t = _grid_inputs(plain, 4)
    p = nn.meta.unbox(MMDiT(narrow).init(jax.random.key(0), img, ids, txt, mask, t))["params"]
    assert p["img_in_bottleneck"]["kernel"].shape == (plain.in_channels, 4)
    assert p["img_in"]["kernel"].shape == (4, plain.inner_dim)
    merged = {k: v for k, v in p.items() if k != "img_in_bottleneck"}
    down, up = p["img_in_bottleneck"], p["img_in"]
    merged["img_in"] = {"kernel": down["kernel"] @ up["kernel"], "bias": down["bias"] @ up["kernel"] + up["bias"]}
    np.testing.assert_allclose(
        MMDiT(narrow).apply({"params": p}, img, ids, txt, mask, t),
        MMDiT(plain).apply({"params": merged}, img, ids, txt, mask, t),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="patch_bottleneck"):
        to_diffusers(narrow)
    for k in (0, plain.in_channels):
        with pytest.raises(ValueError, match="patch_bottleneck"):
            dataclasses.replace(plain, patch_bottleneck=k)


@pytest.mark.parametrize("scheme", ["shifted_2d", "frame"])
def test_cell_convs_equal_zero_padded_convolutions_of_the_target_latent(scheme):
    """`cell_conv_width`'s convolutions, computed token by token from the position ids, equal
    XLA's 3x3 convolutions (zero-padded, SiLU between) of the whole target latent before patching,
    even where shifted 2-D ids put a condition segment's grid right next to the target's."""
    h, w, p, c = 3, 4, 2, 5
    ids = jnp.asarray(pos.batch_ids(pos.segment_ids([(h, w), (h, w)], scheme=scheme), 2))
    index, valid = (a[:, : h * w] for a in pos.grid_neighbours(ids, h * w))
    latent = jax.random.normal(jax.random.key(0), (2, h * p, w * p, c))
    cells = tokens_to_cells(pos.patchify(latent, p), p)
    convs = GridCellConvs((7, 3))
    params = convs.init(jax.random.key(1), cells, index, valid)["params"]
    params = jax.tree.map(lambda a: a + 0.1, nn.meta.unbox(params))  # biases too
    out = pos.unpatchify(cells_to_tokens(convs.apply({"params": params}, cells, index, valid)), h * p, w * p, p)

    def conv(x, layer):
        y = jax.lax.conv_general_dilated(x, layer["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + layer["bias"]

    want = conv(jax.nn.silu(conv(latent, params["conv_0"])), params["conv_1"])
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_cell_conv_starts_as_the_plain_dit():
    """The stem's projection into the stream and the head's last convolution start at zero, so a
    DiT with `cell_conv_width` computes what the plain one does until it is trained, and not once
    they are. It cannot be exported, and the width must be positive."""
    plain = dataclasses.replace(mmdit_config("tiny"), num_layers=2)
    conv = dataclasses.replace(plain, cell_conv_width=8)
    img, ids, txt, mask, t = _grid_inputs(plain, 4)
    params = nn.meta.unbox(MMDiT(plain).init(jax.random.key(0), img, ids, txt, mask, t))
    convolved = nn.meta.unbox(MMDiT(conv).init(jax.random.key(0), img, ids, txt, mask, t))
    stem, head = convolved["params"].pop("cell_stem"), convolved["params"].pop("cell_head")
    assert jax.tree.structure(convolved) == jax.tree.structure(params)
    assert not bool(stem["proj"]["kernel"].any()) and not bool(head["convs"]["conv_1"]["kernel"].any())
    assert head["convs"]["conv_1"]["kernel"].shape == (3, 3, 8, plain.out_channels)
    assert stem["convs"]["conv_0"]["kernel"].shape == (3, 3, plain.in_channels // 4, 8)
    fresh = {"params": {**params["params"], "cell_stem": stem, "cell_head": head}}
    np.testing.assert_allclose(
        MMDiT(conv).apply(fresh, img, ids, txt, mask, t), MMDiT(plain).apply(params, img, ids, txt, mask, t), atol=1e-6
    )
    head["convs"]["conv_1"]["kernel"] = jnp.ones_like(head["convs"]["conv_1"]["kernel"])
    trained = {"params": {**params["params"], "cell_stem": stem, "cell_head": head}}
    out = MMDiT(conv).apply(trained, img, ids, txt, mask, t)
    assert float(jnp.abs(out - MMDiT(plain).apply(params, img, ids, txt, mask, t)).max()) > 1e-3
    with pytest.raises(ValueError, match="cell_conv_width"):
        to_diffusers(conv)
    with pytest.raises(ValueError, match="cell_conv_width"):
        dataclasses.replace(plain, cell_conv_width=0)


def test_zero_text_positions_put_every_condition_token_at_the_origin():
    """`txt_positions="zeros"` on a Qwen-Image DiT: the condition tokens' RoPE ids are zeros (as
    FLUX's), so the output equals passing zero `txt_ids` and differs from the diagonal default."""
    diagonal = dataclasses.replace(mmdit_config("tiny"), num_layers=1)
    zeros = dataclasses.replace(diagonal, txt_positions="zeros")
    img, ids, txt, mask, t = _grid_inputs(diagonal, 2)
    params = MMDiT(diagonal).init(jax.random.key(0), img, ids, txt, mask, t)
    out = MMDiT(zeros).apply(params, img, ids, txt, mask, t)
    explicit = MMDiT(diagonal).apply(params, img, ids, txt, mask, t, txt_ids=jnp.zeros((1, 3, 3)))
    np.testing.assert_allclose(out, explicit, atol=1e-6)
    assert float(jnp.abs(out - MMDiT(diagonal).apply(params, img, ids, txt, mask, t)).max()) > 1e-4
    with pytest.raises(ValueError, match="txt_positions"):
        to_diffusers(zeros)
    with pytest.raises(ValueError, match="txt_positions"):
        dataclasses.replace(diagonal, txt_positions="diagonal")


def test_param_counts_equal_diffusers():
    """eval_shape counts of the real sizes equal diffusers' models built on the meta device."""
    for name, cls in (("qwen_image_20b", QwenImageTransformer2DModel), ("flux_12b", FluxTransformer2DModel)):
        cfg = mmdit_config(name)
        kwargs = {k: v for k, v in to_diffusers(cfg).items() if not k.startswith("_")}
        with torch.device("meta"):
            ref = sum(p.numel() for p in cls(**kwargs).parameters())
        assert param_count(cfg) == ref, name
    assert 0.8e9 < param_count(mmdit_config("head_870m")) < 0.95e9
    assert 9.5e9 < param_count(mmdit_config("dit_10b")) < 10.5e9


@pytest.mark.slow
def test_remat_dots_gradients_match():
    cfg = mmdit_config("tiny", num_layers=1)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(1)))
    img, txt, mask, ts = _inputs(cfg, 2, 8, 4)
    ids = pos.batch_ids(pos.segment_ids([(2, 4)]), 2)

    def grads(c):
        loss = lambda p: jnp.sum(MMDiT(c).apply({"params": p}, img, ids, txt, mask, ts) ** 2)
        return jax.jit(jax.grad(loss))(params)

    g0, g1 = grads(cfg), grads(cfg.replace(remat="dots"))
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
    assert rel_err(flat(g1), flat(g0)) < 1e-5


def test_sharded_equals_unsharded(devices):
    """Params initialised directly sharded on a (2, 4, 1) mesh under `dit/`, forward == single-device."""
    cfg = mmdit_config("tiny", num_heads=4, head_dim=16, axes_dims_rope=(4, 6, 6))
    mesh = sharding.make_mesh((2, 4, 1))
    params, shardings, _ = sharding.init_sharded(
        lambda r: {"dit": init_params(cfg, r)}, mesh, jax.random.key(0), rules_by_submodel={"dit": sharding.DIT_RULES}
    )
    spec = shardings["dit"]["double_blocks"]["img_mod"]["kernel"].spec
    assert "fsdp" in jax.tree.leaves(tuple(spec)), spec  # embed axis is really split over fsdp
    rng = np.random.default_rng(0)
    b, n, tl = 8, 12, 5
    img = rng.standard_normal((b, n, cfg.in_channels)).astype(np.float32)
    txt = rng.standard_normal((b, tl, cfg.joint_attention_dim)).astype(np.float32)
    mask = np.ones((b, tl), bool)
    mask[::2, -2:] = False
    ts = rng.uniform(size=b).astype(np.float32)
    ids = pos.batch_ids(pos.segment_ids([(2, 4), (2, 2)]), b)
    fwd = lambda p, *a: MMDiT(cfg).apply({"params": p["dit"]}, *a, num_target_tokens=8)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.activation_rules()):
        out_sharded = jax.jit(fwd)(params, img, ids, txt, mask, ts)
    host = jax.device_get(params)
    out = jax.jit(fwd)(host, img, ids, txt, mask, ts)
    np.testing.assert_allclose(np.asarray(out_sharded), np.asarray(out), rtol=1e-5, atol=1e-5)


def test_logical_axes_covered_by_dit_rules():
    """Every logical axis name on a DiT parameter has an entry in sharding.DIT_RULES."""
    known = {name for name, _ in sharding.DIT_RULES}
    for cfg in (mmdit_config("tiny", use_additional_t_cond=True, zero_cond_t=True), mmdit_config("tiny_flux")):
        specs = nn.get_partition_spec(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
        used = {
            a
            for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
            for a in s
            if a
        }
        assert used and used <= known, used - known
