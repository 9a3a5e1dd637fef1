"""`MMDiT`: the rectified-flow multimodal diffusion transformer (Qwen-Image / FLUX by config).

    v = MMDiT(config).apply({"params": p}, img, img_ids, txt, txt_mask, timestep,
                            guidance=None, pooled=None, txt_ids=None, num_target_tokens=None)

- `img` (B, N, C_in): patchified latent tokens (`positions.patchify`). The image stream
  may hold several segments — the noisy target first, then condition images — each with
  its own position ids in `img_ids` (B, N, 3) (`positions.segment_ids`).
- `txt` (B, T, joint_attention_dim) condition tokens with `txt_mask` (B, T) bool (True =
  real token; padded keys are masked out of every attention).
- `timestep` (B,) in [0, 1]: the flow sigma (see `config.py` for the mapping to each
  diffusers model); `guidance` (B,) the FLUX guidance scale; `pooled` (B, P) FLUX's pooled
  text vector; `txt_ids` (B, T, 3) or None for the family default.
- `num_target_tokens` (static int): only the first that many image tokens are projected
  out (the target segment), as Qwen-Image-Edit and FLUX.1-Kontext slice their output.

Returns the predicted velocity (B, N_target, patch_size**2 * out_channels); with
`return_intermediates=True` also a dict of per-block outputs (for parity tools).

Parameters (under `dit/` or `head/` in the full model): img_in (after img_in_bottleneck with
`config.patch_bottleneck`), txt_norm (qwen_image),
txt_in, time_embed, guidance_embed, pooled_embed, addition_t_embed, double_blocks,
single_blocks (scanned, leading `layers` axis), norm_out, proj_out; cell_stem and cell_head
with `config.cell_conv_width` (`cell_conv.py`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models import layers
from qk_jax.models.mmdit.blocks import DoubleStreamBlock, MLPEmbedder, SingleStreamBlock, timestep_sinusoid
from qk_jax.models.mmdit.cell_conv import CellHead, CellStem
from qk_jax.models.mmdit.config import MMDiTConfig
from qk_jax.models.mmdit.positions import absolute_embedding, default_txt_ids, grid_neighbours, rope_angles

Array = jax.Array


class MMDiT(nn.Module):
    """Rectified-flow MMDiT; see the module docstring for the call signature and shapes."""

    config: MMDiTConfig

    @nn.compact
    def __call__(
        self,
        img: Array,
        img_ids: Array,
        txt: Array,
        txt_mask: Array | None,
        timestep: Array,
        guidance: Array | None = None,
        pooled: Array | None = None,
        txt_ids: Array | None = None,
        num_target_tokens: int | None = None,
        additional_t_cond: Array | None = None,
        return_intermediates: bool = False,
    ):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        kw = dict(dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype))
        b, n, c_in = img.shape
        t_len = txt.shape[1]
        self._check_inputs(
            img, img_ids, txt, txt_mask, timestep, guidance, pooled, txt_ids, num_target_tokens, additional_t_cond
        )
        n_target = n if num_target_tokens is None else int(num_target_tokens)

        # ---- embeddings
        x = img
        if cfg.patch_bottleneck:
            x = layers.Dense(cfg.patch_bottleneck, axes=("in_channels", None), name="img_in_bottleneck", **kw)(x)
        x = layers.Dense(cfg.inner_dim, axes=("in_channels", "embed"), name="img_in", **kw)(x)
        if cfg.local_mixing or cfg.cell_conv_width:
            neighbours = grid_neighbours(img_ids, n_target)
        if cfg.cell_conv_width:
            target_cells = tuple(a[:, :n_target] for a in neighbours)
            stem, skip = CellStem(cfg.cell_conv_width, cfg.inner_dim, cfg.patch_size, name="cell_stem", **kw)(
                img[:, :n_target], *target_cells
            )
            x = jnp.concatenate([x[:, :n_target] + stem, x[:, n_target:]], axis=1)
        if cfg.absolute_positions:
            x = x + absolute_embedding(img_ids, cfg.inner_dim).astype(dtype)
        c = txt
        if cfg.family == "qwen_image":
            c = layers.RMSNorm(eps=1e-6, axis_name="cond_embed", name="txt_norm", **kw)(c)
        c = layers.Dense(cfg.inner_dim, axes=("cond_embed", "embed"), name="txt_in", **kw)(c)
        x = layers.constrain(x, ("act_batch", "act_length", "act_embed"))
        c = layers.constrain(c, ("act_batch", "act_length", "act_embed"))

        time_embed = MLPEmbedder(cfg.inner_dim, name="time_embed", **kw)
        extra = jnp.zeros((b, cfg.inner_dim), dtype)
        if cfg.guidance_embeds:
            extra = extra + MLPEmbedder(cfg.inner_dim, name="guidance_embed", **kw)(
                timestep_sinusoid(guidance, cfg.family).astype(dtype)
            )
        if cfg.pooled_projection_dim:
            extra = extra + MLPEmbedder(cfg.inner_dim, name="pooled_embed", **kw)(pooled.astype(dtype))
        if cfg.use_additional_t_cond:
            table = self.param(
                "addition_t_embed",
                layers.logical(nn.initializers.normal(1.0), (None, "embed")),
                (2, cfg.inner_dim),
                jnp.dtype(cfg.param_dtype),
            )
            extra = extra + jnp.take(table, additional_t_cond.astype(jnp.int32), axis=0).astype(dtype)
        vec = time_embed(timestep_sinusoid(timestep, cfg.family).astype(dtype)) + extra

        ctx: dict[str, Array] = {"vec": vec}
        if cfg.zero_cond_t and n_target < n:
            # Qwen-Image-Edit-2511: condition segments are modulated as if clean (t = 0).
            ctx["vec0"] = time_embed(timestep_sinusoid(jnp.zeros_like(timestep), cfg.family).astype(dtype)) + extra
            is_cond = jnp.broadcast_to(jnp.arange(n) >= n_target, (b, n))
            ctx["is_cond_img"] = is_cond
            ctx["is_cond_joint"] = jnp.concatenate([jnp.zeros((b, t_len), bool), is_cond], axis=1)

        # ---- positions and mask over the joint [txt ; img] sequence
        if txt_ids is None:
            txt_ids = default_txt_ids(img_ids, t_len, cfg.txt_id_scheme)
        ids = jnp.concatenate([txt_ids.astype(jnp.float32), img_ids.astype(jnp.float32)], axis=1)
        angles = rope_angles(ids, cfg.axes_dims_rope, cfg.rope_theta)
        ctx["cos"], ctx["sin"] = jnp.cos(angles), jnp.sin(angles)
        if txt_mask is not None:
            keys = jnp.concatenate([txt_mask.astype(bool), jnp.ones((b, n), bool)], axis=1)
            ctx["mask"] = layers.SegmentMask.key_padding(keys)

        if cfg.local_mixing:
            ctx["neighbours"] = neighbours

        inter: dict[str, Any] = {}
        if cfg.num_layers:
            (x, c), ys = layers.scan_layers(DoubleStreamBlock, cfg.num_layers, cfg.remat, in_axes=(nn.broadcast,))(
                cfg, emit=return_intermediates, name="double_blocks"
            )((x, c), ctx)
            if return_intermediates:
                inter["double_img"], inter["double_txt"] = ys
        if cfg.num_single_layers:
            h, ys = layers.scan_layers(SingleStreamBlock, cfg.num_single_layers, cfg.remat, in_axes=(nn.broadcast,))(
                cfg, emit=return_intermediates, name="single_blocks"
            )(jnp.concatenate([c, x], axis=1), ctx)
            if return_intermediates:
                inter["single"] = ys
            x = h[:, t_len:]

        # ---- output: target tokens only
        x = x[:, :n_target]
        scale, shift = jnp.split(
            layers.Dense(2 * cfg.inner_dim, axes=("embed", "modulation"), name="norm_out", **kw)(nn.silu(vec)), 2, -1
        )
        x = layers.LayerNorm(eps=1e-6, use_scale=False, use_bias=False, dtype=dtype)(x)
        x = x * (1 + scale[:, None]) + shift[:, None]
        out = layers.Dense(cfg.out_features, axes=("embed", "out_channels"), name="proj_out", **kw)(x)
        if cfg.cell_conv_width:
            out_channels = cfg.out_features // cfg.patch_size**2
            head = CellHead(cfg.cell_conv_width, out_channels, cfg.patch_size, name="cell_head", **kw)
            out = out + head(x, skip, *target_cells)
        return (out, inter) if return_intermediates else out

    def _check_inputs(
        self, img, img_ids, txt, txt_mask, timestep, guidance, pooled, txt_ids, num_target_tokens, additional_t_cond
    ):
        cfg = self.config
        b, n, c_in = img.shape
        if c_in != cfg.in_channels:
            raise ValueError(f"MMDiT: img has {c_in} features per token, config.in_channels={cfg.in_channels}")
        if img_ids.shape != (b, n, 3):
            raise ValueError(f"MMDiT: img_ids shape {img_ids.shape}, expected {(b, n, 3)}")
        if txt.ndim != 3 or txt.shape[0] != b or txt.shape[2] != cfg.joint_attention_dim:
            raise ValueError(
                f"MMDiT: txt shape {txt.shape}, expected (B={b}, T, joint_attention_dim={cfg.joint_attention_dim})"
            )
        if txt_mask is not None and txt_mask.shape != txt.shape[:2]:
            raise ValueError(f"MMDiT: txt_mask shape {txt_mask.shape}, expected {txt.shape[:2]}")
        if txt_ids is not None and txt_ids.shape != (b, txt.shape[1], 3):
            raise ValueError(f"MMDiT: txt_ids shape {txt_ids.shape}, expected {(b, txt.shape[1], 3)}")
        if timestep.shape != (b,):
            raise ValueError(f"MMDiT: timestep shape {timestep.shape}, expected ({b},) values in [0, 1]")
        if cfg.guidance_embeds and (guidance is None or guidance.shape != (b,)):
            raise ValueError(f"MMDiT: config.guidance_embeds=True needs guidance of shape ({b},) (the guidance scale)")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("MMDiT: guidance was passed but config.guidance_embeds=False")
        if cfg.pooled_projection_dim and (pooled is None or pooled.shape != (b, cfg.pooled_projection_dim)):
            raise ValueError(
                f"MMDiT: config.pooled_projection_dim={cfg.pooled_projection_dim} needs pooled of shape "
                f"({b}, {cfg.pooled_projection_dim}), got {None if pooled is None else pooled.shape}"
            )
        if not cfg.pooled_projection_dim and pooled is not None:
            raise ValueError("MMDiT: pooled was passed but config.pooled_projection_dim is unset")
        if cfg.use_additional_t_cond and (additional_t_cond is None or additional_t_cond.shape != (b,)):
            raise ValueError(f"MMDiT: config.use_additional_t_cond=True needs additional_t_cond of shape ({b},)")
        if num_target_tokens is not None and not 0 < int(num_target_tokens) <= n:
            raise ValueError(f"MMDiT: num_target_tokens={num_target_tokens} must be in [1, {n}]")


def dummy_inputs(config: MMDiTConfig, batch: int = 1, n: int = 4, t: int = 3) -> dict[str, Array]:
    """Smallest valid inputs (for `init` / `jax.eval_shape`); parameter shapes do not depend on them."""
    out = dict(
        img=jnp.zeros((batch, n, config.in_channels)),
        img_ids=jnp.zeros((batch, n, 3)),
        txt=jnp.zeros((batch, t, config.joint_attention_dim)),
        txt_mask=jnp.ones((batch, t), bool),
        timestep=jnp.full((batch,), 0.5),
    )
    if config.guidance_embeds:
        out["guidance"] = jnp.full((batch,), 3.5)
    if config.pooled_projection_dim:
        out["pooled"] = jnp.zeros((batch, config.pooled_projection_dim))
    if config.use_additional_t_cond:
        out["additional_t_cond"] = jnp.zeros((batch,), jnp.int32)
    return out


def init_params(config: MMDiTConfig, rng: Array) -> Any:
    """Boxed (logically partitioned) parameters of `MMDiT(config)`; use with `sharding.init_sharded`."""
    return MMDiT(config).init(rng, **dummy_inputs(config))["params"]


def abstract_params(config: MMDiTConfig) -> Any:
    """Unboxed `ShapeDtypeStruct` tree of the parameters, without allocating anything."""
    return nn.meta.unbox(jax.eval_shape(lambda: init_params(config, jax.random.key(0))))


def param_count(config: MMDiTConfig) -> int:
    """Number of parameters of `MMDiT(config)` by `jax.eval_shape` (no allocation)."""
    return int(sum(x.size for x in jax.tree.leaves(abstract_params(config))))
