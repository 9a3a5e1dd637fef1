"""VLM inputs of the pipeline: the processor protocol, encoding a batch, flattening slots.

The pipeline takes the VLM processor as an injected object following the interface of
`qk_jax.models.qwen2_5_vl.processor.QwenVLProcessor` (tokenizer + torchvision-free
`Qwen2VLImageProcessorPil` + image-pad expansion), so another processor can replace it:

    processor.apply_chat_template(messages, add_generation_prompt=True) -> str
    processor(texts, images=[[img, ...] per text], max_length=T, padding_side="left")
        -> {"input_ids": (B, T) int, "attention_mask": (B, T) int,
            "pixel_values": (N_patches, D) float32, "image_grid_thw": (N_images, 3) int}
        (images sample by sample, in order; a row longer than T raises ValueError)
    processor.image_processor.patch_size / merge_size / temporal_patch_size / size
    processor.tokenizer(texts)["input_ids"] -> token ids per text (no padding)

`encode` builds one user message per sample (its images first, then the prompt) and
calls the processor; `row_lengths` counts the tokens a row will take without processing
its images (the pipeline's plan groups records by it); `template_prefix` gives the tokens
every templated prompt starts with; `flat_vlm_inputs` turns the pipeline's per-slot layout
back into the flat `pixel_values` / `image_grid_thw` the VLM's `prepare_inputs` takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from qk_jax import paths


class VLMProcessor(Protocol):
    image_processor: object
    tokenizer: object

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str: ...

    def __call__(
        self, text, images=None, *, max_length: int | None = None, padding_side: str = "left"
    ) -> dict[str, np.ndarray]: ...


# The files of a HF checkpoint folder that make up its tokenizer and processor (never weights).
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "special_token_ids.json",
)


def copy_processor(src: str, dst: str, field: str) -> list[str]:
    """Copies the tokenizer / processor files of `src` (a HF checkpoint or tokenizer folder) to
    `dst`; returns their names. Weights and everything else stay behind. `field` (the config
    field that named `src`) appears in the errors."""
    if not paths.isdir(src):
        raise FileNotFoundError(f"config field {field}: folder {src} does not exist")
    names = [n for n in PROCESSOR_FILES if paths.isfile(paths.join(src, n))]
    if "tokenizer_config.json" not in names:
        raise FileNotFoundError(
            f"config field {field}: {src} holds no tokenizer (no tokenizer_config.json); name a "
            "HF Qwen2.5-VL folder or a tokenizer folder"
        )
    paths.makedirs(dst)
    for name in names:  # local paths or URLs on either side (`paths`)
        paths.path(paths.join(src, name)).copy(paths.join(dst, name), overwrite=True)
    return names


def load_processor(folder: str, **image_kwargs) -> VLMProcessor:
    """The project's Qwen2.5-VL processor for a checkpoint or tokenizer folder."""
    from qk_jax.models.qwen2_5_vl.processor import QwenVLProcessor

    return QwenVLProcessor.from_pretrained(folder, **image_kwargs)


def vision_geometry(processor: VLMProcessor) -> dict[str, int]:
    """patch / merge / temporal sizes, patch_dim and min / max pixels of the image processor."""
    ip = processor.image_processor
    size = getattr(ip, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda k, d=None: getattr(size, k, d)
    patch, temporal = int(ip.patch_size), int(ip.temporal_patch_size)
    return {
        "patch_size": patch,
        "merge_size": int(ip.merge_size),
        "temporal_patch_size": temporal,
        "patch_dim": 3 * temporal * patch * patch,
        "min_pixels": int(get("shortest_edge", None) or getattr(ip, "min_pixels", 0) or 0),
        "max_pixels": int(get("longest_edge", None) or getattr(ip, "max_pixels", 0) or 2**62),
    }


def templated_texts(processor: VLMProcessor, prompts: Sequence[str], image_counts: Sequence[int]) -> list[str]:
    """One chat-templated user message per sample: its `image_counts[i]` images first, then the prompt."""
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"} for _ in range(n)] + [{"type": "text", "text": p}]}]
        )
        for p, n in zip(prompts, image_counts)
    ]


def encode(
    processor: VLMProcessor,
    prompts: Sequence[str],
    images_per_sample: Sequence[Sequence[np.ndarray]],
    max_length: int,
    padding_side: str = "left",
) -> dict[str, np.ndarray]:
    """Chat-templated, tokenized, image-processed batch padded to `max_length` (see module docstring)."""
    if len(prompts) != len(images_per_sample):
        raise ValueError(f"{len(prompts)} prompts but {len(images_per_sample)} image lists")
    texts = templated_texts(processor, prompts, [len(ims) for ims in images_per_sample])
    images = [list(ims) for ims in images_per_sample]
    try:
        out = processor(texts, images=images if any(images) else None, max_length=max_length, padding_side=padding_side)
    except ValueError as e:
        if "max_length" in str(e):
            raise ValueError(f"{e}; raise data.max_text_len (image tokens count too)") from None
        raise
    return out


def row_lengths(
    processor: VLMProcessor, prompts: Sequence[str], image_counts: Sequence[int], tokens_per_image: Sequence[int]
) -> np.ndarray:
    """(B,) the unpadded token count `encode` gives each row, without processing any image:
    the templated text with one image-pad token per image, each expanded to that image's
    `tokens_per_image[i]` tokens (its patches / merge^2 at the VLM size)."""
    ids = processor.tokenizer(templated_texts(processor, prompts, image_counts))["input_ids"]
    return np.asarray([len(row) + n * (k - 1) for row, n, k in zip(ids, image_counts, tokens_per_image)], np.int64)


def template_prefix(processor: VLMProcessor) -> list[int]:
    """The token ids every templated prompt starts with (system prompt, user-turn header):
    the common prefix of two templated prompts that share no first token. Under the VLM's
    causal attention their hidden states are the same for every prompt."""
    a, b = processor.tokenizer(templated_texts(processor, ["red", "7"], [0, 0]))["input_ids"]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return list(a[:n])


def tokens_per_image(geometry: dict[str, int], height: int, width: int) -> int:
    """VLM tokens of one (height, width) input image: its patches / merge^2."""
    p, m = geometry["patch_size"], geometry["merge_size"]
    return (height // p) * (width // p) // (m * m)


def flat_vlm_inputs(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values (N, D), image_grid_thw (N_img, 3)) of the valid slots, sample by sample.

    The order is that of the image-pad tokens in `batch["input_ids"]`; within a batch
    every row has the same number of inputs, so N is static per (bucket, input count).
    """
    valid = batch["cond_mask"]
    pv, grid = batch["pixel_values"][valid], batch["image_grid_thw"][valid]
    return pv.reshape(-1, pv.shape[-1]), grid
