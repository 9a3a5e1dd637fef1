"""Both VAEs against diffusers (tiny, float32): encode (mean and sample), decode, round trip, sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchKL
from diffusers import AutoencoderKLQwenImage as TorchQwen

from dit_testing import KL_TINY, QWEN_VAE_TINY, rel_err, save_tiny, t
from qk_jax.convert import vae_kl, vae_qwen_image
from qk_jax.convert.diffusers_configs import from_diffusers, to_diffusers
from qk_jax.models.vae import build_vae, vae_config, vae_param_count
from qk_jax.models.vae.kl import AutoencoderKLConfig
from qk_jax.models.vae.wan import QwenImageVAEConfig

TOL = 1e-4


def _images(seed=0, b=2, h=16, w=24):
    return np.tanh(np.random.default_rng(seed).standard_normal((b, h, w, 3))).astype(np.float32)


@pytest.fixture(scope="module")
def kl(tmp_path_factory):
    path = tmp_path_factory.mktemp("kl_vae")
    model = save_tiny(TorchKL, path, KL_TINY, norms_only=True)
    config, params = vae_kl.load(path)
    return model, config, params


@pytest.fixture(scope="module")
def qwen_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_vae")
    model = save_tiny(TorchQwen, path, QWEN_VAE_TINY, norms_only=True)
    config, params = vae_qwen_image.load(path)
    return model, config, params


def _check(model, config, params, video: bool, normalize, denormalize):
    x = _images()
    vae = build_vae(config)
    xt = t(np.transpose(x, (0, 3, 1, 2)).copy())
    if video:
        xt = xt[:, :, None]
    frame = (lambda a: a[:, :, 0]) if video else (lambda a: a)
    nhwc = lambda a: np.transpose(frame(a.numpy()), (0, 2, 3, 1))
    with torch.no_grad():
        post = model.encode(xt).latent_dist
        ref_z = normalize(post.mean)
        ref_img = model.decode(denormalize(ref_z)).sample
    key = jax.random.key(3)

    @jax.jit  # one compile for every path
    def run(p, im, z_ref):
        call = lambda *a, method: vae.apply({"params": p}, *a, method=method)
        z = call(im, method=vae.encode)
        mean, logvar = call(im, method=vae.encode_moments)
        return dict(
            z=z,
            dec_ref=call(z_ref, method=vae.decode),
            round_trip=call(z, method=vae.decode),
            sampled=vae.apply({"params": p}, im, True, key, method=vae.encode),
            mean=mean,
            logvar=logvar,
            saturated=call(jnp.full_like(z_ref, 50.0), method=vae.decode),
        )

    out = run(params, x, jnp.asarray(nhwc(ref_z)))
    z = out["z"]
    assert z.shape == (2, 16 // config.downsample_factor, 24 // config.downsample_factor, nhwc(ref_z).shape[-1])
    assert rel_err(z, nhwc(ref_z)) < TOL
    assert rel_err(out["dec_ref"], nhwc(ref_img)) < TOL
    assert rel_err(out["round_trip"], nhwc(ref_img)) < TOL  # round trip, each side on its own
    # sampling: mean + std * N(0, 1) from the given key, then normalised
    manual = config.normalize(out["mean"] + jnp.exp(0.5 * out["logvar"]) * jax.random.normal(key, z.shape))
    np.testing.assert_allclose(np.asarray(out["sampled"]), np.asarray(manual), rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(out["sampled"] - z).max()) > 1e-3
    with pytest.raises(ValueError, match="rng"):
        jax.eval_shape(lambda p: vae.apply({"params": p}, x, True, method=vae.encode), params)
    return out


@pytest.mark.slow  # parity against diffusers
def test_autoencoder_kl_matches_diffusers(kl):
    model, config, params = kl
    assert config.shift_factor == 0.11 and not config.use_quant_conv
    _check(model, config, params, False, lambda z: (z - 0.11) * 0.36, lambda z: z / 0.36 + 0.11)


@pytest.mark.slow  # parity against diffusers
def test_qwen_image_vae_matches_diffusers(qwen_vae):
    model, config, params = qwen_vae
    mean = torch.tensor(QWEN_VAE_TINY["latents_mean"]).view(1, 4, 1, 1, 1)
    std = torch.tensor(QWEN_VAE_TINY["latents_std"]).view(1, 4, 1, 1, 1)
    # the Qwen-Image pipelines' arithmetic: (z - mean) / std, and z / (1 / std) + mean
    out = _check(model, config, params, True, lambda z: (z - mean) / std, lambda z: z / (1.0 / std) + mean)
    assert float(jnp.abs(out["saturated"]).max()) <= 1.0  # decode clamps to [-1, 1] like diffusers


def test_vae_configs():
    for cfg in (vae_config("flux"), vae_config("tiny"), vae_config("qwen_image"), vae_config("qwen_image_tiny")):
        assert from_diffusers(type(cfg), to_diffusers(cfg)) == cfg
    kl_real = {k: v for k, v in to_diffusers(vae_config("flux")).items() if not k.startswith("_")}
    q_real = {k: v for k, v in to_diffusers(vae_config("qwen_image")).items() if not k.startswith("_")}
    with torch.device("meta"):
        n_kl = sum(p.numel() for p in TorchKL(**kl_real).parameters())
        n_q = sum(p.numel() for p in TorchQwen(**q_real).parameters())
    assert vae_param_count(vae_config("flux")) == n_kl
    assert vae_param_count(vae_config("qwen_image")) == n_q
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        from_diffusers(AutoencoderKLConfig, {"block_out_channels": [32], "down_block_types": ["AttnDown"]})
    with pytest.raises(ValueError, match="temperal_downsample"):
        QwenImageVAEConfig(dim_mult=(1, 2), temperal_downsample=(True, True))


def test_logical_axes_covered_by_vae_rules():
    import flax.linen as nn

    from qk_jax import sharding

    known = {name for name, _ in sharding.VAE_RULES}
    for name in ("tiny", "qwen_image_tiny"):
        vae = build_vae(vae_config(name))
        boxed = jax.eval_shape(lambda: vae.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])
        specs = nn.get_partition_spec(boxed)
        used = {
            a
            for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
            for a in s
            if a
        }
        assert used and used <= known, used - known


# --------------------------------------------------------------- the pixel-space autoencoder


def _blocks_dct(images: np.ndarray, f: int, k: int) -> np.ndarray:
    """scipy's orthonormal 2-D DCT-II of every f x f block and colour, its k x k lowest
    frequencies: (B, H/f, W/f, k, k, 3)."""
    from scipy.fft import dctn

    b, h, w, c = images.shape
    blocks = images.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return dctn(blocks, type=2, norm="ortho", axes=(3, 4))[:, :, :, :k, :k]


def test_pixel_autoencoder_dct_code_matches_scipy():
    """`keep` = k stores each block's k x k lowest DCT frequencies (scipy's orthonormal DCT-II),
    ordered (ky, kx, colour); decode is scipy's inverse DCT with the others zero; k = f is lossless
    and k = 0 the plain space-to-depth."""
    from scipy.fft import idctn

    from qk_jax.models.vae.pixel import PixelSpaceAutoencoder, PixelSpaceConfig

    images = _images(b=2, h=16, w=24)
    for f, k in [(8, 4), (4, 2), (8, 8)]:
        model = PixelSpaceAutoencoder(PixelSpaceConfig(factor=f, keep=k))
        code = np.asarray(model.apply({}, jnp.asarray(images), method=model.encode))
        want = _blocks_dct(images, f, k)
        assert code.shape == (2, 16 // f, 24 // f, 3 * k * k) == (*want.shape[:3], model.config.latent_channels)
        np.testing.assert_allclose(code, want.reshape(code.shape), atol=2e-5)
        decoded = np.asarray(model.apply({}, jnp.asarray(code), method=model.decode))
        full = np.zeros((*want.shape[:3], f, f, 3), np.float32)
        full[:, :, :, :k, :k] = want
        blocks = idctn(full, type=2, norm="ortho", axes=(3, 4))  # (B, h, w, dy, dx, C)
        low_passed = blocks.transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)
        np.testing.assert_allclose(decoded, low_passed, atol=2e-5)
        if k == f:
            np.testing.assert_allclose(decoded, images, atol=2e-5)
    plain = PixelSpaceAutoencoder(PixelSpaceConfig(factor=4))
    code = np.asarray(plain.apply({}, jnp.asarray(images), method=plain.encode))
    want = images.reshape(2, 4, 4, 6, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 6, 48)
    np.testing.assert_array_equal(code, want)
    with pytest.raises(ValueError, match="keep=5"):
        PixelSpaceConfig(factor=4, keep=5)
