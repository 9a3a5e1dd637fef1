"""KV-cache generation against `transformers` `generate` on a tiny random Qwen2.5-VL with
images in left-padded prompts of different lengths."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from qk_jax.convert.qwen2_5_vl import load_hf
from qk_jax.models.qwen2_5_vl import Qwen25VL, get_config
from qk_jax.models.qwen2_5_vl.generate import Generator, SamplingConfig, sample_logits
from qk_jax.parity.qwen2_5_vl import make_inputs
from qwen2_5_vl_util import save_random_checkpoint, torch_inputs

pytestmark = pytest.mark.slow  # generation parity against transformers

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_vl_gen") / "hf"
    cfg = get_config("tiny")
    # Larger weights than the parity tests: a sharper next-token distribution, fewer near-ties.
    hf = save_random_checkpoint(cfg, str(folder), seed=7)
    cfg, params = load_hf(folder)
    inputs = make_inputs(cfg, [(56, 84), (112, 56)], 90, 2, "left", seed=11)
    return dict(cfg=cfg, hf=hf, params=params, inputs=inputs, model=Qwen25VL(cfg))


def test_greedy_equals_hf_generate(setup):
    cfg, inputs = setup["cfg"], setup["inputs"]
    eos = cfg.text.eos_token_id
    with torch.no_grad():
        ref = setup["hf"].generate(
            **torch_inputs(inputs),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=cfg.text.pad_token_id,
        )
    ref = ref[:, inputs["input_ids"].shape[1] :].numpy()
    gen = Generator(setup["model"])
    ours = gen(
        setup["params"],
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        inputs["image_grid_thw"],
        max_new_tokens=NEW_TOKENS,
        eos_token_id=eos,
    )
    print("greedy tokens", ours.tolist())
    assert ref.shape == (2, NEW_TOKENS)
    np.testing.assert_array_equal(ours, ref)
    # EOS handling: declaring the first generated token of row 0 as EOS pads the rest of that row.
    stop = int(ref[0, 0])
    ours_eos = gen(
        setup["params"],
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        inputs["image_grid_thw"],
        max_new_tokens=NEW_TOKENS,
        eos_token_id=stop,
        pad_token_id=cfg.text.pad_token_id,
    )
    with torch.no_grad():
        ref_eos = setup["hf"].generate(
            **torch_inputs(inputs),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=cfg.text.pad_token_id,
        )
    np.testing.assert_array_equal(ours_eos, ref_eos[:, inputs["input_ids"].shape[1] :].numpy())
    assert (ours_eos[0, 1:] == cfg.text.pad_token_id).all()


def test_sampling(setup):
    inputs = setup["inputs"]
    args = (
        setup["params"],
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        inputs["image_grid_thw"],
    )
    sampler = Generator(setup["model"], SamplingConfig(temperature=1.0, top_k=50, top_p=0.9))
    a = sampler(*args, max_new_tokens=6, eos_token_id=-1, rng=jax.random.key(1))
    b = sampler(*args, max_new_tokens=6, eos_token_id=-1, rng=jax.random.key(1))
    c = sampler(*args, max_new_tokens=6, eos_token_id=-1, rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 6) and not np.array_equal(a, c)
    assert ((a >= 0) & (a < setup["cfg"].text.vocab_size)).all()


def test_sample_logits_filters():
    logits = jax.numpy.log(jax.numpy.array([[0.5, 0.3, 0.15, 0.05]] * 256))
    keys = jax.random.split(jax.random.key(0), 64)
    draws = np.stack([np.asarray(sample_logits(logits, k, SamplingConfig(1.0, top_k=2))) for k in keys[:8]])
    assert set(np.unique(draws)) <= {0, 1} and len(np.unique(draws)) == 2
    draws = np.stack([np.asarray(sample_logits(logits, k, SamplingConfig(1.0, top_p=0.7))) for k in keys[:8]])
    assert set(np.unique(draws)) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: tokens 0 and 1 only
    greedy = sample_logits(logits, keys[0], SamplingConfig())
    assert (np.asarray(greedy) == 0).all()


def test_right_padded_prompt_is_refused(setup):
    inputs = make_inputs(setup["cfg"], [], 40, 2, "right", seed=0)
    with pytest.raises(ValueError, match="left-padded"):
        Generator(setup["model"])(setup["params"], inputs["input_ids"], inputs["attention_mask"], max_new_tokens=2)
