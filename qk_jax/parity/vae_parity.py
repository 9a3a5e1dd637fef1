"""Per-stage parity of our VAEs against diffusers' `AutoencoderKL` / `AutoencoderKLQwenImage`.

Used by `qk-jax parity vae|qwen_image_vae` and the tests (`vae_parity` in-process). The
checkpoint's config.json decides every size. Rows: each encoder down block and the mid
block, the posterior mean and log-variance, our normalised latents (vs diffusers' mean
normalised the way the pipelines do), each decoder stage and the decoded image (both
decoding diffusers' posterior mean, so stages are compared on identical inputs), and the
full round trip decode(encode(x)) run independently on each side.
"""

from __future__ import annotations

import gc
import re

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.convert import diffusers_io
from qk_jax.convert.diffusers_configs import from_diffusers
from qk_jax.models.vae import build_vae
from qk_jax.models.vae.kl import AutoencoderKLConfig
from qk_jax.models.vae.wan import QwenImageVAEConfig
from qk_jax.parity.report import ParityReport, low_memory_loading

_STAGE = re.compile(r"^(down_blocks_\d+|mid_block|up_blocks_\d+)$")


def _nhwc(t) -> np.ndarray:
    x = t.detach().float().numpy()
    if x.ndim == 5:  # (B, C, T, H, W) video layout: one frame
        x = x[:, :, 0]
    return np.transpose(x, (0, 2, 3, 1))


def _torch_stages(model, store: dict) -> list:
    handles = []
    for part in ("encoder", "decoder"):
        mod = getattr(model, part)
        named = [(f"{part}/mid_block", mod.mid_block)]
        blocks = mod.down_blocks if part == "encoder" else mod.up_blocks
        named += [(f"{part}/{'down' if part == 'encoder' else 'up'}_blocks_{i}", b) for i, b in enumerate(blocks)]
        for name, m in named:

            def hook(_m, _i, out, name=name):
                store[name] = _nhwc(out)

            handles.append(m.register_forward_hook(hook))
    return handles


def _our_stages(state: dict) -> dict[str, np.ndarray]:
    out = {}
    for part, tree in state.get("intermediates", {}).items():
        for name, sub in tree.items():
            if _STAGE.match(name):
                out[f"{part}/{name}"] = np.asarray(sub["__call__"][0])
    return out


def _order(name: str) -> tuple:
    part, stage = name.split("/")
    idx = int(stage.rsplit("_", 1)[1]) if stage != "mid_block" else -1
    if part == "encoder":
        return (0, idx if stage != "mid_block" else 1 << 30)
    return (1, idx)


def _run_ours(config, params, images: np.ndarray, ref_mean: np.ndarray):
    """Our posterior, normalised latents, decoder stages on diffusers' mean, and round trip."""
    vae = build_vae(config)
    capture = lambda mdl, method: bool(_STAGE.match(mdl.name or ""))
    enc = jax.jit(
        lambda p, im: vae.apply(
            {"params": p}, im, method=vae.encode_moments, capture_intermediates=capture, mutable=["intermediates"]
        )
    )
    dec = jax.jit(
        lambda p, z: vae.apply(
            {"params": p}, z, method=vae.decode_raw, capture_intermediates=capture, mutable=["intermediates"]
        )
    )
    normalised = jax.jit(lambda p, im: vae.apply({"params": p}, im, method=vae.encode))(params, jnp.asarray(images))
    (mean, logvar), enc_state = enc(params, jnp.asarray(images))
    image, dec_state = dec(params, jnp.asarray(ref_mean))
    round_trip = dec(params, mean)[0]
    stages = {**_our_stages(enc_state), **_our_stages(dec_state)}
    return mean, logvar, normalised, image, round_trip, stages


def vae_parity(
    checkpoint,
    kind: str,
    *,
    batch: int = 1,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
    tolerance: float = 1e-4,
    stream=None,
) -> ParityReport:
    """`kind`: "kl" (AutoencoderKL) or "qwen_image" (AutoencoderKLQwenImage). Returns the filled report."""
    import torch
    from diffusers import AutoencoderKL as TorchKL
    from diffusers import AutoencoderKLQwenImage as TorchQwen

    from qk_jax.convert import vae_kl, vae_qwen_image

    folder = diffusers_io.model_folder(checkpoint, "vae")
    raw = diffusers_io.read_config(folder)
    if kind == "kl":
        config = from_diffusers(AutoencoderKLConfig, raw)
        cls, conv, video = TorchKL, vae_kl, False
    elif kind == "qwen_image":
        config = from_diffusers(QwenImageVAEConfig, raw)
        cls, conv, video = TorchQwen, vae_qwen_image, True
    else:
        raise ValueError(f"vae_parity: unknown kind {kind!r}; use 'kl' or 'qwen_image'")
    f = config.downsample_factor
    if height % f or width % f:
        raise ValueError(f"image size {height}x{width} must be a multiple of the VAE's downsampling factor {f}")
    rng = np.random.default_rng(seed)
    images = np.tanh(rng.standard_normal((batch, height, width, 3)) * 0.7).astype(np.float32)

    # ---- diffusers
    model = cls.from_pretrained(folder, torch_dtype=torch.float32, low_cpu_mem_usage=low_memory_loading()).eval()
    x = torch.from_numpy(np.transpose(images, (0, 3, 1, 2)).copy())
    if video:
        x = x[:, :, None]
    ref: dict[str, np.ndarray] = {}
    handles = _torch_stages(model, ref)
    with torch.no_grad():
        post = model.encode(x).latent_dist
        mean_t, logvar_t = post.mean, post.logvar
        ref["image"] = _nhwc(model.decode(mean_t).sample)
    for h in handles:
        h.remove()
    ref_mean, ref_logvar = _nhwc(mean_t), _nhwc(logvar_t)
    del model, post
    gc.collect()

    # ---- ours
    _, params = conv.load(folder)
    with jax.default_matmul_precision("highest"):  # parity is always in full float32
        mean, logvar, normalised, image, round_trip, ours = _run_ours(config, params, images, ref_mean)
    ref_norm = np.asarray(config.normalize(jnp.asarray(ref_mean)))

    title = (
        f"{cls.__name__} parity: {folder} ({type(config).__name__}); batch {batch}, {height}x{width} images, "
        f"{f}x downsampling"
    )
    report = ParityReport(title, stream=stream)
    for name in sorted(set(ref) - {"image"}, key=_order):
        if name.startswith("encoder"):
            report.add(name, ours[name], ref[name], tolerance)
    report.add("posterior mean", mean, ref_mean, tolerance)
    report.add("posterior logvar", logvar, ref_logvar, tolerance)
    report.add("normalised latents (encode)", normalised, ref_norm, tolerance)
    for name in sorted(set(ref) - {"image"}, key=_order):
        if name.startswith("decoder"):
            report.add(name, ours[name], ref[name], tolerance)
    report.add("decoded image", image, ref["image"], tolerance)
    report.add("round trip decode(encode(x))", round_trip, ref["image"], tolerance)
    return report
