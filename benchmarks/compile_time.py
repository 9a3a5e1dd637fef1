"""Compile time of the Qwen2.5-VL decoder against depth: `nn.scan` keeps it flat.

For each depth L, the decoder path of our `Qwen25VL` (token embedding, L scanned layers,
final norm, LM head) is lowered and compiled twice, from abstract shapes only:

  forward     logits (B, T, V);
  train_step  cross-entropy loss, gradients and an AdamW update of every parameter.

The reference column is the same computation with the layers *unrolled* (the same
`DecoderLayer` module applied L times in a Python loop, each with its own parameters):
the program XLA sees grows with L, and so does its compile time; the scanned program
holds one layer body whatever L is. `ours_s` / `reference_s` are lower + compile
seconds; `extra` splits them and gives the growth relative to the smallest depth.

    python benchmarks/compile_time.py [--quick]
"""

from __future__ import annotations

import time

try:
    from benchmarks import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

DEPTHS = (2, 4, 8, 16, 32)
QUICK_DEPTHS = (1, 2)


def make_config(layers: int, quick: bool):
    from qk_jax.models.qwen2_5_vl import Qwen25VLConfig, TextConfig, VisionConfig

    d = 64 if quick else 256
    return Qwen25VLConfig(
        vision=VisionConfig(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=d,
            window_size=56,
            fullatt_block_indexes=(0,),
        ),
        text=TextConfig(
            vocab_size=1024,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=(2, 3, 3) if quick else (8, 12, 12),
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        image_token_id=1020,
        video_token_id=1021,
        vision_start_token_id=1022,
        vision_end_token_id=1023,
    )


def _unrolled_module(cfg):
    """The decoder with its layers applied in a Python loop (no scan), for contrast."""
    import flax.linen as nn
    import jax.numpy as jnp

    from qk_jax.models import layers
    from qk_jax.models.qwen2_5_vl.rope import mrope_cos_sin
    from qk_jax.models.qwen2_5_vl.text import DecoderLayer, causal_padding_mask

    t = cfg.text

    class UnrolledDecoder(nn.Module):
        @nn.compact
        def __call__(self, ids, pos, mask):
            x = nn.Embed(t.vocab_size, t.hidden_size, name="embed_tokens")(ids)
            cos, sin = mrope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section)
            m = causal_padding_mask(mask)
            for i in range(t.num_hidden_layers):
                x, _ = DecoderLayer(t, name=f"layers_{i}")(x, cos, sin, m, None, None, None)
            x = layers.RMSNorm(t.rms_norm_eps, name="norm")(x)
            return {"logits": layers.Dense(t.vocab_size, use_bias=False, name="lm_head")(x).astype(jnp.float32)}

    return UnrolledDecoder()


def _programs(model, init_fn, batch: int, length: int):
    """(forward fn, train-step fn, abstract args of each) for a model called as (ids, pos, mask)."""
    import jax
    import jax.numpy as jnp
    import optax

    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    pos = jax.ShapeDtypeStruct((3, batch, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    params = jax.eval_shape(init_fn, jax.random.key(0))
    tx = optax.adamw(1e-4)
    opt = jax.eval_shape(tx.init, params)

    def forward(p, ids, pos, mask):
        return model.apply({"params": p}, ids, pos, mask)["logits"]

    def loss_fn(p, ids, pos, mask):
        logits = forward(p, ids, pos, mask)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    def step(p, o, ids, pos, mask):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids, pos, mask)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    return (forward, (params, ids, pos, mask)), (step, (params, opt, ids, pos, mask))


def compile_seconds(fn, args, donate: tuple[int, ...] = ()) -> tuple[float, float]:
    """(lower seconds, compile seconds) of `jax.jit(fn)` on abstract `args`."""
    import jax

    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def run(quick: bool = False, peak: dict | None = None) -> list[dict]:
    """Compile-time table and records (`peak` is unused: compile time has no FLOPs)."""
    import flax.linen as nn
    import jax

    from qk_jax.models.qwen2_5_vl import Qwen25VL, init_params

    # Real compilations only: a persistent compilation cache (JAX_COMPILATION_CACHE_DIR)
    # would turn a repeated run into cache loads.
    jax.config.update("jax_enable_compilation_cache", False)
    depths = QUICK_DEPTHS if quick else DEPTHS
    batch, length = (1, 32) if quick else (2, 256)
    records, rows = [], []
    base: dict[str, float] = {}
    for depth in depths:
        cfg = make_config(depth, quick)
        scanned = Qwen25VL(cfg)
        unrolled = _unrolled_module(cfg)
        dummy = (
            jax.numpy.zeros((1, 4), jax.numpy.int32),
            jax.numpy.zeros((3, 1, 4), jax.numpy.int32),
            jax.numpy.ones((1, 4), jax.numpy.int32),
        )
        ours = _programs(scanned, lambda r: nn.meta.unbox(init_params(scanned, r)), batch, length)
        ref = _programs(unrolled, lambda r: unrolled.init(r, *dummy)["params"], batch, length)
        for (name, donate), (o_fn, o_args), (r_fn, r_args) in zip((("forward", ()), ("train_step", (0, 1))), ours, ref):
            o_lower, o_compile = compile_seconds(o_fn, o_args, donate)
            r_lower, r_compile = compile_seconds(r_fn, r_args, donate)
            total, ref_total = o_lower + o_compile, r_lower + r_compile
            base.setdefault(name, total)
            base.setdefault("ref_" + name, ref_total)
            records.append(
                common.record(
                    f"compile/{name}_L{depth}",
                    total,
                    ref_total,
                    layers=depth,
                    lower_s=o_lower,
                    compile_s=o_compile,
                    reference_lower_s=r_lower,
                    reference_compile_s=r_compile,
                    growth=total / base[name],
                    reference_growth=ref_total / base["ref_" + name],
                    reference="unrolled layers (no scan)",
                    shape=f"batch {batch} x {length} tokens, width {cfg.text.hidden_size}",
                )
            )
            rows.append(
                [
                    f"{name}",
                    depth,
                    f"{o_lower:.2f}",
                    f"{o_compile:.2f}",
                    f"{total / base[name]:.2f}x",
                    f"{r_lower:.2f}",
                    f"{r_compile:.2f}",
                    f"{ref_total / base['ref_' + name]:.2f}x",
                ]
            )
    print(
        common.table(
            f"Compile time (s) of the decoder against depth: nn.scan (ours) vs the same layers unrolled; "
            f"batch {batch} x {length} tokens",
            [
                "program",
                "layers",
                "scan lower",
                "scan compile",
                "scan growth",
                "unrolled lower",
                "unrolled compile",
                "unrolled growth",
            ],
            rows,
        )
    )
    print()
    return records


if __name__ == "__main__":
    common.script_main(run, __doc__)
