"""Forward FLOPs of the Qwen2.5-VL towers, the connector, the MMDiT and the LoRA merge
(what is counted: `qk_jax.flops`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qk_jax.flops.count import MatmulFlops, _Counter, _positive
from qk_jax.models.connector import ConnectorConfig
from qk_jax.models.mmdit.config import MMDiTConfig
from qk_jax.models.qwen2_5_vl.config import TextConfig, VisionConfig
from qk_jax.tree import flatten_tree

# -------------------------------------------------------------------- Qwen2.5-VL


def vision_tower_flops(vcfg: VisionConfig, num_patches: int, num_images: int = 1) -> MatmulFlops:
    """Forward of the Qwen2.5-VL vision tower on `num_images` sequences of `num_patches`
    patches each: the batched layout runs one sequence per image (attention P^2 per image);
    the flat layout runs all patches of the batch, padding included, as ONE sequence
    (`num_images=1`, `num_patches` = N, attention N^2).

    Patch embedding (the Conv3d, a matmul over each flattened patch), `depth` blocks
    (fused qkv, attention over each whole sequence, output projection, gated MLP), the
    merger MLP on the patches / merge_unit tokens. Accepts a `Qwen25VLConfig` too (its `.vision`).
    """
    v = getattr(vcfg, "vision", vcfg)
    p, i, d, layers = int(num_patches), int(num_images), v.hidden_size, v.depth
    _positive(num_patches=p, num_images=i)
    if p % v.merge_unit:
        raise ValueError(
            f"vision_tower_flops: num_patches={p} is not a multiple of spatial_merge_size**2={v.merge_unit}"
        )
    n = i * p  # patches in all
    c = _Counter("visual/")
    c.dense("patch_embed", n, v.patch_dim, d)
    c.dense("blocks/attn/qkv", layers * n, d, 3 * d)
    c.attention("blocks/attn/attention", layers * i, p, p, d)
    c.dense("blocks/attn/proj", layers * n, d, d)
    for name in ("gate_proj", "up_proj"):
        c.dense(f"blocks/mlp/{name}", layers * n, d, v.intermediate_size)
    c.dense("blocks/mlp/down_proj", layers * n, v.intermediate_size, d)
    units, width = n // v.merge_unit, d * v.merge_unit
    c.dense("merger/fc1", units, width, width)
    c.dense("merger/fc2", units, width, v.out_hidden_size)
    return c.result()


def decoder_flops(
    tcfg: TextConfig, batch: int, seq_len: int, with_lm_head: bool, tie_word_embeddings: bool = False
) -> MatmulFlops:
    """Forward of the Qwen2 decoder over (batch, seq_len) tokens, no KV cache.

    GQA projections (q: D -> H*hd, k/v: D -> KV*hd), attention over the full T x T score
    matrix (causal masking does not skip work), o_proj, SwiGLU (3 matmuls) in every layer;
    with `with_lm_head`, the vocabulary projection on every position (through the tied
    embedding when `tie_word_embeddings`: same FLOPs). Accepts a `Qwen25VLConfig`
    (its `.text` and tying).
    """
    if hasattr(tcfg, "text"):
        tie_word_embeddings = tcfg.tie_word_embeddings
        tcfg = tcfg.text
    _positive(batch=batch, seq_len=seq_len)
    t = tcfg
    rows, layers, d = batch * seq_len, t.num_hidden_layers, t.hidden_size
    q_width, kv_width = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    c = _Counter("language_model/layers/")
    c.dense("self_attn/q_proj", layers * rows, d, q_width)
    c.dense("self_attn/k_proj", layers * rows, d, kv_width)
    c.dense("self_attn/v_proj", layers * rows, d, kv_width)
    c.attention("self_attn/attention", layers * batch, seq_len, seq_len, q_width)
    c.dense("self_attn/o_proj", layers * rows, q_width, d)
    for name in ("gate_proj", "up_proj"):
        c.dense(f"mlp/{name}", layers * rows, d, t.intermediate_size)
    c.dense("mlp/down_proj", layers * rows, t.intermediate_size, d)
    out = c.result()
    if with_lm_head:
        head = _Counter()
        if tie_word_embeddings:
            head.kernels["language_model/embed_tokens/embedding"] = 2 * rows * d * t.vocab_size
        else:
            head.dense("lm_head", rows, d, t.vocab_size)
        out = out + head.result()
    return out


# -------------------------------------------------------------------- connector


def connector_flops(ccfg: ConnectorConfig, batch: int, tokens: int) -> MatmulFlops:
    """Forward of the connector on (batch, tokens) condition tokens (text + kontext).

    `mlp`: Dense(D_vlm -> H), Dense(H -> D_cond). `transformer`: per block q, k, v, o
    (D_vlm x D_vlm), bidirectional attention over all tokens, SwiGLU (3 matmuls); then
    Dense(D_vlm -> D_cond).
    """
    _positive(batch=batch, tokens=tokens)
    rows = batch * tokens
    c = _Counter()
    if ccfg.kind == "mlp":
        c.dense("fc1", rows, ccfg.in_dim, ccfg.hidden_dim)
        c.dense("fc2", rows, ccfg.hidden_dim, ccfg.out_dim)
        return c.result()
    d = ccfg.in_dim
    for i in range(ccfg.num_layers):
        for name in ("q", "k", "v", "o"):
            c.dense(f"block_{i}/{name}", rows, d, d)
        c.attention(f"block_{i}/attention", batch, tokens, tokens, d)
        c.dense(f"block_{i}/gate", rows, d, ccfg.hidden_dim)
        c.dense(f"block_{i}/up", rows, d, ccfg.hidden_dim)
        c.dense(f"block_{i}/down", rows, ccfg.hidden_dim, d)
    c.dense("proj", rows, d, ccfg.out_dim)
    return c.result()


# -------------------------------------------------------------------- MMDiT

_TIMESTEP_FEATURES = 256  # `blocks.timestep_sinusoid` width


def mmdit_flops(
    dcfg: MMDiTConfig, batch: int, img_tokens: int, txt_tokens: int, num_target_tokens: int | None = None
) -> MatmulFlops:
    """Forward of the MMDiT on `img_tokens` image tokens (target + condition segments)
    and `txt_tokens` condition tokens; only the first `num_target_tokens` are projected out.

    Embedders (img_in and its bottleneck, txt_in, the timestep MLP and, per config, guidance and pooled MLPs),
    double-stream blocks (per-stream AdaLN modulation Dense D -> 6D on the time vector,
    q/k/v/out, joint attention over T + N, per-stream MLPs), single-stream blocks (D -> 3D
    modulation, q/k/v and the D -> 4D MLP on T + N tokens, attention, the fused
    (D + 4D) -> D output), the final modulation and proj_out on the target tokens.
    Qwen-Image-Edit-2511's `zero_cond_t` (with condition segments present) runs the
    timestep MLP and every image-side modulation Dense a second time, on t = 0.
    """
    c_ = dcfg
    b, n, t = int(batch), int(img_tokens), int(txt_tokens)
    n_target = n if num_target_tokens is None else int(num_target_tokens)
    _positive(batch=b, img_tokens=n, txt_tokens=t, num_target_tokens=n_target)
    if n_target > n:
        raise ValueError(f"mmdit_flops: num_target_tokens={n_target} exceeds img_tokens={n}")
    d, mlp, s = c_.inner_dim, c_.mlp_dim, n + t
    vecs = 2 if c_.zero_cond_t and n_target < n else 1  # vec and vec0
    c = _Counter()
    if c_.patch_bottleneck:
        c.dense("img_in_bottleneck", b * n, c_.in_channels, c_.patch_bottleneck)
        c.dense("img_in", b * n, c_.patch_bottleneck, d)
    else:
        c.dense("img_in", b * n, c_.in_channels, d)
    c.dense("txt_in", b * t, c_.joint_attention_dim, d)
    c.dense("time_embed/linear_1", vecs * b, _TIMESTEP_FEATURES, d)
    c.dense("time_embed/linear_2", vecs * b, d, d)
    if c_.guidance_embeds:
        c.dense("guidance_embed/linear_1", b, _TIMESTEP_FEATURES, d)
        c.dense("guidance_embed/linear_2", b, d, d)
    if c_.pooled_projection_dim:
        c.dense("pooled_embed/linear_1", b, c_.pooled_projection_dim, d)
        c.dense("pooled_embed/linear_2", b, d, d)
    layers = c_.num_layers
    if layers:
        c.dense("double_blocks/img_mod", layers * vecs * b, d, 6 * d)
        c.dense("double_blocks/txt_mod", layers * b, d, 6 * d)
        for stream, rows in (("img", layers * b * n), ("txt", layers * b * t)):
            for name in ("q", "k", "v", "out"):
                c.dense(f"double_blocks/attn/{stream}_{name}", rows, d, d)
            c.dense(f"double_blocks/{stream}_mlp/fc1", rows, d, mlp)
            c.dense(f"double_blocks/{stream}_mlp/fc2", rows, mlp, d)
        c.attention("double_blocks/attn/attention", layers * b, s, s, d)
    singles = c_.num_single_layers
    if singles:
        rows = singles * b * s
        c.dense("single_blocks/mod", singles * vecs * b, d, 3 * d)
        for name in ("q", "k", "v"):
            c.dense(f"single_blocks/{name}", rows, d, d)
        c.dense("single_blocks/mlp_in", rows, d, mlp)
        c.attention("single_blocks/attention", singles * b, s, s, d)
        c.dense("single_blocks/out", rows, d + mlp, d)
    c.dense("norm_out", b, d, 2 * d)
    c.dense("proj_out", b * n_target, d, c_.out_features)
    if c_.cell_conv_width:
        _cell_conv_flops(c, c_, b * n_target)
    return c.result()


def _cell_conv_flops(c: _Counter, c_: MMDiTConfig, tokens: int) -> None:
    """`cell_conv.py`'s stem and head on `tokens` target tokens: each 3x3 convolution computes a
    token's p x p cells from 9 x its input width, the stem projects p x p x width to the stream
    and the head widens the stream to p x p x width."""
    p, w = c_.patch_size, c_.cell_conv_width
    cells = tokens * p * p
    c_in, c_out = c_.in_channels // (p * p), c_.out_features // (p * p)
    widths = [c_in] + [w] * p
    for i in range(p):
        c.dense(f"cell_stem/convs/conv_{i}", cells, 9 * widths[i], widths[i + 1])
    c.dense("cell_stem/proj", tokens, p * p * w, c_.inner_dim)
    c.dense("cell_head/up", tokens, c_.inner_dim, p * p * w)
    widths = [2 * w] + [w] * (p - 1) + [c_out]
    for i in range(p):
        c.dense(f"cell_head/convs/conv_{i}", cells, 9 * widths[i], widths[i + 1])


# -------------------------------------------------------------------- LoRA


def lora_flops(lora_tree: Mapping[str, Any]) -> MatmulFlops:
    """The merge `W + s * a @ b` of `lora.apply_lora`, run once per step (per microbatch
    forward): 2 * d_in * r * d_out per adapted kernel, times its stacked layers.

    `lora_tree`: the adapters (`params["lora"]`, or a tree holding it under `lora`), as
    arrays or `jax.ShapeDtypeStruct`s: `.../kernel/a` (..., d_in, r), `.../kernel/b` (..., r, d_out).
    Counted as pairs: when the factors are trained, their backward is two products
    (dA = s dW' b^T, dB = s a^T dW').
    """
    tree = lora_tree.get("lora", lora_tree) if isinstance(lora_tree, Mapping) else lora_tree
    flat = flatten_tree(tree)
    c = _Counter()
    for path, a in flat.items():
        if not path.endswith("/a"):
            continue
        kernel = path[: -len("/a")]
        if kernel + "/b" not in flat:
            raise ValueError(f"lora_flops: adapter {kernel!r} has `a` but no `b`")
        b = flat[kernel + "/b"]
        *lead, d_in, r = a.shape
        stacked = 1
        for x in lead:
            stacked *= int(x)
        c.pair(f"{kernel}/merge", 2 * stacked * d_in * r * int(b.shape[-1]))
    return c.result()
