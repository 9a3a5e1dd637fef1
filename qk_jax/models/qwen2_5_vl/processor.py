"""Qwen2.5-VL preprocessing from a local checkpoint folder, without torchvision.

`QwenVLProcessor` = `transformers.AutoTokenizer` (tokens, chat template) +
`transformers.Qwen2VLImageProcessorPil` (smart resize, normalisation, 14 px patches in
merge-block order). It does what `Qwen2_5_VLProcessor` does for images — each
`<|image_pad|>` becomes `t*h*w / merge**2` copies — and additionally pads a batch to a
static length on the chosen side, returning numpy arrays ready for the jitted model.

    proc = QwenVLProcessor.from_pretrained(folder)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                     {"type": "text", "text": "describe"}]}])
    batch = proc([text], images=[[img]], max_length=256, padding_side="left")
    # batch: input_ids, attention_mask, mm_token_type_ids (B, T) int32,
    #        pixel_values (sum_patches, C*2*14*14) float32, image_grid_thw (N_img, 3) int32
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

IMAGE_TOKEN = "<|image_pad|>"


def _flatten_images(images) -> list:
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    flat = []
    for item in images:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


class QwenVLProcessor:
    """Tokenizer + image processor + image-token expansion + static padding."""

    def __init__(self, tokenizer, image_processor, image_token: str = IMAGE_TOKEN):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **image_kwargs) -> QwenVLProcessor:
        """Loads the tokenizer of `folder` and its `preprocessor_config.json` when present; else
        a default image processor with patch / merge / temporal sizes from `config.json`."""
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        folder = os.fspath(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if os.path.exists(os.path.join(folder, "preprocessor_config.json")):
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder, **image_kwargs)
        else:
            kwargs = {}
            config_path = os.path.join(folder, "config.json")
            if os.path.exists(config_path):
                with open(config_path) as f:
                    vision = json.load(f).get("vision_config", {})
                kwargs = {
                    k: vision[src]
                    for k, src in (
                        ("patch_size", "patch_size"),
                        ("merge_size", "spatial_merge_size"),
                        ("temporal_patch_size", "temporal_patch_size"),
                    )
                    if src in vision
                }
            image_processor = Qwen2VLImageProcessorPil(**{**kwargs, **image_kwargs})
        return cls(tokenizer, image_processor)

    # ------------------------------------------------------------------ text

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Messages (HF chat format, `{"type": "image"}` entries for images) -> prompt text."""
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def decode(self, token_ids, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(np.asarray(token_ids).tolist(), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ batch

    def __call__(
        self,
        text: str | Sequence[str],
        images: Any = None,
        *,
        max_length: int | None = None,
        padding_side: str = "left",
    ) -> dict[str, np.ndarray]:
        """Tokenises a batch of prompts with their images.

        Args:
          text: prompts, each with one `<|image_pad|>` per image (as the chat template writes).
          images: PIL images / arrays, flat in order of appearance across the batch, or one
            list per prompt.
          max_length: pad every row to this length (a static shape); None = the longest row.
          padding_side: "left" (generation, appended queries) or "right".
        """
        texts = [text] if isinstance(text, str) else list(text)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: use 'left' or 'right'")
        flat = _flatten_images(images)
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(flat):
            raise ValueError(
                f"the prompts hold {n_placeholders} {self.image_token} placeholders but {len(flat)} images were given"
            )
        out: dict[str, np.ndarray] = {}
        if flat:
            processed = self.image_processor(images=flat, return_tensors="np")
            out["pixel_values"] = np.asarray(processed["pixel_values"], np.float32)
            out["image_grid_thw"] = np.asarray(processed["image_grid_thw"], np.int32)
            merge = self.image_processor.merge_size**2
            counts = iter(np.prod(out["image_grid_thw"], axis=-1) // merge)
            texts = [self._expand(t, counts) for t in texts]
        rows = self.tokenizer(texts)["input_ids"]
        length = max(len(r) for r in rows) if max_length is None else int(max_length)
        too_long = [(i, len(r)) for i, r in enumerate(rows) if len(r) > length]
        if too_long:
            raise ValueError(f"prompt rows (index, tokens) {too_long} exceed max_length={length}")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = np.full((len(rows), length), pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
            ids[i, sl] = r
            mask[i, sl] = 1
        out.update(
            input_ids=ids,
            attention_mask=mask,
            mm_token_type_ids=((ids == self.image_token_id) & (mask > 0)).astype(np.int32),
        )
        return out

    def _expand(self, text: str, counts) -> str:
        parts = text.split(self.image_token)
        pieces = [parts[0]]
        for part in parts[1:]:
            pieces.append(self.image_token * int(next(counts)))
            pieces.append(part)
        return "".join(pieces)
