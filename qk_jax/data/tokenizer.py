"""A small Qwen2-style tokenizer for offline work (tests, the CPU demo).

Real runs use the tokenizer of the user's Qwen2.5-VL checkpoint folder. No tokenizer
can be downloaded here, so `build_tokenizer` trains a byte-level BPE on a given corpus
(e.g. the Kontext-Shapes prompt vocabulary), adds the Qwen2.5-VL special tokens and chat
template, and saves a folder that `transformers.AutoTokenizer.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

# The Qwen2.5-VL special tokens, in Qwen's order (their ids follow the BPE vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The Qwen2-VL chat template (message list -> prompt text with vision placeholders).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_CORPUS = (
    "You are a helpful assistant.",
    "system user assistant",
    "Picture Video",
    "a photo of a red circle left of a blue square",
    "draw two green triangles above a yellow star",
    "make the orange hexagon purple",
    "remove the cyan star",
    "add a magenta circle",
    "move it to the right",
    "small medium large",
    "the same subject in a new scene",
    "reconstruct this image",
    "flip rotate invert",
    "0 1 2 3 4 5 6 7 8 9 one two three four",
    "top bottom middle center left right above below",
)


def build_tokenizer(out_dir: str, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 1000) -> dict[str, int]:
    """Trains a byte-level BPE on `corpus`, saves a Qwen2 tokenizer folder at `out_dir`.

    Returns the ids of the special tokens (`{"<|image_pad|>": ..., ...}`), which a model
    config needs (`image_token_id`, `vision_start_token_id`, ...). The byte-level
    alphabet makes every string encodable, whatever the corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    n_regular = vocab_size - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=n_regular,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    with open(os.path.join(out_dir, "special_token_ids.json"), "w") as f:
        json.dump(ids, f, indent=2)
    return ids
