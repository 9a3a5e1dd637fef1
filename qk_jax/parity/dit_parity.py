"""Per-block parity of our `MMDiT` against diffusers' Qwen-Image / FLUX transformers.

Used by `qk-jax parity qwen_image|flux` (flags in `parity/dit_tool.py`)
and by the tests, which call `mmdit_parity` in-process. The checkpoint's own config.json
decides every size, so any width, depth, head size, RoPE split or channel count works.

Inputs are random but exercise what matters: two samples with different text padding,
different timesteps, and `condition_segments` extra image segments after the target
(Qwen-Image-Edit's multi-`img_shapes` layout / FLUX.1-Kontext's frame-indexed ids); the
output compared is the target segment. Rows: every double block's image and text stream,
every single block's joint stream, the output — each error relative to that tensor's max
|value| (block outputs are cumulative, not isolated).
"""

from __future__ import annotations

import gc
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.convert import diffusers_io
from qk_jax.convert.diffusers_configs import from_diffusers, mmdit_class_name
from qk_jax.models.mmdit import MMDiT, MMDiTConfig
from qk_jax.models.mmdit import positions as pos
from qk_jax.parity.report import ParityReport, low_memory_loading


def _hooks(blocks, store: list) -> list:
    def hook(_module, _inputs, output):
        store.append(tuple(o.detach().float().numpy() for o in output))

    return [b.register_forward_hook(hook) for b in blocks]


def make_inputs(
    config: MMDiTConfig,
    *,
    batch: int,
    height: int,
    width: int,
    txt_len: int,
    pad: int,
    condition_segments: int,
    seed: int,
) -> dict[str, Any]:
    """Random inputs plus the matching diffusers keyword arguments (numpy, float32)."""
    rng = np.random.default_rng(seed)
    seg_hw = [(height, width)] + [(max(1, height - 2 * k), width + 2 * k) for k in range(1, condition_segments + 1)]
    n_target = height * width
    n = sum(h * w for h, w in seg_hw)
    img = rng.standard_normal((batch, n, config.in_channels)).astype(np.float32)
    txt = rng.standard_normal((batch, txt_len, config.joint_attention_dim)).astype(np.float32)
    mask = np.ones((batch, txt_len), bool)
    for b in range(batch):  # sample b has pad * b padded text tokens at the end (at least one real token)
        n_pad = min(pad * b, txt_len - 1)
        if n_pad:
            mask[b, txt_len - n_pad :] = False
    t = np.linspace(0.9, 0.2, batch).astype(np.float32)
    out: dict[str, Any] = dict(img=img, txt=txt, txt_mask=mask, timestep=t, n_target=n_target, seg_hw=seg_hw)
    if config.family == "qwen_image":
        shapes = [(1, h, w) for h, w in seg_hw]
        img_ids, txt_ids = pos.qwen_image_ids(shapes, txt_len, layer3d=config.use_layer3d_rope)
        out["img_shapes"] = [shapes] * batch
    else:
        img_ids, txt_ids = pos.flux_ids(seg_hw, txt_len)
        out["guidance"] = np.full((batch,), 3.5, np.float32) if config.guidance_embeds else None
        out["pooled"] = rng.standard_normal((batch, config.pooled_projection_dim)).astype(np.float32)
    if config.use_additional_t_cond:
        out["additional_t_cond"] = (np.arange(batch) % 2).astype(np.int64)
    out["img_ids_2d"], out["txt_ids_2d"] = img_ids, txt_ids
    out["img_ids"], out["txt_ids"] = pos.batch_ids(img_ids, batch), pos.batch_ids(txt_ids, batch)
    return out


def run_ours(config: MMDiTConfig, params: Any, inp: dict[str, Any]):
    model = MMDiT(config)
    kwargs = dict(
        guidance=inp.get("guidance"),
        pooled=inp.get("pooled"),
        txt_ids=inp["txt_ids"],
        additional_t_cond=inp.get("additional_t_cond"),
    )
    fn = jax.jit(
        lambda p, img, ids, txt, m, t, kw: model.apply(
            {"params": p}, img, ids, txt, m, t, num_target_tokens=inp["n_target"], return_intermediates=True, **kw
        )
    )
    kw = {k: None if v is None else jnp.asarray(v) for k, v in kwargs.items()}
    out, inter = fn(
        params,
        jnp.asarray(inp["img"]),
        jnp.asarray(inp["img_ids"]),
        jnp.asarray(inp["txt"]),
        jnp.asarray(inp["txt_mask"]),
        jnp.asarray(inp["timestep"]),
        kw,
    )
    return np.asarray(out), jax.tree.map(np.asarray, inter)


def run_reference(model, config: MMDiTConfig, inp: dict[str, Any]):
    """diffusers forward with hooks on every block: (output of the target tokens, double, single)."""
    import torch

    double, single = [], []
    handles = _hooks(model.transformer_blocks, double)
    if config.num_single_layers:
        handles += _hooks(model.single_transformer_blocks, single)
    T = lambda x: torch.from_numpy(np.asarray(x))
    try:
        with torch.no_grad():
            if config.family == "qwen_image":
                kw = {}
                if config.use_additional_t_cond:
                    kw["additional_t_cond"] = T(inp["additional_t_cond"])
                out = model(
                    hidden_states=T(inp["img"]),
                    encoder_hidden_states=T(inp["txt"]),
                    encoder_hidden_states_mask=T(inp["txt_mask"]),
                    timestep=T(inp["timestep"]),
                    img_shapes=inp["img_shapes"],
                    return_dict=False,
                    **kw,
                )[0]
            else:
                n = inp["img"].shape[1]
                keys = np.concatenate([inp["txt_mask"], np.ones((inp["img"].shape[0], n), bool)], axis=1)
                out = model(
                    hidden_states=T(inp["img"]),
                    encoder_hidden_states=T(inp["txt"]),
                    pooled_projections=T(inp["pooled"]),
                    timestep=T(inp["timestep"]),
                    img_ids=T(inp["img_ids_2d"]),
                    txt_ids=T(inp["txt_ids_2d"]),
                    guidance=None if inp.get("guidance") is None else T(inp["guidance"]),
                    joint_attention_kwargs={"attention_mask": T(keys)[:, None, None, :]},
                    return_dict=False,
                )[0]
    finally:
        for h in handles:
            h.remove()
    return out.float().numpy()[:, : inp["n_target"]], double, single


def compare(report: ParityReport, config: MMDiTConfig, ours, ref, tolerance: float) -> None:
    out, inter = ours
    ref_out, double, single = ref
    for i, (txt, img) in enumerate(double):  # diffusers blocks return (encoder_hidden_states, hidden_states)
        report.add(f"double_block_{i}/img", inter["double_img"][i], img, tolerance)
        report.add(f"double_block_{i}/txt", inter["double_txt"][i], txt, tolerance)
    for j, (txt, img) in enumerate(single):
        report.add(f"single_block_{j}", inter["single"][j], np.concatenate([txt, img], axis=1), tolerance)
    report.add("output (target tokens)", out, ref_out, tolerance)


def mmdit_parity(
    checkpoint,
    family: str,
    *,
    batch: int = 2,
    height: int = 6,
    width: int = 8,
    txt_len: int = 12,
    pad: int = 4,
    condition_segments: int = 1,
    seed: int = 0,
    tolerance: float = 1e-4,
    stream=None,
) -> ParityReport:
    """Loads `checkpoint` (diffusers transformer folder or pipeline folder) both ways and compares.

    The torch model loads in float32 with `low_cpu_mem_usage`; ours streams from the same
    safetensors files. Returns the filled `ParityReport` (call `.print()` for the table).
    """
    import torch
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    folder = diffusers_io.model_folder(checkpoint, "transformer")
    config = from_diffusers(MMDiTConfig, diffusers_io.read_config(folder))
    if config.family != family:
        raise ValueError(f"{folder}/config.json describes a {mmdit_class_name(config)}, not a {family} model")
    cls = QwenImageTransformer2DModel if family == "qwen_image" else FluxTransformer2DModel
    inp = make_inputs(
        config,
        batch=batch,
        height=height,
        width=width,
        txt_len=txt_len,
        pad=pad,
        condition_segments=condition_segments,
        seed=seed,
    )
    model = cls.from_pretrained(folder, torch_dtype=torch.float32, low_cpu_mem_usage=low_memory_loading()).eval()
    ref = run_reference(model, config, inp)
    del model
    gc.collect()
    from qk_jax.convert import flux as flux_convert
    from qk_jax.convert import qwen_image as qwen_convert

    _, params = (qwen_convert if family == "qwen_image" else flux_convert).load(folder)
    with jax.default_matmul_precision("highest"):  # parity is always in full float32
        ours = run_ours(config, params, inp)
    del params
    title = (
        f"{mmdit_class_name(config)} parity: {folder} ({config.num_layers} double + "
        f"{config.num_single_layers} single blocks, {config.num_heads}x{config.head_dim} heads, rope "
        f"{list(config.axes_dims_rope)}); batch {batch}, target {height}x{width} tokens + "
        f"{condition_segments} condition segments, {txt_len} text tokens (padding {pad} per sample)"
    )
    report = ParityReport(title, stream=stream)
    compare(report, config, ours, ref, tolerance)
    return report
