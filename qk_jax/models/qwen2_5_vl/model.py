"""The assembled Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration` in transformers).

Parameter tree (top-level keys): `visual` (vision tower), `language_model`
(`embed_tokens`, scanned `layers`, `norm`) and `lm_head` when the embeddings are untied.

The forward pass is split into methods that callers compose (all usable through
`model.apply(variables, ..., method=...)`):

    embeds = embed(input_ids, pixel_values, vision_plan)            # (B, T, D)
    hidden = decode(embeds, position_ids, attention_mask)           # (B, T, D), final-norm
    logits = logits(hidden)                                         # (B, T, V) float32

`__call__` chains the three like HF's forward. Host-side inputs come from
`prepare_inputs` (3D position ids via `rope.get_rope_index`, and the vision plan);
Query-Kontext appends K query embeddings to `embeds`, extends `position_ids` with
`rope.extend_position_ids` and the attention mask with ones, then calls `decode`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.models import layers
from qk_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from qk_jax.models.qwen2_5_vl.rope import get_rope_index, mrope_cos_sin
from qk_jax.models.qwen2_5_vl.text import TextModel, causal_padding_mask
from qk_jax.models.qwen2_5_vl.vision import VisionTower
from qk_jax.models.qwen2_5_vl.vision_plan import VisionPlan, build_image_plan, build_vision_plan, num_merged_tokens

Dtype = Any


class Qwen25VL(nn.Module):
    """Qwen2.5-VL: vision tower + Qwen2 decoder + LM head."""

    config: Qwen25VLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.visual = VisionTower(c.vision, c.attention_impl, c.remat, **kw)
        self.language_model = TextModel(c.text, c.attention_impl, c.remat, **kw)
        if not c.tie_word_embeddings:
            self.lm_head = layers.Dense(c.text.vocab_size, axes=("embed", "vocab"), use_bias=False, **kw)

    # ------------------------------------------------------------------ pieces

    def vision(self, pixel_values: jax.Array, vision_plan: VisionPlan) -> jax.Array:
        """Image embeddings in token order: flat pixel_values (N, C*Tp*P*P) + plan of all
        images -> (N / merge_unit, D); batched (I, P, C*Tp*P*P) + plan of one image ->
        (I, P / merge_unit, D) (see `vision.py`)."""
        return self.visual(pixel_values, vision_plan)

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        vision_plan: VisionPlan | None = None,
        rows_own_images: bool = False,
    ) -> jax.Array:
        """Token embeddings with the image embeddings placed at the image-pad tokens.

        input_ids (B, T) -> (B, T, D). The k-th image-pad token of the batch (row-major)
        receives the k-th merged image token, as HF's `masked_scatter` does; the caller
        guarantees the counts match (`prepare_inputs` checks it on the host).

        rows_own_images: the images come in rows of I / B (row b's image tokens are
        exactly those of images b*I/B .. (b+1)*I/B - 1, as in Query-Kontext batches), so
        each row gathers from its own images only: with rows and images split alike over
        the devices, no device needs another's image embeddings.
        """
        x = self.language_model.embed(input_ids)
        if pixel_values is None:
            return x
        if vision_plan is None:
            raise ValueError("embed: pixel_values given without a vision_plan (build it with prepare_inputs)")
        images = self.visual(pixel_values, vision_plan).astype(x.dtype)  # (U, D) or (I, U, D)
        is_image = input_ids == self.config.image_token_id
        b, d = input_ids.shape[0], images.shape[-1]
        if rows_own_images:
            if (images.size // d) % b:
                raise ValueError(f"embed: rows_own_images with {images.size // d} image tokens for {b} rows")
            per_row = images.reshape(b, -1, d)
            slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, per_row.shape[1] - 1)
            gathered = jax.vmap(lambda im, s: jnp.take(im, s, axis=0))(per_row, slot)
        else:
            images = images.reshape(-1, d)
            slot = jnp.cumsum(is_image.reshape(-1)) - 1
            gathered = jnp.take(images, jnp.clip(slot, 0, images.shape[0] - 1), axis=0).reshape(x.shape)
        return jnp.where(is_image[..., None], gathered, x)

    def decode(
        self,
        inputs_embeds: jax.Array,
        position_ids: jax.Array,
        attention_mask: jax.Array,
        output_hidden_states: bool = False,
    ):
        """The decoder over a whole sequence (causal + padding mask).

        Args:
          inputs_embeds: (B, T, D); position_ids: (3, B, T) int; attention_mask: (B, T) 1/0.
        Returns:
          final-norm hidden states (B, T, D); with `output_hidden_states`, also the HF
          `hidden_states` tuple stacked as (L + 1, B, T, D): the embeddings, the output of
          layers 0..L-2, and the final-norm output.
        """
        c = self.config.text
        cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section)
        x = layers.constrain(inputs_embeds.astype(self.dtype), ("act_batch", "act_length", "act_embed"))
        if self.config.attention_impl == "splash":
            # Segment ids for the kernel: real tokens see real tokens (padding sees padding).
            ids = attention_mask.astype(jnp.int32)
            mask = layers.SegmentMask(ids, ids, causal=True)
        else:
            mask = causal_padding_mask(attention_mask)
        out, per_layer, _ = self.language_model.run_layers(x, cos, sin, mask, collect_hidden=output_hidden_states)
        hidden = self.language_model.final_norm(out)
        if not output_hidden_states:
            return hidden
        return hidden, jnp.concatenate([x[None], per_layer[:-1], hidden[None]], axis=0)

    def decode_step(
        self, inputs_embeds: jax.Array, position_ids: jax.Array, cache: dict, attention_mask: jax.Array | None = None
    ):
        """The decoder on new tokens with a KV cache (prefill or one generation step).

        Args:
          inputs_embeds: (B, T, D) new tokens, written at cache slots index..index+T-1.
          position_ids: (3, B, T); attention_mask: (B, T) of the new tokens (None = all real).
          cache: see `text.init_cache`.
        Returns:
          (final-norm hidden (B, T, D), updated cache).
        """
        c = self.config.text
        b, t, _ = inputs_embeds.shape
        s = cache["valid"].shape[1]
        new_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        valid = jax.lax.dynamic_update_slice(cache["valid"], new_valid, (0, cache["index"]))
        slots = jnp.arange(s)[None, :]
        query_slots = cache["index"] + jnp.arange(t)[:, None]
        mask = (slots <= query_slots)[None, None] & valid[:, None, None, :]  # (B, 1, T, S)
        cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section)
        out, _, new_cache = self.language_model.run_layers(
            inputs_embeds.astype(self.dtype), cos, sin, mask, cache=cache
        )
        new_cache = dict(new_cache, valid=valid, index=cache["index"] + t)
        return self.language_model.final_norm(out), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, T, V) float32 (tied to the embedding or through `lm_head`)."""
        if self.config.tie_word_embeddings:
            return self.language_model.attend(hidden)
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        position_ids: jax.Array,
        attention_mask: jax.Array,
        pixel_values: jax.Array | None = None,
        vision_plan: VisionPlan | None = None,
        output_hidden_states: bool = False,
    ) -> dict[str, jax.Array]:
        """The full forward, as HF's: {"logits" (B, T, V), ["hidden_states" (L+1, B, T, D)]}."""
        embeds = self.embed(input_ids, pixel_values, vision_plan)
        out = self.decode(embeds, position_ids, attention_mask, output_hidden_states)
        if output_hidden_states:
            hidden, states = out
            return {"logits": self.logits(hidden), "hidden_states": states}
        return {"logits": self.logits(out)}


# ----------------------------------------------------------------- host-side helpers


def prepare_inputs(
    cfg: Qwen25VLConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    pad_patches_to: int | None = None,
    batched_images: bool = False,
) -> dict[str, Any]:
    """Host-side inputs of the jitted model: position ids (3, B, T), rope deltas (B,) and,
    with images, the vision plan. Checks that image tokens and grids agree.

    `pad_patches_to` builds the plan for a static patch bucket; pad `pixel_values` to the
    same row count with `vision_plan.pad_patches`. `batched_images` builds the plan of one
    image for the batched layout (all images share one grid; pass `pixel_values` as
    (N_img, P, patch_dim)).
    """
    input_ids = np.asarray(input_ids)
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    n_tokens = int(((input_ids == cfg.image_token_id) & (np.asarray(attention_mask) > 0)).sum())
    n_expected = (
        0 if image_grid_thw is None else int(num_merged_tokens(image_grid_thw, cfg.vision.spatial_merge_size).sum())
    )
    if n_tokens != n_expected:
        raise ValueError(
            f"input_ids hold {n_tokens} image tokens (id {cfg.image_token_id}) but image_grid_thw implies {n_expected}"
        )
    position_ids, deltas = get_rope_index(
        input_ids,
        image_grid_thw,
        attention_mask,
        image_token_id=cfg.image_token_id,
        spatial_merge_size=cfg.vision.spatial_merge_size,
    )
    out = {"position_ids": position_ids, "rope_deltas": deltas, "attention_mask": np.asarray(attention_mask, np.int32)}
    if image_grid_thw is not None and len(image_grid_thw):
        if batched_images:
            if pad_patches_to is not None:
                raise ValueError("prepare_inputs: pad_patches_to applies to the flat layout, not batched_images")
            out["vision_plan"] = build_image_plan(image_grid_thw, cfg.vision)
        else:
            out["vision_plan"] = build_vision_plan(image_grid_thw, cfg.vision, pad_to=pad_patches_to)
    return out


def dummy_inputs(cfg: Qwen25VLConfig) -> dict[str, Any]:
    """A one-image batch that touches every parameter (for `init` / `eval_shape`)."""
    m = cfg.vision.spatial_merge_size
    grid = np.array([[1, m, m]])
    ids = np.array([[cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, 0]], np.int32)
    host = prepare_inputs(cfg, ids, None, grid)
    return dict(
        input_ids=ids,
        position_ids=host["position_ids"],
        attention_mask=host["attention_mask"],
        pixel_values=np.zeros((m * m, cfg.vision.patch_dim), np.float32),
        vision_plan=host["vision_plan"],
    )


def init_params(model: Qwen25VL, rng: jax.Array) -> Any:
    """Random parameters (boxed with logical axes, as `model.init` returns them)."""
    inputs = dummy_inputs(model.config)
    return jax.jit(lambda r, x: model.init(r, **x)["params"])(rng, inputs)


def param_count(cfg: Qwen25VLConfig) -> int:
    """Number of parameters, from `jax.eval_shape` (nothing is allocated)."""
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(init_params(Qwen25VL(cfg), r)), jax.random.key(0))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
