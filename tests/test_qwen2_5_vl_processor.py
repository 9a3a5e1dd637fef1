"""`QwenVLProcessor` against transformers' own `Qwen2_5_VLProcessor` pipeline.

`Qwen2_5_VLProcessor` insists on a (torchvision) video processor; the reference here is the
real class with its video attribute declared away, so its `__call__` (placeholder
expansion, tokenisation, image processing) runs unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from qk_jax.convert.qwen2_5_vl import config_to_hf
from qk_jax.data.tokenizer import build_tokenizer
from qk_jax.models.qwen2_5_vl import get_config, get_rope_index
from qk_jax.models.qwen2_5_vl.processor import QwenVLProcessor


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_vl_proc")
    ids = build_tokenizer(str(path))
    cfg = get_config("tiny").with_special_tokens(ids)
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    return path, cfg


def hf_processor(folder):
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    tok = AutoTokenizer.from_pretrained(folder)
    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(), tokenizer=tok, video_processor=None, chat_template=tok.chat_template
    )


def images():
    rng = np.random.default_rng(0)
    return [
        PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((60, 90), (120, 50), (77, 77))
    ]


def test_matches_hf_processor(folder):
    path, cfg = folder
    ours, ref_proc = QwenVLProcessor.from_pretrained(path), hf_processor(path)
    msgs = [
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "make the red circle blue"}, {"type": "image"}],
            }
        ],
        [{"role": "user", "content": [{"type": "text", "text": "draw"}, {"type": "image"}]}],
    ]
    texts = [ours.apply_chat_template(m) for m in msgs]
    assert texts == [ref_proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    imgs = images()
    for side in ("left", "right"):
        ref = ref_proc(text=texts, images=imgs, return_tensors="np", padding=True, padding_side=side)
        got = ours(texts, images=[imgs[:2], imgs[2:]], padding_side=side)
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{key} ({side} padding)")
    # Static length: the same tokens, more padding.
    static = ours(texts, images=imgs, max_length=200, padding_side="left")
    assert static["input_ids"].shape == (2, 200)
    for row in range(2):
        np.testing.assert_array_equal(
            static["input_ids"][row][static["attention_mask"][row] > 0],
            got["input_ids"][row][got["attention_mask"][row] > 0],
        )
    # The grids agree with the model config's image-token accounting.
    get_rope_index(
        static["input_ids"],
        static["image_grid_thw"],
        static["attention_mask"],
        image_token_id=cfg.image_token_id,
        spatial_merge_size=cfg.vision.spatial_merge_size,
    )
    with pytest.raises(ValueError, match="max_length"):
        ours(texts, images=imgs, max_length=20)
    with pytest.raises(ValueError, match="placeholders"):
        ours(texts, images=imgs[:2])


def test_preprocessor_config_is_honoured(folder, tmp_path):
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    path, _ = folder
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path)
    custom = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 16, max_pixels=28 * 28 * 20)
    custom.save_pretrained(tmp_path)
    proc = QwenVLProcessor.from_pretrained(tmp_path)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])
    out = proc([text], images=images()[:1])
    expected = custom(images=images()[:1], return_tensors="np")["image_grid_thw"]
    default = Qwen2VLImageProcessorPil()(images=images()[:1], return_tensors="np")["image_grid_thw"]
    assert not np.array_equal(expected, default)  # the saved min/max pixels change the resize
    np.testing.assert_array_equal(out["image_grid_thw"], expected)
    assert int((out["input_ids"] == proc.image_token_id).sum()) == int(np.prod(expected)) // 4


def test_demo_config_runs_with_the_offline_tokenizer(tmp_path):
    """`demo` uses the special-token ids of `build_tokenizer()`; processor -> model -> generate."""
    import flax.linen as nn
    import jax

    from qk_jax.models.qwen2_5_vl import Qwen25VL, init_params
    from qk_jax.models.qwen2_5_vl.generate import generate

    ids = build_tokenizer(str(tmp_path))
    cfg = get_config("demo")
    assert cfg.with_special_tokens(ids) == cfg
    proc = QwenVLProcessor.from_pretrained(tmp_path)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "make the orange hexagon purple"}]}]
    )
    batch = proc([text, text.replace("purple", "green")], images=images()[:2], max_length=96)
    model = Qwen25VL(cfg)
    params = nn.meta.unbox(init_params(model, jax.random.key(0)))
    out = generate(
        model,
        params,
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["image_grid_thw"],
        max_new_tokens=3,
    )
    assert out.shape[0] == 2 and 1 <= out.shape[1] <= 3 and (out < cfg.text.vocab_size).all()
    assert all(isinstance(s, str) for s in proc.decode(out))
