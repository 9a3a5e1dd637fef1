"""`benchmarks/oracle_condition.py`: the facts of a prompt become condition tokens that tell
prompts apart, and the script trains the stage's DiT on them, samples and judges on a real
Kontext-Shapes folder; `benchmarks/latent_oracle.py` does the same in the latent space of an
autoencoder it trains first."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import latent_oracle  # noqa: E402
from benchmarks import oracle_condition as oc  # noqa: E402
from benchmarks.conv_reference import to_uint8  # noqa: E402
from tests.test_benchmarks import run_script  # noqa: E402


def _record_with(spec: dict) -> dict:
    return {"id": "r", "scene": json.dumps({"spec": spec})}


def test_facts_follow_the_prompts_spec():
    """Each object row holds its shape, colour, size and cell ("any" where the prompt is silent)
    and its slot; the last row the relation and its two slots; rows past the prompt are empty.
    Generated records of every kind read without error."""
    from qk_jax.data import records

    spec = {
        "objects": [
            {"shape": "circle", "colour": "green", "size": None, "cell": None},
            {"shape": "hexagon", "colour": "purple", "size": "large", "cell": "top left"},
        ],
        "relations": [[0, "left of", 1]],
    }
    facts = oc.spec_facts(_record_with(spec))
    assert facts.shape == (oc.MAX_OBJECTS + 1, 8)
    f = oc.FACTS
    assert list(facts[0, :5]) == [f["shape"].index("circle"), f["colour"].index("green"), 0, 0, 0]
    assert list(facts[1, :5]) == [
        f["shape"].index("hexagon"),
        f["colour"].index("purple"),
        f["size"].index("large"),
        f["cell"].index("top left"),
        1,
    ]
    assert (facts[2:4] == -1).all()
    assert list(facts[oc.MAX_OBJECTS, 5:]) == [f["relation"].index("left of"), 0, 1]
    for i in range(24):
        oc.spec_facts(records.normalize(records.generate_record("t2i", i, height=64)))
    with pytest.raises(ValueError, match="more than"):
        oc.spec_facts(_record_with(dict(spec, objects=spec["objects"] * 3)))


def test_fact_tokens_mask_what_the_prompt_does_not_say_and_tell_slots_apart():
    """Rows without a fact are masked out; two objects alike but for their slot get different
    tokens (so "a red circle and a red circle" is two objects, not one said twice)."""
    spec = {"objects": [{"shape": "circle", "colour": "red", "size": None, "cell": None}] * 2, "relations": []}
    facts = jnp.asarray(oc.spec_facts(_record_with(spec)))[None]
    module = oc.FactTokens(16)
    params = module.init(jax.random.key(0), facts)
    tokens, mask = module.apply(params, facts)
    assert tokens.shape == (1, oc.MAX_OBJECTS + 1, 16)
    assert mask.tolist() == [[True, True, False, False, False]]
    assert float(jnp.abs(tokens[0, 0] - tokens[0, 1]).max()) > 1e-3


def _plain_t2i_record(index: int) -> dict:
    from qk_jax.data import records

    return records.normalize(records.generate_record("t2i", index, height=64, plain_background=1.0))


def test_scene_rows_hold_everything_the_renderer_draws():
    """Redrawing a scene from its rows alone (shape, colour, centre, radius; the background's tone
    and tint) gives the record's picture pixel for pixel; a textured background is refused by id."""
    from qk_jax.data import records, scenes, vocab

    for i in range(8):
        record = _plain_t2i_record(i)
        rows = oc.scene_rows(record)
        drawn = [r for r in rows[: oc.MAX_OBJECTS] if r[0] > 0]
        assert len(drawn) == len(json.loads(record["scene"])["target"]["objects"])
        assert (rows[len(drawn) : oc.MAX_OBJECTS] == 0).all()
        tone, *tint = rows[oc.MAX_OBJECTS, 1:5]
        scene = scenes.Scene(
            64,
            64,
            {"kind": "plain", "tones": [(tone + 1.0) * 127.5, 0.0], "tint": [float(x) * 10.0 for x in tint]},
            [
                scenes.Obj(vocab.SHAPES[int(s)], vocab.COLOUR_NAMES[int(c)], "small", float(r), float(x), float(y))
                for _, s, c, x, y, r in drawn
            ],
        )
        np.testing.assert_array_equal(scenes.render_scene(scene), records.decode_image(record["target"]))
    textured = records.normalize(records.generate_record("t2i", 0, height=64, plain_background=0.0))
    with pytest.raises(ValueError, match=f"record {textured['id']}.*background"):
        oc.scene_rows(textured)


def test_scene_tokens_mask_absent_objects_and_follow_an_objects_place():
    rows = oc.scene_rows(_plain_t2i_record(0))[None]
    module = oc.SceneTokens(16)
    params = module.init(jax.random.key(0), jnp.asarray(rows))
    tokens, mask = module.apply(params, jnp.asarray(rows))
    n = int((rows[0, : oc.MAX_OBJECTS, 0] > 0).sum())
    assert tokens.shape == (1, oc.MAX_OBJECTS + 1, 16)
    assert mask.tolist() == [[True] * n + [False] * (oc.MAX_OBJECTS - n) + [True]]
    assert float(jnp.abs(tokens[0, n : oc.MAX_OBJECTS]).max()) == 0.0
    moved = rows.copy()
    moved[0, 0, 3] += 0.1  # the first object 0.1 of the width to the right
    moved_tokens, _ = module.apply(params, jnp.asarray(moved))
    assert float(jnp.abs(moved_tokens[0, 0] - tokens[0, 0]).max()) > 1e-3
    np.testing.assert_array_equal(moved_tokens[0, 1:], tokens[0, 1:])


def test_edge_weighted_error_counts_outline_pixels_more():
    """A 4 x 4 red square on grey: an error on the square's outline costs (1 + w) / mean weight times
    the plain squared error, one in its middle 1 / mean weight times; w = 0 is the plain error."""
    from benchmarks import renderer_bound

    target = np.full((1, 12, 12, 3), 0.5, np.float32)
    target[0, 4:8, 4:8] = (1.0, -1.0, -1.0)
    target = jnp.asarray(target)
    outline, middle = target.at[0, 4, 4, 0].add(0.3), target.at[0, 5, 5, 0].add(0.3)
    plain = 0.09 / (12 * 12 * 3)
    mean_weight = 1.0 + 3.0 * 32 / 144  # 32 of the 144 pixels are within one of the outline
    np.testing.assert_allclose(renderer_bound.edge_weighted_error(outline, target, 0.0), plain, rtol=1e-5)
    np.testing.assert_allclose(
        renderer_bound.edge_weighted_error(outline, target, 3.0), 4 * plain / mean_weight, rtol=1e-5
    )
    np.testing.assert_allclose(renderer_bound.edge_weighted_error(middle, target, 3.0), plain / mean_weight, rtol=1e-5)


@pytest.fixture(scope="module")
def plain_t2i_dir(tmp_path_factory):
    """Text-to-image records on plain backgrounds (what scene tokens cover), 32 x 32."""
    from qk_jax.data import builders

    out = tmp_path_factory.mktemp("plain_t2i")
    builders.build_shapes(str(out), tasks=("t2i",), num=16, num_eval=4, height=32, plain_background=1.0)
    return str(out)


def test_coordinate_head_pixels_land_where_the_pixel_autoencoder_decodes_them():
    """`pixels_to_tokens` packs each token's pixels as the DiT's tokens of the pixel autoencoder's
    latents hold them: a value per pixel that is its own place in the token decodes to a picture
    whose every pixel holds its place in its 8 x 8 token."""
    from benchmarks import renderer_bound
    from qk_jax.models.mmdit.positions import unpatchify
    from qk_jax.models.vae.pixel import PixelSpaceAutoencoder, PixelSpaceConfig

    p, f, side = 2, 4, 8
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    place = np.stack([rows.ravel(), cols.ravel(), rows.ravel() * side + cols.ravel()], -1).astype(np.float32)
    tokens = renderer_bound.pixels_to_tokens(jnp.broadcast_to(place, (1, 16, side * side, 3)), p, f)
    picture = PixelSpaceAutoencoder(PixelSpaceConfig(factor=f)).decode(unpatchify(tokens, 8, 8, p))[0]
    y, x = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    np.testing.assert_array_equal(picture[..., 0], y % side)
    np.testing.assert_array_equal(picture[..., 1], x % side)
    np.testing.assert_array_equal(picture[..., 2], (y % side) * side + x % side)


@pytest.mark.slow  # ~90 s: the demo's DiT (with and without a coordinate head) and a convolutional decoder
@pytest.mark.parametrize("generator,head", [("dit", "0"), ("dit", "8"), ("conv", "0")])
def test_renderer_bound_trains_renders_and_judges_along_its_curve(tmp_path, plain_t2i_dir, generator, head):
    out = tmp_path / "out"
    stdout = run_script(
        tmp_path,
        600,
        "renderer_bound.py",
        *("--data_dir", plain_t2i_dir, "--out", str(out), "--generator", generator, "--coordinate_head", head),
        *("--steps", "3", "--warmup", "1", "--eval_at", "2", "--samples", "4", "--edge_weight", "2"),
    )
    result = json.loads((out / "results.json").read_text())
    assert result["generator"] == generator and result["parameters"] > 10**5 and result["edge_weight"] == 2.0
    assert result["coordinate_head"] == int(head)
    assert [c["step"] for c in result["curve"]] == [2, 3]  # --eval_at and the last step
    for point in result["curve"]:
        assert point["samples_seen"] == point["step"] * 16 and np.isfinite(point["loss"])
        for split in ("validation", "train"):
            judged = point[split]
            assert 0.0 <= judged["judge"] <= 1.0 and 0.0 <= judged["chance"] <= 1.0
            assert 0.0 < judged["psnr"] < 60.0 and set(judged["pictures"]) == {"objects", "stray", "clean"}
    assert (out / "validation_renders.png").exists() and (out / "train_renders.png").exists()
    assert f"{generator}: {result['parameters']} parameters" in stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps must be at least 1, not 0"),
        (["--steps", "10", "--eval_at", "5,20,0"], "--eval_at steps [0, 20] lie outside 1..--steps (10)"),
        (["--max_seconds", "-1"], "--max_seconds must be at least 0, not -1.0"),
    ],
)
def test_a_bad_training_budget_is_refused_by_its_flag(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(sys, "argv", ["oracle_condition.py", "--data_dir", "D", "--out", "O", *flags])
    with pytest.raises(SystemExit) as exit_info:
        oc.parse_checked(oc.parser())
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_training_budget_within_the_steps_passes(monkeypatch):
    argv = ["oracle_condition.py", "--data_dir", "D", "--out", "O", "--steps", "10", "--eval_at", "5,10"]
    monkeypatch.setattr(sys, "argv", [*argv, "--max_seconds", "0"])
    args = oc.parse_checked(oc.parser())
    assert args.steps == 10 and args.eval_at == {5, 10} and args.max_seconds == 0.0


@pytest.mark.slow  # ~40 s: the demo's DiT compiled for training and for a 20-step sampler
def test_script_conditions_on_the_drawn_scene(tmp_path, plain_t2i_dir):
    out = tmp_path / "out"
    run_script(
        tmp_path,
        600,
        "oracle_condition.py",
        *("--data_dir", plain_t2i_dir, "--out", str(out), "--steps", "3", "--warmup", "1", "--eval_at", "2"),
        *("--samples", "2", "--guidance", "1", "--condition", "scene", "--one_step_at", "0,1"),
    )
    result = json.loads((out / "results.json").read_text())
    assert result["condition"] == "scene" and np.isfinite(result["final_loss"])
    # judged at --eval_at and at the last step; the result's own evaluation is the last point's
    assert [(c["step"], c["samples_seen"]) for c in result["curve"]] == [
        (2, 2 * result["batch_size"]),
        (3, 3 * result["batch_size"]),
    ]
    assert result["steps_run"] == 3 and result["guidance"] == result["curve"][-1]["guidance"]
    assert result["one_step"] == result["curve"][-1]["one_step"]
    sampled = result["guidance"]["1"]
    assert 0.0 <= sampled["judge"] <= 1.0 and np.isfinite(sampled["psnr"]) and (out / "samples_guidance_1.png").exists()
    # One step from t = 0 returns the noised picture itself, the drawn target: judged as the truth is.
    recs, targets, _ = oc.load_split(plain_t2i_dir, "validation", 2, "scene")
    truth = oc.judged(recs, to_uint8(targets))
    assert result["one_step"]["0"]["judge"] == truth["judge"] and result["one_step"]["0"]["psnr"] == float("inf")
    assert np.isfinite(result["one_step"]["1"]["psnr"]) and 0.0 <= result["one_step"]["1"]["judge"] <= 1.0
    assert (out / "one_step_t0.png").exists() and (out / "one_step_t1.png").exists()


@pytest.mark.slow  # ~60 s: the demo's DiT compiled for training and for a guided 20-step sampler
def test_script_trains_samples_and_judges(tmp_path, shapes_dir):
    out = tmp_path / "out"
    stdout = run_script(
        tmp_path,
        900,
        "oracle_condition.py",
        "--data_dir",
        shapes_dir,
        "--out",
        str(out),
        "--steps",
        "3",
        "--warmup",
        "1",
        "--samples",
        "4",
        "--limit",
        "16",
        "--guidance",
        "1,4",
        "--judge_train",
        *("--max_seconds", "0"),
    )
    result = json.loads((out / "results.json").read_text())
    # out of time after the first step: judged there, the schedule still that of 3 steps
    assert result["samples"] == 4 and result["steps"] == 3 and result["steps_run"] == 1
    assert [c["step"] for c in result["curve"]] == [1] and np.isfinite(result["final_loss"])
    assert "1 of 3 steps" in stdout
    assert set(result["guidance"]) == set(result["train_prompts"]) == {"1", "4"}
    for scale, r in result["guidance"].items():
        assert 0.0 <= r["judge"] <= 1.0 and 0.0 <= r["chance"] <= 1.0
        assert {"present", "attributes"} <= set(r["checks"])
        assert set(r["pictures"]) == {"objects", "stray", "clean"} and r["pictures"]["objects"] >= 0
        assert (out / f"samples_guidance_{scale}.png").exists() and f"guidance {scale}: judge" in stdout
        # the training prompts are judged apart, into their own grid
        train = result["train_prompts"][scale]
        assert 0.0 <= train["judge"] <= 1.0 and set(train["pictures"]) == {"objects", "stray", "clean"}
        assert (out / f"train_samples_guidance_{scale}.png").exists()
        assert f"guidance {scale}, training prompts: judge" in stdout


def test_latent_scale_makes_the_latents_unit_scale(shapes_dir):
    """The measured shift / scaling put the normalised posterior means of the pictures at mean 0
    and spread 1, and decoding undoes the normalisation (the same pictures as from raw latents)."""
    from qk_jax.models.vae.kl import AutoencoderKL

    _, images, _ = oc.load_split(shapes_dir, "train", 16)
    cfg = latent_oracle.autoencoder_config((8, 16), 4)
    model = AutoencoderKL(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1,) + images.shape[1:]))["params"]
    scaled = latent_oracle.with_latent_scale(cfg, params, images)
    assert scaled.scaling_factor != 1.0 and scaled.shift_factor != 0.0
    z = AutoencoderKL(scaled).apply({"params": params}, jnp.asarray(images), method="encode")
    np.testing.assert_allclose([float(z.mean()), float(z.std())], [0.0, 1.0], atol=1e-4)
    raw = model.apply(
        {"params": params}, model.apply({"params": params}, jnp.asarray(images), method="encode"), method="decode"
    )
    pictures = latent_oracle.reconstructed(scaled, params, images)
    expected = np.clip(np.round((np.asarray(raw) + 1) * 127.5), 0, 255)
    # the same up to the last bit of float rounding (a level where a value sits at .5)
    assert np.abs(pictures.astype(np.int16) - expected).max() <= 1 and pictures.dtype == np.uint8


def test_edge_mask_marks_both_sides_of_an_outline_and_nothing_else():
    """A 4 x 4 red square on a plain grey picture: the mask covers the pixels within one of its
    outline, inside and outside, and neither the square's middle nor the far background."""
    image = np.full((1, 12, 12, 3), 0.5, np.float32)
    image[0, 4:8, 4:8] = (1.0, -1.0, -1.0)
    mask = np.asarray(latent_oracle.edge_mask(jnp.asarray(image)))[0, :, :, 0]
    expected = np.zeros((12, 12))
    expected[3:9, 3:9] = 1.0
    expected[5:7, 5:7] = 0.0
    np.testing.assert_array_equal(mask, expected)


def test_saved_autoencoder_loads_with_its_config_and_parameters(tmp_path, shapes_dir):
    from qk_jax.models.vae.kl import AutoencoderKL

    _, images, _ = oc.load_split(shapes_dir, "train", 4)
    cfg = latent_oracle.autoencoder_config((8, 16), 4)
    params = AutoencoderKL(cfg).init(jax.random.key(1), jnp.zeros((1,) + images.shape[1:]))["params"]
    cfg = latent_oracle.with_latent_scale(cfg, params, images)
    latent_oracle.save_autoencoder(str(tmp_path), cfg, params, {"psnr_db": 1.0})
    loaded_cfg, loaded, measured = latent_oracle.load_autoencoder(str(tmp_path))
    assert loaded_cfg == cfg and measured == {"psnr_db": 1.0}
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, loaded))
    (tmp_path / "autoencoder.msgpack").unlink()
    with pytest.raises(FileNotFoundError, match="autoencoder.msgpack"):
        latent_oracle.load_autoencoder(str(tmp_path))


@pytest.mark.slow  # ~60 s: an autoencoder and the demo's DiT compiled for training and sampling
def test_latent_script_trains_an_autoencoder_then_the_dit_on_its_latents(tmp_path, shapes_dir):
    first, out = tmp_path / "autoencoder", tmp_path / "out"
    stdout = run_script(
        tmp_path,
        600,
        "latent_oracle.py",
        *("--data_dir", shapes_dir, "--out", str(first), "--samples", "4", "--limit", "16"),
        *("--autoencoder_steps", "3", "--channels", "8,16", "--latent_channels", "4", "--edge_weight", "2"),
        "--autoencoder_only",
    )
    trained = json.loads((first / "results.json").read_text())
    assert set(trained) == {"autoencoder"} and "validation reconstructions" in stdout
    assert trained["autoencoder"]["edge_weight"] == 2.0 and trained["autoencoder"]["steps"] == 3
    stdout = run_script(
        tmp_path,
        900,
        "latent_oracle.py",
        *("--data_dir", shapes_dir, "--out", str(out), "--steps", "3", "--warmup", "1", "--samples", "4"),
        *("--limit", "16", "--guidance", "2", "--autoencoder_from", str(first), "--patch_size", "4"),
    )
    result = json.loads((out / "results.json").read_text())
    ae = result["autoencoder"]
    # the DiT ran on the saved autoencoder, whose reconstructions judge the same as when it was trained
    assert ae["from"] == str(first) and ae["steps"] == 3 and ae["downsample_factor"] == 2
    assert ae["latent_channels"] == 4 and ae["psnr_db"] == pytest.approx(trained["autoencoder"]["psnr_db"], abs=1e-4)
    assert np.isfinite(ae["psnr_db"]) and 0.0 <= ae["reconstructions"]["judge"] <= 1.0
    assert np.isfinite(result["final_loss"]) and set(result["guidance"]) == {"2"}
    assert set(ae["reconstructions"]["pictures"]) == {"objects", "stray", "clean"}
    assert (out / "reconstructions.png").exists() and (out / "samples_guidance_2.png").exists()
    assert "validation reconstructions" in stdout and "guidance 2: judge" in stdout
