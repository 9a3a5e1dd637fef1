"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), batched
with left-padded prompts that may hold images.

The prompt runs once through a jitted prefill that fills the cache; each new token is one
jitted decode step (same shapes every step, so it compiles once). Generated token k of
row b sits at M-RoPE position `max(prompt positions of b) + 1 + k` on all three axes,
which is where HF's `generate` puts it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.models.qwen2_5_vl.model import Qwen25VL, prepare_inputs
from qk_jax.models.qwen2_5_vl.rope import extend_position_ids
from qk_jax.models.qwen2_5_vl.text import init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy (argmax); otherwise softmax(logits / temperature) restricted to
    the `top_k` most likely tokens (0 = all) and the smallest set with mass >= `top_p`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """(B, V) float32 logits -> (B,) int32 tokens."""
    if sampling.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.finfo(logits.dtype).min
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep a token while the mass before it is below top_p (the first token always stays).
        keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < sampling.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Generator:
    """Jitted prefill and decode step for one model; reuse it across calls to avoid recompiles."""

    def __init__(self, model: Qwen25VL, sampling: SamplingConfig = SamplingConfig(), cache_dtype: Any = None):
        self.model = model
        self.sampling = sampling
        self.cache_dtype = cache_dtype or model.dtype
        self._prefill = jax.jit(self._prefill_fn)
        self._step = jax.jit(self._step_fn)

    def _prefill_fn(self, params, ids, pos, mask, pixels, plan, cache, rng):
        m = self.model
        v = {"params": params}
        embeds = m.apply(v, ids, pixels, plan, method=m.embed)
        hidden, cache = m.apply(v, embeds, pos, cache, mask, method=m.decode_step)
        logits = m.apply(v, hidden[:, -1:], method=m.logits)[:, 0]
        return sample_logits(logits, rng, self.sampling), cache

    def _step_fn(self, params, token, pos, cache, rng):
        m = self.model
        v = {"params": params}
        embeds = m.apply(v, token[:, None], method=m.embed)
        hidden, cache = m.apply(v, embeds, pos, cache, method=m.decode_step)
        logits = m.apply(v, hidden, method=m.logits)[:, 0]
        return sample_logits(logits, rng, self.sampling), cache

    def __call__(
        self,
        params,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        *,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        rng: jax.Array | None = None,
    ) -> np.ndarray:
        """Generates up to `max_new_tokens` per row: (B, n) int32 with n <= max_new_tokens
        (shorter when every row has produced `eos_token_id`); after its EOS a row holds
        `pad_token_id`, as HF's `generate` returns it."""
        cfg = self.model.config
        input_ids = np.asarray(input_ids, np.int32)
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        if not mask[:, -1].all():
            raise ValueError("generate needs left-padded prompts: the last column of attention_mask must be all 1")
        eos = cfg.text.eos_token_id if eos_token_id is None else eos_token_id
        pad = pad_token_id if pad_token_id is not None else (cfg.text.pad_token_id or 0)
        host = prepare_inputs(cfg, input_ids, mask, image_grid_thw)
        b, t = input_ids.shape
        cache = init_cache(cfg.text, b, t + max_new_tokens, self.cache_dtype)
        positions = extend_position_ids(host["position_ids"], mask, max_new_tokens)
        rng = jax.random.key(0) if rng is None else rng
        rng, sub = jax.random.split(rng)
        token, cache = self._prefill(
            params,
            input_ids,
            host["position_ids"],
            mask,
            None if image_grid_thw is None else np.asarray(pixel_values, np.float32),
            host.get("vision_plan"),
            cache,
            sub,
        )
        out = []
        done = np.zeros((b,), bool)
        for k in range(max_new_tokens):
            tok = np.asarray(token)
            tok = np.where(done, pad, tok)
            out.append(tok)
            if eos is not None:
                done |= tok == eos
            if done.all() or k == max_new_tokens - 1:
                break
            rng, sub = jax.random.split(rng)
            token, cache = self._step(params, tok.astype(np.int32), positions[:, :, k : k + 1], cache, sub)
        return np.stack(out, axis=1).astype(np.int32)


def generate(
    model: Qwen25VL,
    params,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    rng: jax.Array | None = None,
) -> np.ndarray:
    """One-shot `Generator(model, sampling)(...)`; see `Generator.__call__`."""
    return Generator(model, sampling)(
        params,
        input_ids,
        attention_mask,
        pixel_values,
        image_grid_thw,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        rng=rng,
    )
