"""VLM inputs for the pipeline: the processor protocol and an adapter over Hugging Face pieces.

The grain pipeline takes the VLM processor as an injected callable, so the project's own
`qk_jax.models.qwen2_5_vl.processor.QwenVLProcessor` (or any other) can replace the
adapter here. The protocol:

    processor(texts: list[str], images_per_sample: list[list[np.ndarray]], *, max_length: int)
        -> {"input_ids": (B, max_length) int, "attention_mask": (B, max_length) int,
            "pixel_values": (N_patches_total, D) float32,
            "image_grid_thw": (N_images_total, 3) int}

- `texts[b]` is the user's prompt; the processor applies the chat template, with one
  image placeholder per image of `images_per_sample[b]` (uint8 (H, W, 3)) before it,
  and expands each placeholder into grid_t * grid_h * grid_w / merge**2 image tokens.
- Right-padded to exactly `max_length`; a sample that does not fit raises ValueError.
- `pixel_values` / `image_grid_thw` list the images sample by sample, in order.

`HFQwenVLInputs` implements it with `transformers.AutoTokenizer` (e.g. a folder from
`qk_jax.data.tokenizer.build_tokenizer`, or a real Qwen2.5-VL checkpoint folder) and
`transformers.Qwen2VLImageProcessorPil` (the torchvision-free image processor).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

IMAGE_PAD = "<|image_pad|>"


class VLMProcessor(Protocol):
    def __call__(self, texts: Sequence[str], images_per_sample: Sequence[Sequence[np.ndarray]], *,
                 max_length: int) -> dict[str, np.ndarray]:
        ...


class HFQwenVLInputs:
    """The protocol above over a HF tokenizer folder + Qwen2VLImageProcessorPil.

    Loads lazily, so it pickles cheaply into grain worker processes.
    """

    def __init__(self, tokenizer_dir: str, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                 min_pixels: int = 28 * 28, max_pixels: int = 28 * 28 * 1280):
        self.tokenizer_dir = str(tokenizer_dir)
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self._tok = self._ip = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_tok", "_ip")}

    def __setstate__(self, state):
        self.__dict__.update(state, _tok=None, _ip=None)

    def _load(self):
        if self._tok is None:
            from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

            self._tok = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            self._ip = Qwen2VLImageProcessorPil(
                patch_size=self.patch_size, merge_size=self.merge_size, temporal_patch_size=self.temporal_patch_size,
                size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels})
        return self._tok, self._ip

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def __call__(self, texts, images_per_sample, *, max_length: int) -> dict[str, np.ndarray]:
        tok, ip = self._load()
        if len(texts) != len(images_per_sample):
            raise ValueError(f"{len(texts)} texts but {len(images_per_sample)} image lists")
        flat = [np.asarray(im) for ims in images_per_sample for im in ims]
        if flat:
            vis = ip(images=flat, return_tensors="np")
            pixel_values = np.asarray(vis["pixel_values"], np.float32)
            grids = np.asarray(vis["image_grid_thw"], np.int64)
        else:
            pixel_values, grids = np.zeros((0, self.patch_dim), np.float32), np.zeros((0, 3), np.int64)
        prompts, g = [], 0
        for text, ims in zip(texts, images_per_sample):
            content = [{"type": "image"} for _ in ims] + [{"type": "text", "text": text}]
            chat = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
            parts = chat.split(IMAGE_PAD)
            if len(parts) != len(ims) + 1:
                raise ValueError(f"chat template produced {len(parts) - 1} image placeholders for {len(ims)} images")
            out = parts[0]
            for part in parts[1:]:
                out += IMAGE_PAD * int(np.prod(grids[g]) // self.merge_size ** 2) + part
                g += 1
            prompts.append(out)
        enc = tok(prompts, padding="max_length", max_length=max_length, truncation=False)
        lengths = [len(x) for x in enc["input_ids"]]
        if max(lengths) > max_length:
            worst = int(np.argmax(lengths))
            raise ValueError(f"prompt {worst} of the batch needs {lengths[worst]} tokens (image tokens included) "
                             f"> max_length {max_length}; raise data.max_text_len")
        return {"input_ids": np.asarray(enc["input_ids"], np.int32),
                "attention_mask": np.asarray(enc["attention_mask"], np.int32),
                "pixel_values": pixel_values, "image_grid_thw": grids}
