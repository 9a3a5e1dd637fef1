"""Forward FLOPs of the VAEs' encoders and decoders: `AutoencoderKL`, `AutoencoderKLQwenImage`
(one frame) and the parameter-free pixel-space autoencoder. Each mirrors the module's
layer walk; convolutions count the taps that read real input (see `qk_jax.flops`)."""

from __future__ import annotations

from typing import Any

from qk_jax.flops.count import MatmulFlops, _Counter, _positive
from qk_jax.models.vae.kl import AutoencoderKLConfig
from qk_jax.models.vae.pixel import PixelSpaceConfig
from qk_jax.models.vae.wan import QwenImageVAEConfig


def _kl_resnet(c: _Counter, path: str, b: int, h: int, w: int, c_in: int, c_out: int) -> int:
    c.conv(f"{path}/conv1", b, h, w, c_in, c_out)
    c.conv(f"{path}/conv2", b, h, w, c_out, c_out)
    if c_in != c_out:
        c.conv(f"{path}/conv_shortcut", b, h, w, c_in, c_out, k=1)
    return c_out


def _spatial_attention(c: _Counter, path: str, b: int, h: int, w: int, ch: int, wan: bool) -> None:
    """The VAEs' single-head mid-block attention over all h*w pixels."""
    if wan:  # 1x1 conv to q, k, v at once; 1x1 output conv
        c.conv(f"{path}/to_qkv", b, h, w, ch, 3 * ch, k=1)
        c.conv(f"{path}/proj", b, h, w, ch, ch, k=1)
    else:
        for name in ("to_q", "to_k", "to_v", "to_out_0"):
            c.dense(f"{path}/{name}", b * h * w, ch, ch)
    c.attention(f"{path}/attention", b, h * w, h * w, ch)


def _kl_mid(c: _Counter, path: str, b: int, h: int, w: int, ch: int, attention: bool) -> None:
    _kl_resnet(c, f"{path}/resnets_0", b, h, w, ch, ch)
    if attention:
        _spatial_attention(c, f"{path}/attentions_0", b, h, w, ch, wan=False)
    _kl_resnet(c, f"{path}/resnets_1", b, h, w, ch, ch)


def _kl_encode(cfg: AutoencoderKLConfig, b: int, h: int, w: int) -> MatmulFlops:
    c = _Counter()
    chans = cfg.block_out_channels
    ch = chans[0]
    h, w = c.conv("encoder/conv_in", b, h, w, cfg.in_channels, ch)
    for i, out in enumerate(chans):
        for j in range(cfg.layers_per_block):
            ch = _kl_resnet(c, f"encoder/down_blocks_{i}/resnets_{j}", b, h, w, ch, out)
        if i < len(chans) - 1:
            h, w = c.conv(f"encoder/down_blocks_{i}/downsamplers_0/conv", b, h, w, ch, ch, stride=2, pad=(0, 1))
    _kl_mid(c, "encoder/mid_block", b, h, w, ch, cfg.mid_block_add_attention)
    c.conv("encoder/conv_out", b, h, w, ch, 2 * cfg.latent_channels)
    if cfg.use_quant_conv:
        c.conv("quant_conv", b, h, w, 2 * cfg.latent_channels, 2 * cfg.latent_channels, k=1)
    return c.result()


def _kl_decode(cfg: AutoencoderKLConfig, b: int, h: int, w: int) -> MatmulFlops:
    c = _Counter()
    chans = list(reversed(cfg.block_out_channels))
    if cfg.use_post_quant_conv:
        c.conv("post_quant_conv", b, h, w, cfg.latent_channels, cfg.latent_channels, k=1)
    ch = chans[0]
    c.conv("decoder/conv_in", b, h, w, cfg.latent_channels, ch)
    _kl_mid(c, "decoder/mid_block", b, h, w, ch, cfg.mid_block_add_attention)
    for i, out in enumerate(chans):
        for j in range(cfg.layers_per_block + 1):
            ch = _kl_resnet(c, f"decoder/up_blocks_{i}/resnets_{j}", b, h, w, ch, out)
        if i < len(chans) - 1:
            h, w = 2 * h, 2 * w  # nearest upsampling, then a 3x3 conv
            c.conv(f"decoder/up_blocks_{i}/upsamplers_0/conv", b, h, w, ch, ch)
    c.conv("decoder/conv_out", b, h, w, ch, cfg.out_channels)
    return c.result()


def _wan_mid(c: _Counter, path: str, b: int, h: int, w: int, ch: int) -> None:
    _kl_resnet(c, f"{path}/resnets_0", b, h, w, ch, ch)  # same three convs as a KL resnet
    _spatial_attention(c, f"{path}/attentions_0", b, h, w, ch, wan=True)
    _kl_resnet(c, f"{path}/resnets_1", b, h, w, ch, ch)


def _wan_encode(cfg: QwenImageVAEConfig, b: int, h: int, w: int) -> MatmulFlops:
    c = _Counter()
    dims = [cfg.base_dim * u for u in (1,) + cfg.dim_mult]
    ch = dims[0]
    h, w = c.conv("encoder/conv_in", b, h, w, cfg.input_channels, ch)
    k, scale = 0, 1.0
    for i, out in enumerate(dims[1:]):
        for _ in range(cfg.num_res_blocks):
            ch = _kl_resnet(c, f"encoder/down_blocks_{k}", b, h, w, ch, out)
            k += 1
            if scale in cfg.attn_scales:
                _spatial_attention(c, f"encoder/down_blocks_{k}", b, h, w, ch, wan=True)
                k += 1
        if i != len(cfg.dim_mult) - 1:
            h, w = c.conv(f"encoder/down_blocks_{k}/resample_1", b, h, w, ch, ch, stride=2, pad=(0, 1))
            k += 1
            scale /= 2.0
    _wan_mid(c, "encoder/mid_block", b, h, w, ch)
    c.conv("encoder/conv_out", b, h, w, ch, 2 * cfg.z_dim)
    c.conv("quant_conv", b, h, w, 2 * cfg.z_dim, 2 * cfg.z_dim, k=1)
    return c.result()


def _wan_decode(cfg: QwenImageVAEConfig, b: int, h: int, w: int) -> MatmulFlops:
    c = _Counter()
    dims = [cfg.base_dim * u for u in (cfg.dim_mult[-1],) + cfg.dim_mult[::-1]]
    c.conv("post_quant_conv", b, h, w, cfg.z_dim, cfg.z_dim, k=1)
    ch = dims[0]
    c.conv("decoder/conv_in", b, h, w, cfg.z_dim, ch)
    _wan_mid(c, "decoder/mid_block", b, h, w, ch)
    for i, out in enumerate(dims[1:]):
        for j in range(cfg.num_res_blocks + 1):
            ch = _kl_resnet(c, f"decoder/up_blocks_{i}/resnets_{j}", b, h, w, ch, out)
        if i != len(cfg.dim_mult) - 1:
            h, w = 2 * h, 2 * w  # nearest upsampling, then a 3x3 conv to half the channels
            c.conv(f"decoder/up_blocks_{i}/upsamplers_0/resample_1", b, h, w, ch, ch // 2)
            ch //= 2
    c.conv("decoder/conv_out", b, h, w, ch, cfg.input_channels)
    return c.result()


def _pixel_dct(cfg: PixelSpaceConfig, batch: int, h: int, w: int) -> MatmulFlops:
    """The pixel autoencoder on h x w blocks: a reshape (0) or, with `keep`, the separable DCT of
    each block and colour (one product with the k x f basis per axis; either direction)."""
    f, k = cfg.factor, cfg.keep
    if not k:
        return MatmulFlops()
    per_block = 2 * 3 * (k * f * f + k * k * f)
    return MatmulFlops(kernels={"dct_basis": batch * h * w * per_block})


_VAE_COUNTS = {
    AutoencoderKLConfig: (_kl_encode, _kl_decode),
    QwenImageVAEConfig: (_wan_encode, _wan_decode),
    PixelSpaceConfig: (lambda c, b, h, w: _pixel_dct(c, b, h // c.factor, w // c.factor), _pixel_dct),
}


def _vae_count(which: int, vae_cfg: Any, batch: int, height: int, width: int) -> MatmulFlops:
    counts = _VAE_COUNTS.get(type(vae_cfg))
    if counts is None:
        raise TypeError(
            f"VAE flops: not a VAE config: {type(vae_cfg).__name__} (expected one of "
            f"{sorted(t.__name__ for t in _VAE_COUNTS)})"
        )
    _positive(batch=batch, height=height, width=width)
    f = vae_cfg.downsample_factor
    if height % f or width % f:
        raise ValueError(f"VAE flops: image size {height}x{width} is not a multiple of the downsample factor {f}")
    if which == 0:
        return counts[0](vae_cfg, batch, height, width)
    return counts[1](vae_cfg, batch, height // f, width // f)


def vae_encode_flops(vae_cfg: Any, batch: int, height: int, width: int) -> MatmulFlops:
    """Forward of `encode` on (batch, height, width, 3) images, for `AutoencoderKLConfig`,
    `QwenImageVAEConfig` (one frame: each causal 3D conv is the 2D conv of its last tap)
    or `PixelSpaceConfig` (a reshape: 0; with `keep`, the blocks' DCT)."""
    return _vae_count(0, vae_cfg, batch, height, width)


def vae_decode_flops(vae_cfg: Any, batch: int, height: int, width: int) -> MatmulFlops:
    """Forward of `decode` to (batch, height, width, 3) images (latents are height/f x width/f)."""
    return _vae_count(1, vae_cfg, batch, height, width)
