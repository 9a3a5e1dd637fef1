"""The analytic FLOP counts (`qk_jax.flops`) against the programs our models really run.

Two references per model, on small matmul-dominated configurations (widths 128-256):

- exact: `traced_matmul_flops`, the dot/conv products of the traced forward (scans
  times their length). The analytic count must equal it: same products, same shapes.
- XLA: `compiled.cost_analysis()["flops"]` of the jitted forward on one device. XLA also
  counts element-wise work (norms, softmax, activations, bias adds: one FLOP per
  element), so ours/XLA sits a few percent below 1; we require |ours/XLA - 1| < 0.1.
  XLA counts a while-loop body once, so these compiles run with every `nn.scan` fully
  unrolled (the `unrolled_scans` fixture); the models' code is unchanged otherwise.

Run with `-s` to see the table of ratios.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qk_jax import flops
from qk_jax.models import lora
from qk_jax.models.connector import Connector, ConnectorConfig
from qk_jax.models.mmdit import MMDiT, MMDiTConfig
from qk_jax.models.mmdit import dummy_inputs as mmdit_inputs
from qk_jax.models.qwen2_5_vl import (
    Qwen25VL,
    TextConfig,
    VisionConfig,
    build_image_plan,
    build_vision_plan,
    get_config,
    text_position_ids,
)
from qk_jax.models.qwen2_5_vl.vision import VisionTower
from qk_jax.models.vae import AutoencoderKLConfig, QwenImageVAEConfig, build_vae
from qk_jax.models.vae.pixel import PixelSpaceAutoencoder, PixelSpaceConfig
from qk_jax.tree import flatten_tree

TOLERANCE = 0.1
RATIOS: dict[str, tuple[int, float, float]] = {}  # name -> (ours, xla, ours / xla)


@pytest.fixture(scope="module", autouse=True)
def ratio_table():
    yield
    if RATIOS:
        print("\n\nanalytic vs XLA cost_analysis (unrolled scans, 1 CPU device)")
        print(f"{'config':<34}{'ours':>16}{'xla':>16}{'ours/xla':>10}")
        for name, (ours, xla, ratio) in RATIOS.items():
            print(f"{name:<34}{ours:>16,}{int(xla):>16,}{ratio:>10.4f}")


@pytest.fixture(scope="module")
def unrolled_scans():
    """`nn.scan` with `unroll=True`, so that XLA's cost analysis sees every layer."""
    scan = nn.scan
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn, "scan", lambda *a, **k: scan(*a, **{**k, "unroll": True}))
        yield


def xla_flops(fn, *args) -> float:
    return flops.xla_flops_per_device(jax.jit(fn).lower(*args).compile())


def assert_counts_match(name: str, ours: int, fn, *args, dead: int = 0) -> None:
    """ours == the traced products, and within TOLERANCE of XLA.

    dead: products that are dead code only in the unrolled program (XLA removes them;
    the scanned program computes them), left out of the XLA comparison.
    """
    assert ours == flops.traced_matmul_flops(fn, *args), name
    xla = xla_flops(fn, *args)
    ratio = (ours - dead) / xla
    RATIOS[name] = (ours - dead, xla, ratio)
    assert abs(ratio - 1) < TOLERANCE, f"{name}: ours {ours - dead:,} vs XLA {xla:,.0f} (ratio {ratio:.4f})"


def assert_real_paths(ours: flops.MatmulFlops, params, strip: str = "") -> None:
    """Every kernel the count names is a parameter of the model (so regex selections work)."""
    paths = set(flatten_tree(params))
    missing = [k for k in ours.kernels if k.removeprefix(strip) not in paths]
    assert not missing, f"counted kernels that are not parameters: {missing}"


def abstract(module, *args, **kwargs):
    """Parameter shapes (ShapeDtypeStructs) of `module.init(*args, **kwargs)`, nothing allocated."""
    return nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs)))["params"]


# ------------------------------------------------------------------ Qwen2.5-VL

VISION = VisionConfig(
    depth=2,
    hidden_size=128,
    intermediate_size=256,
    num_heads=2,
    out_hidden_size=256,
    window_size=56,
    fullatt_block_indexes=(1,),
)
TEXT = TextConfig(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    mrope_section=(8, 12, 12),
    bos_token_id=462,
    eos_token_id=464,
    pad_token_id=462,
)
VLM = get_config("tiny").replace(vision=VISION, text=TEXT)


def test_vision_tower(unrolled_scans):
    grid = np.array([[1, 8, 8], [1, 8, 8]])  # 128 patches, windows of 4x4 patches
    plan = build_vision_plan(grid, VISION)
    pixels = jnp.zeros((128, VISION.patch_dim))
    tower = VisionTower(VISION)
    params = abstract(tower, pixels, plan)
    fn = lambda p, x, plan: tower.apply({"params": p}, x, plan)
    ours = flops.vision_tower_flops(VISION, 128)
    assert_real_paths(ours, params, strip="visual/")
    assert_counts_match("vision tower (N=128)", ours.total, fn, params, pixels, plan)
    # The batched layout: the same 2 images as 2 sequences of 64 patches, attention 2 x 64^2.
    batched = flops.vision_tower_flops(VISION, 64, num_images=2)
    assert batched.weights == ours.weights
    assert batched.pair_total * 2 == ours.pair_total
    assert_counts_match(
        "vision tower (2 x P=64)", batched.total, fn, params, pixels.reshape(2, 64, -1), build_image_plan(grid, VISION)
    )


@pytest.fixture(scope="module")
def decoder():
    b, t = 2, 64
    model = Qwen25VL(VLM)
    ids = jnp.zeros((b, t), jnp.int32)
    mask = jnp.ones((b, t), jnp.int32)
    pos = jnp.asarray(text_position_ids(np.ones((b, t))))
    params = abstract(model, ids, pos, mask)
    decode = lambda p, e: model.apply({"params": p}, e, pos, mask, method=model.decode)
    embeds = jax.ShapeDtypeStruct((b, t, TEXT.hidden_size), jnp.float32)
    return dict(model=model, b=b, t=t, ids=ids, mask=mask, pos=pos, params=params, decode=decode, embeds=embeds)


def test_decoder_with_lm_head(decoder, unrolled_scans):
    d = decoder
    fn = lambda p, ids: d["model"].apply({"params": p}, ids, d["pos"], d["mask"])["logits"]
    ours = flops.decoder_flops(VLM, d["b"], d["t"], with_lm_head=True)
    assert ours.select("lm_head") == 2 * d["b"] * d["t"] * TEXT.hidden_size * TEXT.vocab_size
    assert_real_paths(ours, d["params"])
    tied = flops.decoder_flops(TEXT, 1, 4, with_lm_head=True, tie_word_embeddings=True)
    assert_real_paths(tied, d["params"])
    assert_counts_match("decoder + lm_head (B=2, T=64)", ours.total, fn, d["params"], d["ids"])


def test_decoder_gradients(decoder, unrolled_scans):
    """grad w.r.t. the input embeddings only (frozen weights): forward + activation
    gradients; w.r.t. every weight too: + weight gradients (~3x forward)."""
    d = decoder
    fwd = flops.decoder_flops(TEXT, d["b"], d["t"], with_lm_head=False)
    loss = lambda e, p: jnp.sum(d["decode"](p, e) ** 2)

    frozen = flops.train_step_flops([flops.Part("llm", fwd, backward_through=True)])
    assert frozen["total"] == 2 * fwd.weights + 3 * fwd.pair_total
    assert_counts_match("decoder grad, input only", frozen["total"], jax.grad(loss), d["embeds"], d["params"])

    trained = flops.train_step_flops([flops.Part("llm", fwd, weight_grads=True)])
    assert trained["total"] == 3 * fwd.total
    assert_counts_match(
        "decoder grad, input + weights", trained["total"], jax.grad(loss, argnums=(0, 1)), d["embeds"], d["params"]
    )


# ------------------------------------------------------------------ connector


@pytest.mark.parametrize(
    "ccfg",
    [
        ConnectorConfig(kind="mlp", in_dim=256, out_dim=128, hidden_dim=512),
        ConnectorConfig(kind="transformer", in_dim=128, out_dim=128, hidden_dim=256, num_layers=2, num_heads=2),
    ],
    ids=["mlp", "transformer"],
)
def test_connector(ccfg):
    b, t = 2, 64
    hidden, mask = jnp.zeros((b, t, ccfg.in_dim)), jnp.ones((b, t), bool)
    model = Connector(ccfg)
    params = abstract(model, hidden, mask)
    fn = lambda p, h, m: model.apply({"params": p}, h, m)
    ours = flops.connector_flops(ccfg, b, t)
    assert_real_paths(ours, params)
    assert_counts_match(f"connector {ccfg.kind} (B=2, T=64)", ours.total, fn, params, hidden, mask)


# ------------------------------------------------------------------ MMDiT

QWEN_DIT = MMDiTConfig(
    family="qwen_image",
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    num_heads=2,
    head_dim=64,
    joint_attention_dim=128,
    axes_dims_rope=(16, 24, 24),
)
FLUX_DIT = MMDiTConfig(
    family="flux",
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=1,
    num_single_layers=2,
    num_heads=2,
    head_dim=64,
    joint_attention_dim=128,
    pooled_projection_dim=64,
    guidance_embeds=True,
    axes_dims_rope=(16, 24, 24),
)


def _mmdit_case(cfg: MMDiTConfig, b=2, n=64, t=32, n_target=48):
    model = MMDiT(cfg)
    inputs = mmdit_inputs(cfg, batch=b, n=n, t=t)
    params = abstract(model, **inputs)
    fn = lambda p, x: model.apply({"params": p}, **x, num_target_tokens=n_target)
    return flops.mmdit_flops(cfg, b, n, t, n_target), fn, params, inputs


@pytest.mark.parametrize("cfg", [QWEN_DIT, FLUX_DIT], ids=["qwen_image", "flux"])
def test_mmdit(cfg, unrolled_scans):
    ours, fn, params, inputs = _mmdit_case(cfg)
    assert_real_paths(ours, params)
    dead = 0
    if not cfg.num_single_layers:
        # Only image tokens leave the model: unrolled, the last double block's text-stream
        # output projection and MLP are dead code, which XLA removes (the scan computes them).
        dead = ours.select(r"double_blocks/(attn/txt_out|txt_mlp)/") // cfg.num_layers
    assert_counts_match(f"mmdit {cfg.family} (B=2, N=64, T=32)", ours.total, fn, params, inputs, dead=dead)


def test_mmdit_zero_cond_t_runs_modulation_twice():
    cfg = QWEN_DIT.replace(zero_cond_t=True)
    ours, fn, params, inputs = _mmdit_case(cfg)
    assert ours.total == flops.traced_matmul_flops(fn, params, inputs)
    plain = flops.mmdit_flops(QWEN_DIT, 2, 64, 32, 48)
    assert ours.select("img_mod") == 2 * plain.select("img_mod")
    assert ours.select("txt_mod") == plain.select("txt_mod")
    # without condition segments there is no t = 0 pass
    assert flops.mmdit_flops(cfg, 2, 64, 32, 64).total == flops.mmdit_flops(QWEN_DIT, 2, 64, 32, 64).total


def test_mmdit_patch_bottleneck_counts_both_projections():
    cfg = QWEN_DIT.replace(patch_bottleneck=8)
    ours, fn, params, inputs = _mmdit_case(cfg)
    assert_real_paths(ours, params)
    assert ours.total == flops.traced_matmul_flops(fn, params, inputs)
    assert ours.select("img_in_bottleneck") == 2 * 2 * 64 * cfg.in_channels * 8


def test_mmdit_cell_conv_counts_the_stem_and_head_convolutions():
    """`cell_conv_width`: the stem's and head's 3x3 convolutions over the target's cells (each
    token's p x p cells from 9 x the input width), the stem's projection into the stream and the
    head's widening of it, as the traced program computes them."""
    cfg = QWEN_DIT.replace(cell_conv_width=8)
    ours, fn, params, inputs = _mmdit_case(cfg)
    assert_real_paths(ours, params)
    assert ours.total == flops.traced_matmul_flops(fn, params, inputs)
    cells = 2 * 48 * cfg.patch_size**2
    assert ours.select("cell_stem/convs/conv_0") == 2 * cells * 9 * (cfg.in_channels // cfg.patch_size**2) * 8


# ------------------------------------------------------------------ VAEs

KL = AutoencoderKLConfig(
    block_out_channels=(64, 128),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=32,
    use_quant_conv=True,
    use_post_quant_conv=True,
)
WAN = QwenImageVAEConfig(
    base_dim=16,
    z_dim=4,
    dim_mult=(1, 2, 2),
    num_res_blocks=1,
    attn_scales=(0.5,),
    temperal_downsample=(False, True),
    latents_mean=(0.0,) * 4,
    latents_std=(1.0,) * 4,
)


def _vae(cfg, h=32, w=32):
    model = build_vae(cfg)
    images = jnp.zeros((1, h, w, 3))
    params = abstract(model, images)
    f = cfg.downsample_factor
    latents = jnp.zeros((1, h // f, w // f, getattr(cfg, "latent_channels", getattr(cfg, "z_dim", 0))))
    enc = lambda p, x: model.apply({"params": p}, x, method=model.encode)
    dec = lambda p, z: model.apply({"params": p}, z, method=model.decode)
    return params, images, latents, enc, dec


def test_vae_kl_encode():
    params, images, _, enc, _ = _vae(KL)
    assert_counts_match(
        "AutoencoderKL encode (32x32)", flops.vae_encode_flops(KL, 1, 32, 32).total, enc, params, images
    )


@pytest.mark.parametrize("cfg", [KL, WAN], ids=["kl", "qwen_image"])
def test_vae_counts_match_trace(cfg):
    params, images, latents, enc, dec = _vae(cfg, 32, 48)
    encode, decode = flops.vae_encode_flops(cfg, 1, 32, 48), flops.vae_decode_flops(cfg, 1, 32, 48)
    assert encode.total == flops.traced_matmul_flops(enc, params, images)
    assert decode.total == flops.traced_matmul_flops(dec, params, latents)
    assert_real_paths(encode + decode, params)


def test_pixel_space_autoencoder_is_free():
    cfg = PixelSpaceConfig(factor=4)
    model = PixelSpaceAutoencoder(cfg)
    images = jnp.zeros((2, 16, 16, 3))
    assert flops.traced_matmul_flops(lambda x: model.apply({}, x, method=model.encode), images) == 0
    assert flops.vae_encode_flops(cfg, 2, 16, 16).total == flops.vae_decode_flops(cfg, 2, 16, 16).total == 0
    with pytest.raises(ValueError, match="multiple of the downsample factor 4"):
        flops.vae_encode_flops(cfg, 2, 18, 16)


def test_pixel_space_dct_code_counts_as_xla():
    """With `keep`, encode and decode are two products with the DCT basis per block."""
    cfg = PixelSpaceConfig(factor=8, keep=4)
    model = PixelSpaceAutoencoder(cfg)
    images = jnp.zeros((2, 32, 16, 3))
    latents = jnp.zeros((2, 4, 2, cfg.latent_channels))
    for ours, fn, x in (
        (flops.vae_encode_flops(cfg, 2, 32, 16), lambda x: model.apply({}, x, method=model.encode), images),
        (flops.vae_decode_flops(cfg, 2, 32, 16), lambda z: model.apply({}, z, method=model.decode), latents),
    ):
        xla = flops.traced_matmul_flops(fn, x)
        assert ours.total > 0 and abs(ours.total / xla - 1) < TOLERANCE, (ours.total, xla)


def test_conv_taps_skip_padding_as_xla_does():
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (2, 2), ((0, 1), (0, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    x, k = jnp.zeros((1, 16, 16, 32)), jnp.zeros((3, 3, 32, 64))
    counted = flops.traced_matmul_flops(conv, x, k)
    assert counted == 2 * 23 * 23 * 32 * 64  # 8 outputs x 3 taps per axis, minus the one padded tap
    assert counted == xla_flops(conv, x, k)


# ------------------------------------------------------------------ LoRA and the step


def test_lora_merge_flops():
    model = Qwen25VL(VLM)
    b, t = 1, 4
    pos = jnp.asarray(text_position_ids(np.ones((b, t))))
    params = {"vlm": abstract(model, jnp.zeros((b, t), jnp.int32), pos, jnp.ones((b, t), jnp.int32))}
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    patterns = [r"self_attn/(q|v)_proj"]
    adapters = lora.init_lora(jax.random.key(1), params, patterns, rank=8)
    tree = {**params, "lora": adapters}
    ours = flops.lora_flops(tree)
    layers, d = TEXT.num_hidden_layers, TEXT.hidden_size
    kv = TEXT.num_key_value_heads * TEXT.head_dim
    assert ours.total == 2 * layers * d * 8 * (d + kv)
    assert ours.weights == 0 and ours.pair_total == ours.total
    assert ours.total == flops.traced_matmul_flops(lambda p: lora.apply_lora(p, 2.0), tree)
    # The adapted kernels' weight gradients are selected with the LoRA target regexes.
    fwd = flops.decoder_flops(TEXT, 2, 64, with_lm_head=False)
    step = flops.train_step_flops(
        [flops.Part("llm", fwd, weight_grads=patterns), flops.Part("lora", ours, weight_grads=True)]
    )
    llm = step["parts"]["llm"]
    assert llm["backward_weight"] == fwd.select("q_proj") + fwd.select("v_proj") > 0
    assert llm["backward_activation"] == fwd.weights + 2 * fwd.pair_total
    assert step["parts"]["lora"]["backward"] == 2 * ours.total


def test_train_step_rule():
    fwd = flops.MatmulFlops({"a/kernel": 100, "b/kernel": 50}, {"attention": 30})
    step = flops.train_step_flops(
        [
            flops.Part("vit", fwd),  # frozen, nothing trainable upstream
            flops.Part("llm", fwd, backward_through=True),  # frozen, trainable queries upstream
            flops.Part("dit", fwd, weight_grads=True, remat="full"),
            flops.Part("head", fwd, weight_grads=r"^b/", remat="dots"),
        ]
    )
    p = step["parts"]
    assert p["vit"]["total"] == 180 and p["vit"]["backward"] == 0
    assert p["llm"]["backward_activation"] == 150 + 60 and p["llm"]["backward_weight"] == 0
    assert p["dit"]["total"] == 180 + 210 + 150 and p["dit"]["recompute"] == 180
    assert p["head"]["backward_weight"] == 50 and p["head"]["recompute"] == 30
    assert step["forward"] == 4 * 180
    assert step["total"] == sum(v["total"] for v in p.values())
    assert step["hardware_total"] == step["total"] + 210
    with pytest.raises(ValueError, match="given twice"):
        flops.train_step_flops([flops.Part("vit", fwd), flops.Part("vit", fwd)])
    with pytest.raises(ValueError, match="remat"):
        flops.train_step_flops([flops.Part("vit", fwd, remat="some")])
    with pytest.raises(ValueError, match=r"weight_grads=\['q_prj'\] selects no kernel"):
        flops.train_step_flops([flops.Part("llm", fwd, weight_grads=["q_prj"])])
    assert flops.train_step_flops([flops.Part("head", 10, weight_grads=True)])["total"] == 30
    table = flops.format_step_flops(step).splitlines()
    assert len(table) == 1 + 4 + 1 and table[-1].split()[0] == "step"


def test_matmul_flops_arithmetic_and_errors():
    a = flops.vision_tower_flops(VISION, 128)
    b = flops.decoder_flops(TEXT, 2, 64, with_lm_head=False)
    both = sum([a, b])
    assert both.total == a.total + b.total == int(both) == float(both)
    assert both.select([r"^visual/", r"^language_model/"]) == both.weights
    with pytest.raises(ValueError, match="num_patches=130 is not a multiple"):
        flops.vision_tower_flops(VISION, 130)
    with pytest.raises(ValueError, match="seq_len must be positive"):
        flops.decoder_flops(TEXT, 2, 0, with_lm_head=False)
    with pytest.raises(ValueError, match="num_target_tokens=70 exceeds img_tokens=64"):
        flops.mmdit_flops(QWEN_DIT, 1, 64, 8, 70)
    with pytest.raises(TypeError, match="not a VAE config"):
        flops.vae_encode_flops(QWEN_DIT, 1, 32, 32)


def _device(kind: str, platform: str = "tpu"):
    import types

    return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize(
    "kind, datasheet_peak", [("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("NVIDIA H100 80GB HBM3", 989e12)]
)
def test_mfu_of_a_logged_step_from_a_known_timing(kind, datasheet_peak):
    """A step of known FLOPs and time on chips of a named kind (as JAX reports it): the log
    record's TFLOP/s per device is FLOPs / time / devices and its MFU that over the chip's
    datasheet bf16 peak (v5e 197, v5p 459, H100 SXM 989 TFLOP/s). A kind resolved to the
    wrong chip (e.g. "TPU v5 lite" taken for v5p) or a peak per host instead of per chip fails."""
    from qk_jax import train_metrics

    n_dev, seconds = jax.device_count(), 0.5
    flops_per_step = 0.4 * datasheet_peak * n_dev * seconds  # 40% of the chips' peak
    m = {"loss": 1.0, "grad_norm": 1.0, "task_loss_sum": np.ones(6), "task_count": np.ones(6)}
    batch = {"position_ids": np.zeros((3, 2, 16)), "img_ids": np.zeros((2, 64, 3))}
    record = train_metrics.window_record(1, m, 1, seconds, batch, flops_per_step, flops.peak_flops_for(_device(kind)))
    assert record["tflops_per_device"] == pytest.approx(0.4 * datasheet_peak / 1e12)
    assert record["mfu"] == pytest.approx(0.4)
    assert flops.mfu(flops_per_step, seconds, n_dev, flops.peak_flops_for(_device(kind))) == pytest.approx(0.4)


def test_peaks_follow_the_chips():
    """Kind strings resolve to the right chip: the lite (inference) parts below their pod
    parts, PCIe below SXM, H200 the H100's compute die; unknown accelerators give no MFU
    (None), a CPU its measured matmul rate."""
    peak = lambda kind: flops.peak_flops_for(_device(kind))
    assert peak("TPU v5 lite") < peak("TPU v5") < peak("TPU v6 lite")
    assert peak("TPU v4") < peak("TPU v5")
    assert peak("NVIDIA H100 PCIe") < peak("NVIDIA H100 80GB HBM3") == peak("NVIDIA H200")
    assert peak("NVIDIA A100-SXM4-80GB") < peak("NVIDIA H100 PCIe")
    assert peak("Some NPU") is None
    with pytest.raises(ValueError, match="step_seconds"):
        flops.mfu(1.0, 0.0, 1, 1.0)
    cpu = flops.peak_flops_for(jax.devices("cpu")[0])
    assert cpu == flops.measure_cpu_matmul_peak() and 1e8 < cpu < 1e14


def test_traced_count_equals_a_hand_count_of_a_tiny_model():
    """The counting rules on a tiny model whose products are counted by hand: 2*M*N*K per
    matmul, attention over the full score matrix under a causal mask, element-wise work
    (gelu, bias, softmax, mask) free, a scan `length` times its body, a conv only over the
    taps that land on the input (zero padding free), a while loop's body once with a warning."""
    b, s, d, f, h = 2, 8, 16, 32, 4
    hd = d // h
    x = jnp.ones((b, s, d))
    w1, w2, wq = jnp.ones((d, f)), jnp.ones((f, d)), jnp.ones((d, d))
    causal = jnp.tril(jnp.ones((s, s), bool))

    def model(x, w1, w2, wq):
        y = jax.nn.gelu(x @ w1 + 1.0) @ w2
        q = (y @ wq).reshape(b, s, h, hd)
        scores = jnp.where(causal, jnp.einsum("bqhd,bkhd->bhqk", q, q), -1e9)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores), q)

    hand = 2 * b * s * d * f + 2 * b * s * f * d + 2 * b * s * d * d + 2 * (2 * b * h * s * s * hd)
    assert flops.traced_matmul_flops(model, x, w1, w2, wq) == hand

    layers = jnp.ones((3, d, d))
    stacked = lambda x, ws: jax.lax.scan(lambda c, w: (c @ w, None), x, ws)[0]
    assert flops.traced_matmul_flops(stacked, x, layers) == 3 * 2 * b * s * d * d

    c_in, c_out, length, k = 3, 5, 10, 3
    signal, kernel = jnp.ones((b, c_in, length)), jnp.ones((c_out, c_in, k))
    conv = lambda a, w: jax.lax.conv_general_dilated(a, w, (1,), [(1, 1)])
    # every output position reads k taps but the two edge positions, each missing one
    assert flops.traced_matmul_flops(conv, signal, kernel) == 2 * b * c_in * c_out * (k * length - 2)

    loop = lambda x, n: jax.lax.while_loop(lambda c: c[1] < n, lambda c: (c[0] @ wq, c[1] + 1), (x, 0))[0]
    with pytest.warns(UserWarning, match="while loop"):
        assert flops.traced_matmul_flops(loop, x, 5) == 2 * b * s * d * d


@pytest.mark.parametrize("remat", ["dots", "full", "save_attn_proj"])
def test_remat_recompute(remat):
    """`dots` recomputes exactly the attention products, `save_attn_proj` exactly the scores
    QK^T, the output projection and the MLP's gate / up matmuls; `full` is an upper bound
    (JAX does not recompute products whose outputs the backward never reads)."""
    cfg = get_config("tiny").replace(remat=remat)
    b, t = 2, 32
    model = Qwen25VL(cfg)
    mask = jnp.ones((b, t), jnp.int32)
    pos = jnp.asarray(text_position_ids(np.ones((b, t))))
    params = abstract(model, jnp.zeros((b, t), jnp.int32), pos, mask)
    loss = lambda e, p: jnp.sum(model.apply({"params": p}, e, pos, mask, method=model.decode) ** 2)
    traced = flops.traced_matmul_flops(
        jax.grad(loss, argnums=(0, 1)), jax.ShapeDtypeStruct((b, t, cfg.text.hidden_size), jnp.float32), params
    )
    fwd = flops.decoder_flops(cfg, b, t, with_lm_head=False)
    step = flops.train_step_flops([flops.Part("llm", fwd, weight_grads=True, remat=remat)])
    assert step["total"] == 3 * fwd.total
    if remat == "dots":
        assert traced == step["hardware_total"] == step["total"] + fwd.pair_total
    elif remat == "save_attn_proj":
        again = fwd.select(["gate_proj/kernel$", "up_proj/kernel$", "o_proj/kernel$"])
        assert again > 0 and traced == step["hardware_total"] == step["total"] + fwd.pair_total // 2 + again
    else:
        assert step["total"] + fwd.pair_total < traced < step["hardware_total"] == 4 * fwd.total
