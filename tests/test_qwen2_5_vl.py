"""Qwen2.5-VL against the real `transformers.Qwen2_5_VLForConditionalGeneration` (float32,
highest matmul precision) on a tiny random checkpoint: vocab 1000, 3 vision blocks (window,
full, window), 2 decoder layers with GQA 4/2, two non-square images per row, a padded
batch of 2 with prompts >= 512 tokens; plus config round trips, parameter counts, the
weight mapping both ways, sharding and export."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qk_jax import sharding
from qk_jax.convert import safetensors_io
from qk_jax.convert.mapping import MappingError
from qk_jax.convert.qwen2_5_vl import config_from_hf, config_to_hf, detect_layout, export_hf, hf_mapping, load_hf
from qk_jax.data.tokenizer import build_tokenizer
from qk_jax.models.qwen2_5_vl import (
    ConfigError,
    Qwen25VL,
    build_image_plan,
    build_vision_plan,
    extend_position_ids,
    get_config,
    get_rope_index,
    init_params,
    pad_patches,
    param_count,
    prepare_inputs,
)
from qk_jax.parity.qwen2_5_vl import make_inputs
from qk_jax.tree import flatten_tree
from qwen2_5_vl_util import rel_err, save_random_checkpoint, torch_inputs

IMAGES = [(84, 140), (112, 84)]  # HxW: grids 6x10 and 8x6 patches -> uneven 2x2-token windows
PROMPT = 560


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_vl")
    ids = build_tokenizer(str(root / "tokenizer"))
    cfg = get_config("tiny").with_special_tokens(ids)
    hf = save_random_checkpoint(cfg, str(root / "hf"))
    loaded_cfg, params = load_hf(root / "hf")
    assert loaded_cfg == cfg
    model = Qwen25VL(cfg)
    inputs = make_inputs(cfg, IMAGES, PROMPT, 2, "left", seed=1)
    host = prepare_inputs(cfg, inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"])
    with torch.no_grad():
        ref = hf(**torch_inputs(inputs), output_hidden_states=True)
    forward = jax.jit(
        lambda p, ids, pos, m, px, plan: model.apply({"params": p}, ids, pos, m, px, plan, output_hidden_states=True)
    )
    ours = forward(
        params,
        inputs["input_ids"],
        host["position_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        host["vision_plan"],
    )
    return dict(
        cfg=cfg,
        hf=hf,
        folder=root / "hf",
        params=params,
        model=model,
        inputs=inputs,
        host=host,
        ref=ref,
        ours=jax.tree.map(np.asarray, ours),
        forward=forward,
        root=root,
    )


# ----------------------------------------------------------------------------- config


@pytest.mark.slow  # parity against transformers
def test_config_round_trip_and_hf_acceptance(tiny):
    from transformers import Qwen2_5_VLConfig

    for cfg in (tiny["cfg"], get_config("3b"), get_config("7b"), get_config("demo")):
        d = config_to_hf(cfg)
        assert config_from_hf(d) == cfg
        hf = Qwen2_5_VLConfig(**d)  # what from_pretrained builds from config.json
        assert config_from_hf(hf.to_dict()) == cfg
    saved = json.loads((tiny["folder"] / "config.json").read_text())
    assert config_from_hf(saved) == tiny["cfg"]


def test_legacy_flat_hub_config_is_read():
    # The layout of Qwen2.5-VL-7B-Instruct's config.json on the Hub (transformers 4.x).
    flat = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 152064,
    }
    assert config_from_hf(flat) == get_config("7b")


def test_invalid_configs_name_the_field():
    cfg = get_config("tiny")
    with pytest.raises(ConfigError, match="mrope_section"):
        cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "mrope_section": (4, 4, 4)}))
    with pytest.raises(ConfigError, match="fullatt_block_indexes"):
        cfg.replace(vision=cfg.vision.__class__(**{**cfg.vision.__dict__, "fullatt_block_indexes": (5,)}))
    with pytest.raises(ConfigError, match="use_sliding_window"):
        config_from_hf(
            {**config_to_hf(cfg), "text_config": {**config_to_hf(cfg)["text_config"], "use_sliding_window": True}}
        )


def test_param_counts_equal_hf():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    for name in ("3b", "7b"):
        cfg = get_config(name)
        with torch.device("meta"):
            hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config_to_hf(cfg)))
        expected = sum(p.numel() for p in hf.parameters())
        assert param_count(cfg) == expected, name
        print(f"{name}: {expected:,} parameters (ours == HF)")


# ----------------------------------------------------------------------------- weights


def test_mapping_covers_every_tensor_both_ways(tiny):
    cfg = tiny["cfg"]
    mapping = hf_mapping(cfg, "hub")
    jax_paths = list(flatten_tree(tiny["params"]))
    file_names = safetensors_io.tensor_names(tiny["folder"])  # Hub / save_pretrained layout
    module_names = list(tiny["hf"].state_dict())  # transformers-5 module layout
    assert any(n.startswith("visual.") for n in file_names) and any(n.startswith("model.visual.") for n in module_names)
    mapping.check_coverage(file_names, jax_paths)
    assert detect_layout(file_names) == "hub" and detect_layout(module_names) == "module"
    hf_mapping(cfg, "module").check_coverage(module_names, jax_paths)
    with pytest.raises(MappingError):
        mapping.check_coverage(file_names[:-1], jax_paths)
    with pytest.raises(MappingError):
        mapping.check_coverage(file_names, jax_paths + ["visual/blocks/extra/kernel"])
    # The model's own parameter tree is exactly what the mapping produces.
    init_paths = set(
        flatten_tree(nn.meta.unbox(jax.eval_shape(lambda r: init_params(tiny["model"], r), jax.random.key(0))))
    )
    assert init_paths == set(jax_paths)
    exported = dict(mapping.to_hf(tiny["params"]))
    assert sorted(exported) == sorted(file_names)


@pytest.mark.slow  # parity against transformers
def test_export_round_trip_gives_identical_logits_in_transformers(tiny):
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tiny["root"] / "exported"
    export_hf(out, tiny["cfg"], tiny["params"], max_shard_bytes=200_000)  # several shards + index
    assert (out / "model.safetensors.index.json").exists()
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    sd_ref, sd_back = tiny["hf"].state_dict(), back.state_dict()
    assert sd_ref.keys() == sd_back.keys()
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd_back[k]), k
    with torch.no_grad():
        logits = back(**torch_inputs(tiny["inputs"])).logits
    assert torch.equal(logits, tiny["ref"].logits)


# ----------------------------------------------------------------------------- parity


def test_rope_index_matches_hf_left_and_right_padding(tiny):
    cfg = tiny["cfg"]
    for padding in ("left", "right"):
        inputs = make_inputs(cfg, IMAGES, 120, 2, padding, seed=2)
        t = torch_inputs(inputs)
        ref, ref_delta = tiny["hf"].model.get_rope_index(
            t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"], attention_mask=t["attention_mask"]
        )
        ours, delta = get_rope_index(
            inputs["input_ids"],
            inputs["image_grid_thw"],
            inputs["attention_mask"],
            image_token_id=cfg.image_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size,
        )
        np.testing.assert_array_equal(ours, ref.numpy())
        np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])


@pytest.mark.slow  # parity against transformers
def test_vision_tower_matches_hf(tiny):
    cfg, inputs = tiny["cfg"], tiny["inputs"]
    with torch.no_grad():
        ref = torch.cat(
            tiny["hf"]
            .model.get_image_features(
                torch.from_numpy(inputs["pixel_values"]), torch.from_numpy(inputs["image_grid_thw"])
            )
            .pooler_output
        )
    vision = jax.jit(lambda p, px, plan: tiny["model"].apply({"params": p}, px, plan, method=Qwen25VL.vision))
    ours = vision(tiny["params"], inputs["pixel_values"], tiny["host"]["vision_plan"])
    err = rel_err(ours, ref.numpy())
    print(f"vision tower rel err {err:.2e}")
    assert err < 1e-5
    # The window/full switch matters: attending over whole images in every block is far off.
    plan = tiny["host"]["vision_plan"]
    assert len(np.unique(plan.window_segments)) > len(np.unique(plan.full_segments)) == len(inputs["image_grid_thw"])
    no_windows = vision(tiny["params"], inputs["pixel_values"], plan._replace(window_segments=plan.full_segments))
    assert rel_err(no_windows, ref.numpy()) > 1e-3
    # A static bucket: padding the patches changes nothing for the real tokens.
    n, unit = inputs["pixel_values"].shape[0], cfg.vision.merge_unit
    padded_plan = build_vision_plan(inputs["image_grid_thw"], cfg.vision, pad_to=n + 3 * unit)
    padded_px = pad_patches(inputs["pixel_values"], n + 3 * unit)
    padded_px[n:] = 1.0  # the padding's content must not matter
    padded = vision(tiny["params"], padded_px, padded_plan)
    assert padded.shape[0] == ours.shape[0] + 3
    np.testing.assert_allclose(padded[: ours.shape[0]], ours, rtol=0, atol=1e-6)
    # Videos-style grids (several frames, attention per frame) follow HF's tower too.
    m = cfg.vision.spatial_merge_size
    grid = np.array([[2, 3 * m, 2 * m], [1, m, 5 * m], [3, 2 * m, 2 * m]])
    px = np.random.default_rng(6).standard_normal((int(np.prod(grid, -1).sum()), cfg.vision.patch_dim))
    px = px.astype(np.float32)
    with torch.no_grad():
        ref = tiny["hf"].model.visual(torch.from_numpy(px), grid_thw=torch.from_numpy(grid)).pooler_output
    assert rel_err(vision(tiny["params"], px, build_vision_plan(grid, cfg.vision)), ref.numpy()) < 1e-5


@pytest.mark.slow  # parity against transformers
def test_batched_vision_layout_equals_flat_and_hf(tiny, devices):
    """Images sharing one grid, run as (I, P, D) with the plan of one image, give the flat
    layout's outputs (and HF's); the embeddings agree with the row-local gather too, also
    with the image axis split over the mesh."""
    cfg, model, params = tiny["cfg"], tiny["model"], tiny["params"]
    inputs = make_inputs(cfg, [IMAGES[0]] * 2, 200, 4, "left", seed=9)  # 4 rows x 2 images of one grid
    grid, px = inputs["image_grid_thw"], inputs["pixel_values"]
    images = len(grid)
    vision = jax.jit(lambda p, px, plan: model.apply({"params": p}, px, plan, method=Qwen25VL.vision))
    flat = np.asarray(vision(params, px, build_vision_plan(grid, cfg.vision)))
    plan = build_image_plan(grid, cfg.vision)
    assert plan.window_segments.shape == (int(np.prod(grid[0])),)
    batched = np.asarray(vision(params, px.reshape(images, -1, px.shape[-1]), plan))
    assert batched.shape == (images, flat.shape[0] // images, flat.shape[1])
    err = rel_err(batched.reshape(flat.shape), flat)
    print(f"batched vs flat vision rel err {err:.2e}")
    assert err <= 1e-6
    with torch.no_grad():
        ref = tiny["hf"].model.visual(torch.from_numpy(px), grid_thw=torch.from_numpy(grid)).pooler_output
    assert rel_err(batched.reshape(flat.shape), ref.numpy()) < 1e-5
    with pytest.raises(ValueError, match="different grids"):
        build_image_plan(np.array([[1, 6, 10], [1, 8, 6]]), cfg.vision)
    with pytest.raises(ValueError, match="plan of one image"):
        vision(params, px.reshape(images, -1, px.shape[-1]), build_vision_plan(grid, cfg.vision))
    # Embeddings: global gather over the flat layout == row-local gather over the batched one,
    # unsharded and with rows and images split over (data, fsdp).
    embed = lambda p, ids, px, plan, own: model.apply({"params": p}, ids, px, plan, own, method=Qwen25VL.embed)
    ref_embeds = np.asarray(
        jax.jit(embed, static_argnums=4)(params, inputs["input_ids"], px, build_vision_plan(grid, cfg.vision), False)
    )
    mesh = sharding.make_mesh((2, 2, 1))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.activation_rules()):
        placed = sharding.place_batch({"ids": inputs["input_ids"], "px": px.reshape(images, -1, px.shape[-1])}, mesh)
        ours = jax.jit(embed, static_argnums=4)(params, placed["ids"], placed["px"], plan, True)
    assert rel_err(ours, ref_embeds) <= 1e-6


@pytest.mark.slow  # parity against transformers
def test_embeddings_every_layer_and_logits_match_hf(tiny):
    ref, ours = tiny["ref"], tiny["ours"]
    valid = tiny["inputs"]["attention_mask"].astype(bool)
    assert valid.sum(-1).min() >= 512 and not valid.all()
    assert len(ref.hidden_states) == ours["hidden_states"].shape[0] == tiny["cfg"].text.num_hidden_layers + 1
    errs = [rel_err(ours["hidden_states"][i][valid], h.numpy()[valid]) for i, h in enumerate(ref.hidden_states)]
    logit_err = rel_err(ours["logits"][valid], ref.logits.numpy()[valid])
    print(f"hidden-state rel errs {[f'{e:.1e}' for e in errs]}, logits {logit_err:.2e}")
    assert errs[0] < 1e-5  # merged embeddings
    assert max(errs) < 1e-4 and logit_err < 1e-4
    # Greedy tokens agree wherever the reference is not a near tie.
    np.testing.assert_array_equal(ours["logits"][valid].argmax(-1), ref.logits.numpy()[valid].argmax(-1))


@pytest.mark.slow  # parity against transformers
def test_right_padding_matches_hf(tiny):
    cfg, hf = tiny["cfg"], tiny["hf"]
    inputs = make_inputs(cfg, IMAGES[::-1], 530, 2, "right", seed=3)
    host = prepare_inputs(cfg, inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"])
    with torch.no_grad():
        ref = hf(**torch_inputs(inputs)).logits.numpy()
    ours = tiny["forward"](
        tiny["params"],
        inputs["input_ids"],
        host["position_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        host["vision_plan"],
    )["logits"]
    valid = inputs["attention_mask"].astype(bool)
    assert rel_err(np.asarray(ours)[valid], ref[valid]) < 1e-4


@pytest.mark.slow  # parity against transformers
def test_embed_decode_with_appended_tokens_matches_hf(tiny):
    """The Query-Kontext call pattern: embed the prompt, append K embeddings, extend the
    positions with `extend_position_ids`, decode. Appending K tokens in HF gives the same."""
    cfg, model, params, inputs, host = tiny["cfg"], tiny["model"], tiny["params"], tiny["inputs"], tiny["host"]
    k = 6
    extra = np.random.default_rng(4).integers(0, 400, size=(2, k))
    embeds = model.apply(
        {"params": params}, inputs["input_ids"], inputs["pixel_values"], host["vision_plan"], method=Qwen25VL.embed
    )
    extra_embeds = model.apply({"params": params}, extra, method=Qwen25VL.embed)
    pos = np.concatenate(
        [host["position_ids"], extend_position_ids(host["position_ids"], inputs["attention_mask"], k)], axis=-1
    )
    mask = np.concatenate([inputs["attention_mask"], np.ones((2, k), np.int64)], axis=1)
    hidden, states = jax.jit(lambda p, e, pos, m: model.apply({"params": p}, e, pos, m, True, method=Qwen25VL.decode))(
        params, jnp.concatenate([embeds, extra_embeds], axis=1), pos, mask
    )
    logits = model.apply({"params": params}, hidden, method=Qwen25VL.logits)
    t = torch_inputs(
        dict(
            inputs,
            input_ids=np.concatenate([inputs["input_ids"], extra], 1),
            attention_mask=mask,
            mm_token_type_ids=np.concatenate([inputs["mm_token_type_ids"], 0 * extra], 1),
        )
    )
    with torch.no_grad():
        ref = tiny["hf"](**t, output_hidden_states=True)
    assert states.shape[0] == cfg.text.num_hidden_layers + 1
    assert rel_err(hidden[:, -k:], ref.hidden_states[-1].numpy()[:, -k:]) < 1e-4
    assert rel_err(logits[:, -k:], ref.logits.numpy()[:, -k:]) < 1e-4


def test_logical_names_are_covered_by_vlm_rules(tiny):
    _, specs = sharding.abstract_init(lambda r: init_params(tiny["model"], r), jax.random.key(0))
    names = {
        n
        for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        for n in spec
        if n is not None
    }
    assert names and names <= {name for name, _ in sharding.VLM_RULES}, names - {n for n, _ in sharding.VLM_RULES}


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 2, 4)])
def test_sharded_mesh_equals_unsharded(tiny, devices, mesh_shape):
    """(2, 4, 1): batch over data x fsdp, weights over fsdp; (1, 2, 4): tensor-parallel heads/MLP/vocab."""
    cfg, model = tiny["cfg"], tiny["model"]
    mesh = sharding.make_mesh(mesh_shape)
    # 8 rows so the batch splits over data x fsdp; the vision tower sees all 16 images.
    inputs = make_inputs(cfg, IMAGES, 520, 8, "left", seed=5)
    host = prepare_inputs(cfg, inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"])
    args = (
        inputs["input_ids"],
        host["position_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        host["vision_plan"],
    )
    unsharded = np.asarray(tiny["forward"](tiny["params"], *args)["logits"])
    _, specs = sharding.abstract_init(lambda r: {"vlm": init_params(model, r)}, jax.random.key(0))
    shardings = sharding.tree_shardings({"vlm": tiny["params"]}, specs, mesh)
    params = jax.device_put({"vlm": tiny["params"]}, shardings)
    q_spec = tuple(params["vlm"]["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec)
    assert q_spec == ((None, "fsdp") if mesh_shape[2] == 1 else (None, "fsdp", "tensor"))
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.activation_rules()):
        batch = sharding.place_batch({"ids": args[0], "mask": args[2]}, mesh)
        pos = jax.device_put(
            args[1],
            jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec(None, batch_axes if len(batch_axes) > 1 else batch_axes[0])
            ),
        )
        out = jax.jit(lambda p, ids, pos, m, px, plan: model.apply({"params": p["vlm"]}, ids, pos, m, px, plan))(
            params, batch["ids"], pos, batch["mask"], args[3], args[4]
        )
    valid = inputs["attention_mask"].astype(bool)
    assert rel_err(np.asarray(out["logits"])[valid], unsharded[valid]) < 1e-5


def test_remat_and_attention_impl_switches_agree(tiny):
    """remat="dots" and the `jax.nn.dot_product_attention` path give the same forward and
    (for remat) the same gradients as the defaults."""
    cfg, params = tiny["cfg"], tiny["params"]
    inputs = make_inputs(cfg, IMAGES[:1], 64, 2, "left", seed=8)
    host = prepare_inputs(cfg, inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"])
    args = (
        inputs["input_ids"],
        host["position_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        host["vision_plan"],
    )

    def loss(model):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, *args)["logits"] ** 2)))

    base_loss, base_grad = loss(tiny["model"])(params)
    remat_loss, remat_grad = loss(Qwen25VL(cfg.replace(remat="dots")))(params)
    assert abs(float(remat_loss) - float(base_loss)) <= 1e-6 * abs(float(base_loss))
    grad_err = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(remat_grad), jax.tree.leaves(base_grad)))
    assert grad_err < 1e-5
    assert float(jnp.abs(base_grad["visual"]["patch_embed"]["kernel"]).max()) > 0  # gradients reach the pixels' side
    fused = Qwen25VL(cfg.replace(attention_impl="dot_product"))
    ours = jax.jit(lambda p: fused.apply({"params": p}, *args)["logits"])(params)
    base = jax.jit(lambda p: tiny["model"].apply({"params": p}, *args)["logits"])(params)
    valid = inputs["attention_mask"].astype(bool)
    assert rel_err(np.asarray(ours)[valid], np.asarray(base)[valid]) < 1e-5


def test_bfloat16_compute_runs_close_to_float32(tiny):
    model16 = Qwen25VL(tiny["cfg"], dtype=jnp.bfloat16)
    inputs, host = tiny["inputs"], tiny["host"]
    out = jax.jit(
        lambda p: model16.apply(
            {"params": p},
            inputs["input_ids"],
            host["position_ids"],
            inputs["attention_mask"],
            inputs["pixel_values"],
            host["vision_plan"],
        )
    )(tiny["params"])
    valid = inputs["attention_mask"].astype(bool)
    assert out["logits"].dtype == jnp.float32
    assert rel_err(np.asarray(out["logits"])[valid], tiny["ours"]["logits"][valid]) < 5e-2
