"""The learning signal and the recipe fields it is used to study: the preconditioned
prediction (its algebra, and that `model.prediction` reaches the training loss), and log
records averaged over the logging window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kontext_util as ku
from qk_jax import flow, optim, sharding
from qk_jax.eval import signal as signal_lib
from qk_jax.models.kontext import QueryKontext, preconditioned_velocity, preconditioning
from qk_jax.train_metrics import accumulate, window_record
from qk_jax.train_step import make_loss_fn
from qk_jax.tree import flatten_tree
from test_blur import scipy_heat_blur


def test_preconditioned_velocity_is_the_velocity_of_its_clean_estimate():
    kx, kf = jax.random.split(jax.random.key(0))
    x_t, f = jax.random.normal(kx, (3, 5, 4)), jax.random.normal(kf, (3, 5, 4))
    t = jnp.array([0.05, 0.5, 0.95])
    c_skip, c_out = preconditioning(t, 0.5)
    x0 = c_skip[:, None, None] * x_t + c_out[:, None, None] * f
    want = (x_t - x0) / t[:, None, None]
    np.testing.assert_allclose(preconditioned_velocity(x_t, f, t, 0.5), want, rtol=2e-5, atol=2e-5)
    # t = 0: the clean estimate is x_t itself (c_skip = 1, c_out = 0) and the velocity stays finite.
    c_skip0, c_out0 = preconditioning(jnp.zeros(1), 0.5)
    assert float(c_skip0[0]) == 1.0 and float(c_out0[0]) == 0.0
    assert np.isfinite(np.asarray(preconditioned_velocity(x_t[:1], f[:1], jnp.zeros(1), 0.5))).all()
    # t = 1: no skip, the network's output scaled by sigma_data is the clean estimate.
    c_skip1, c_out1 = preconditioning(jnp.ones(1), 0.5)
    assert float(c_skip1[0]) == 0.0 and abs(float(c_out1[0]) - 0.5) < 1e-7


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return ku.processor_dir(tmp_path_factory)


def _loss_with_zeroed_output(config, proc):
    """The train step's loss (and aux) at a random init whose generator output layer is zeroed
    (raw output F = 0), and what it was computed from: (kcfg, batch, loss, aux, x0, noise, t, x_t)
    with the clean latents, noise and timesteps the loss drew."""
    kcfg = ku.model_config(config, proc)
    model = QueryKontext(kcfg)
    params = jax.jit(lambda r: sharding.unbox_abstract(model.init(r)))(jax.random.key(0))
    params["dit"]["proj_out"] = jax.tree.map(jnp.zeros_like, params["dit"]["proj_out"])
    trainable, frozen = optim.partition(params, config.train.trainable)
    batch = ku.prepared(kcfg, ku.first_batch(config, proc))
    rng = jax.random.key(3)
    loss, aux = jax.jit(make_loss_fn(model))(trainable, frozen, batch, rng)
    _, k_time, k_noise = jax.random.split(rng, 3)
    x0 = model.encode(params, batch["target"])
    t = flow.sample_timesteps(k_time, x0.shape[0], kcfg.timesteps, image_seq_len=x0.shape[1])
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    return kcfg, batch, loss, aux, x0, noise, t, flow.noise_latents(x0, noise, t)


@pytest.mark.parametrize(
    "prediction, weighting, timesteps, shift",
    [
        ("x0", "velocity", "logit_normal", "dynamic"),
        ("preconditioned", "velocity", "logit_normal", "dynamic"),
        ("x0", "x0", "uniform", "dynamic"),
        ("x0", "velocity", "logit_normal", "static"),
    ],
)
def test_prediction_field_reaches_the_training_loss(prediction, weighting, timesteps, shift, shapes_dir, proc):
    """With the generator's output layer zeroed, its raw output F is 0 and the loss the train
    step differentiates has a closed form per parameterisation: x0-prediction's velocity is
    x_t / t, the preconditioned one ((t - a s^2) / d) x_t. With `model.loss_weighting="x0"`
    the per-sample loss is the clean-latent error itself: F = 0 predicts x0_hat = 0, so it is
    mean(x0^2) whatever t is (t >= min_t). Under x0-prediction the loss depends on t, so it
    also shows the step draws its timesteps with the configured shift."""
    config = ku.stage_config(
        2,
        shapes_dir,
        f"model.prediction={prediction}",
        "model.sigma_data=0.7",
        f"model.loss_weighting={weighting}",
        f"model.timesteps.method={timesteps}",
        f"model.timesteps.shift={shift}",
        "model.timesteps.static_shift=8.0",
        "data.mixture={'t2i': 1.0}",
    )
    kcfg, _, loss, aux, x0, noise, t, x_t = _loss_with_zeroed_output(config, proc)
    assert kcfg.prediction == prediction and kcfg.sigma_data == 0.7
    assert kcfg.loss_weighting == weighting and kcfg.timesteps.method == timesteps
    assert kcfg.timesteps.shift == shift and kcfg.timesteps.static_shift == 8.0
    tb = t[:, None, None]
    if prediction == "x0":
        v = x_t / jnp.maximum(tb, kcfg.min_t)
    else:
        a, s2 = 1 - tb, 0.7**2
        v = (tb - a * s2) / (a * a * s2 + tb * tb) * x_t
    want = jnp.mean(jnp.square(v - (noise - x0)), axis=(1, 2))
    if weighting == "x0":  # below min_t the clip keeps a residual of the noise: weight t_clip^2 there
        assert int(jnp.sum(t >= kcfg.min_t)) >= 2
        clipped = want * jnp.square(jnp.maximum(t, kcfg.min_t))
        want = jnp.where(t >= kcfg.min_t, jnp.mean(jnp.square(x0), axis=(1, 2)), clipped)
    np.testing.assert_allclose(aux["per_sample"], want, rtol=1e-4)
    np.testing.assert_allclose(loss, jnp.mean(want), rtol=1e-4)
    if shift == "static":  # the default (dynamic) shift draws other t, so another loss
        k_time = jax.random.split(jax.random.key(3), 3)[1]  # the draw `_loss_with_zeroed_output` made
        t_default = flow.sample_timesteps(k_time, x0.shape[0], flow.TimestepConfig(), image_seq_len=x0.shape[1])
        assert bool(jnp.all(t >= t_default)) and float(jnp.max(t - t_default)) > 0.05


def test_high_noise_share_reaches_the_training_loss(shapes_dir, proc):
    """`model.timesteps.high_noise_share` = 1 redraws every timestep of the train step in
    [high_noise_min, 1]: the drawn t (aux) lies there, and the loss is x0-prediction's closed form
    (F = 0: velocity x_t / t) at those t."""
    config = ku.stage_config(
        2,
        shapes_dir,
        "model.prediction=x0",
        "model.timesteps.high_noise_share=1.0",
        "model.timesteps.high_noise_min=0.95",
        "data.mixture={'t2i': 1.0}",
    )
    kcfg, _, loss, aux, x0, noise, t, x_t = _loss_with_zeroed_output(config, proc)
    assert kcfg.timesteps.high_noise_share == 1.0 and kcfg.timesteps.high_noise_min == 0.95
    np.testing.assert_allclose(aux["t"], t)
    assert float(jnp.min(t)) >= 0.95 and float(jnp.max(t)) <= 1.0
    want = jnp.mean(jnp.square(x_t / t[:, None, None] - (noise - x0)), axis=(1, 2))
    np.testing.assert_allclose(aux["per_sample"], want, rtol=1e-4)
    np.testing.assert_allclose(loss, jnp.mean(want), rtol=1e-4)
    with pytest.raises(Exception, match="high_noise_share"):
        ku.model_config(ku.stage_config(2, shapes_dir, "model.timesteps.high_noise_share=1.5"), proc)


def _token_weights(images: np.ndarray, block: int, weight: float) -> np.ndarray:
    """The foreground weights written out pixel by pixel: 1 + weight x the share of each token's
    pixels off the image's background (per-channel median) by more than 0.1 in a channel."""
    b, h, w, _ = images.shape
    out = np.ones((b, (h // block) * (w // block)))
    for i in range(b):
        bg = np.median(images[i].reshape(-1, 3), axis=0)
        off = np.abs(images[i] - bg).max(-1) > 0.1
        for r in range(h // block):
            for c in range(w // block):
                out[i, r * (w // block) + c] += (
                    weight * off[r * block : (r + 1) * block, c * block : (c + 1) * block].mean()
                )
    return out


def test_foreground_weight_reaches_the_training_loss(shapes_dir, proc):
    """`model.foreground_weight` weights each target token's error by 1 + w x its share of pixels
    off the background, as a weighted mean per sample: with the generator's output zeroed the x0
    generator's velocity is x_t / t, so the loss the train step differentiates has a closed form."""
    config = ku.stage_config(
        2, shapes_dir, "model.prediction=x0", "model.foreground_weight=3.0", "data.mixture={'t2i': 1.0}"
    )
    kcfg, batch, loss, aux, x0, noise, t, x_t = _loss_with_zeroed_output(config, proc)
    assert kcfg.foreground_weight == 3.0
    per_token = np.asarray(jnp.mean(jnp.square(x_t / jnp.maximum(t, kcfg.min_t)[:, None, None] - (noise - x0)), axis=2))
    weights = _token_weights(np.asarray(batch["target"], np.float64), kcfg.downsample, 3.0)
    assert weights.shape == per_token.shape and (weights > 1).any() and (weights == 1).any()  # objects and background
    want = (per_token * weights).sum(1) / weights.sum(1)
    np.testing.assert_allclose(aux["per_sample"], want, rtol=1e-4)
    assert not np.allclose(want, per_token.mean(1), rtol=1e-3)  # the weighting changed the loss
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-4)
    with pytest.raises(Exception, match="foreground_weight"):
        ku.model_config(ku.stage_config(2, shapes_dir, "model.foreground_weight=-1.0"), proc)


def test_foreground_max_t_reaches_the_training_loss(shapes_dir, proc):
    """`model.foreground_max_t` keeps the foreground weight to the samples drawn at t <= it: the
    others' loss is the plain mean over their tokens. The threshold is set between the batch's
    drawn timesteps (the same draws with any threshold: the loss's random key is fixed)."""
    overrides = ("model.prediction=x0", "model.foreground_weight=3.0", "data.mixture={'t2i': 1.0}")
    *_, t_drawn, _ = _loss_with_zeroed_output(ku.stage_config(2, shapes_dir, *overrides), proc)
    limit = float(np.median(np.asarray(t_drawn)))
    config = ku.stage_config(2, shapes_dir, *overrides, f"model.foreground_max_t={limit}")
    kcfg, batch, loss, aux, x0, noise, t, x_t = _loss_with_zeroed_output(config, proc)
    assert kcfg.foreground_max_t == limit
    per_token = np.asarray(jnp.mean(jnp.square(x_t / jnp.maximum(t, kcfg.min_t)[:, None, None] - (noise - x0)), axis=2))
    weights = _token_weights(np.asarray(batch["target"], np.float64), kcfg.downsample, 3.0)
    weighted = np.asarray(t) <= limit
    assert weighted.any() and not weighted.all()
    want = np.where(weighted, (per_token * weights).sum(1) / weights.sum(1), per_token.mean(1))
    np.testing.assert_allclose(aux["per_sample"], want, rtol=1e-4)
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-4)
    with pytest.raises(Exception, match="foreground_max_t"):
        ku.model_config(ku.stage_config(2, shapes_dir, "model.foreground_max_t=0.0"), proc)


def test_mean_error_weight_reaches_the_training_loss(shapes_dir, proc):
    """`model.mean_error_weight` g weights the square of the error's mean over the target tokens
    (per sample and feature) by g and its deviations from that mean by 1: per sample, the mean
    over tokens and features of (e - m)^2 plus g x the mean over features of m^2. Written out in
    numpy from the zeroed generator's closed-form velocity (x_t / t)."""
    overrides = ("model.prediction=x0", "data.mixture={'t2i': 1.0}")
    config = ku.stage_config(2, shapes_dir, *overrides, "model.mean_error_weight=0.25")
    kcfg, _, loss, aux, x0, noise, t, x_t = _loss_with_zeroed_output(config, proc)
    assert kcfg.mean_error_weight == 0.25
    error = np.asarray(x_t / jnp.maximum(t, kcfg.min_t)[:, None, None] - (noise - x0), np.float64)
    mean = error.mean(axis=1, keepdims=True)
    want = np.square(error - mean).mean(axis=(1, 2)) + 0.25 * np.square(mean[:, 0]).mean(axis=1)
    np.testing.assert_allclose(aux["per_sample"], want, rtol=1e-4)
    assert not np.allclose(want, np.square(error).mean(axis=(1, 2)), rtol=1e-3)  # the weight changed it
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-4)
    with pytest.raises(Exception, match="mean_error_weight"):
        ku.model_config(ku.stage_config(2, shapes_dir, "model.mean_error_weight=0.0"), proc)


def test_blur_reaches_the_training_step(shapes_dir, proc):
    """`model.blur.max_sigma` makes the DiT's noisy input (1 - t) B_t x0 + t eps, B_t a Gaussian blur
    of the target picture (by scipy's DCT, on the decoded pixel-space latents) of max_sigma sin^2(pi t / 2)
    pixels, and the loss the clean-picture error / t. Recorded from the train step's own call of
    the DiT; the blurred process needs an x0 generator."""
    overrides = ("model.prediction=x0", "model.blur.max_sigma=5.0", "data.mixture={'t2i': 1.0}")
    config = ku.stage_config(2, shapes_dir, *overrides)
    kcfg = ku.model_config(config, proc)
    assert kcfg.blur.max_sigma == 5.0

    seen = {}

    class Recorded(QueryKontext):
        def velocity(self, params, x_target, *args):
            seen["xt"] = x_target
            out = super().velocity(params, x_target, *args)
            seen["x0_hat"] = x_target - jnp.maximum(args[-1], kcfg.min_t)[:, None, None] * out
            return out

    model = Recorded(kcfg)
    params = jax.jit(lambda r: sharding.unbox_abstract(model.init(r)))(jax.random.key(0))
    trainable, frozen = optim.partition(params, config.train.trainable)
    batch = ku.prepared(kcfg, ku.first_batch(config, proc))
    rng = jax.random.key(3)
    loss, aux = make_loss_fn(model)(trainable, frozen, batch, rng)  # eager: the recorder keeps arrays
    _, k_time, k_noise = jax.random.split(rng, 3)
    x0 = model.encode(params, batch["target"])
    t = np.asarray(flow.sample_timesteps(k_time, x0.shape[0], kcfg.timesteps, image_seq_len=x0.shape[1]))
    noise = np.asarray(jax.random.normal(k_noise, x0.shape, x0.dtype))
    images = np.asarray(batch["target"], np.float64)
    sigmas = 5.0 * np.sin(np.pi * t / 2) ** 2
    blurred = np.stack([scipy_heat_blur(im, s, kcfg.blur.min_scale) for im, s in zip(images, sigmas)])
    bx0 = np.asarray(model.encode(params, jnp.asarray(blurred, jnp.float32)))
    want_xt = (1 - t)[:, None, None] * bx0 + t[:, None, None] * noise
    np.testing.assert_allclose(seen["xt"], want_xt, atol=2e-4)
    assert not np.allclose(want_xt, (1 - t)[:, None, None] * np.asarray(x0) + t[:, None, None] * noise, atol=1e-2)
    err = (np.asarray(seen["x0_hat"]) - np.asarray(x0)) / np.maximum(t, kcfg.min_t)[:, None, None]
    np.testing.assert_allclose(aux["per_sample"], np.square(err).mean(axis=(1, 2)), rtol=1e-3)
    with pytest.raises(Exception, match="model.blur.max_sigma"):
        ku.model_config(ku.stage_config(2, shapes_dir, "model.blur.max_sigma=5.0"), proc)


def test_adaln_zero_init_reaches_the_training_step(shapes_dir, proc):
    """`model.generator.init=adaln_zero` starts the generator with every block's modulation and the
    output layer zero (the rest as by default): the x0 generator's output is 0, so the train step's
    loss at initialisation is the closed form of a zero clean-latent estimate, and the first
    gradient reaches the output layer."""
    config = ku.stage_config(2, shapes_dir, "model.prediction=x0", "model.generator.init=adaln_zero")
    kcfg = ku.model_config(config, proc)
    assert kcfg.generator_init == "adaln_zero"
    model = QueryKontext(kcfg)
    params = jax.jit(lambda r: sharding.unbox_abstract(model.init(r)))(jax.random.key(0))
    default = jax.jit(lambda r: sharding.unbox_abstract(QueryKontext(kcfg.replace(generator_init="default")).init(r)))(
        jax.random.key(0)
    )
    for name, value in flatten_tree(params["dit"]).items():
        zeroed = name.split("/")[:2] in (["double_blocks", "img_mod"], ["double_blocks", "txt_mod"]) or name.split("/")[
            0
        ] in ("norm_out", "proj_out")
        if zeroed:
            assert not np.asarray(value).any(), name
        else:
            np.testing.assert_array_equal(value, flatten_tree(default["dit"])[name])
    assert np.asarray(flatten_tree(default["dit"])["proj_out/kernel"]).any()
    trainable, frozen = optim.partition(params, config.train.trainable)
    batch = ku.prepared(kcfg, ku.first_batch(config, proc))
    rng = jax.random.key(3)
    loss_fn = make_loss_fn(model)
    loss, aux = jax.jit(loss_fn)(trainable, frozen, batch, rng)
    _, k_time, k_noise = jax.random.split(rng, 3)
    x0 = model.encode(params, batch["target"])
    t = flow.sample_timesteps(k_time, x0.shape[0], kcfg.timesteps, image_seq_len=x0.shape[1])
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = flow.noise_latents(x0, noise, t)
    want = jnp.mean(jnp.square(x_t / jnp.maximum(t, kcfg.min_t)[:, None, None] - (noise - x0)), axis=(1, 2))
    np.testing.assert_allclose(aux["per_sample"], want, rtol=1e-4)
    grads = jax.jit(jax.grad(lambda tr: loss_fn(tr, frozen, batch, rng)[0]))(trainable)
    assert float(jnp.abs(grads["dit"]["proj_out"]["kernel"]).max()) > 0
    with pytest.raises(Exception, match="model.generator.init"):
        ku.model_config(ku.stage_config(2, shapes_dir, "model.generator.init=zero"), proc)


def _stage2_gradients(shapes_dir, proc, override: str):
    """(model config, trainable tree, its gradient) of the stage-2 train step's loss on the first
    batch, the model built from the stage config with `override`."""
    config = ku.stage_config(2, shapes_dir, override)
    kcfg = ku.model_config(config, proc)
    model = QueryKontext(kcfg)
    params = jax.jit(lambda r: sharding.unbox_abstract(model.init(r)))(jax.random.key(0))
    trainable, frozen = optim.partition(params, config.train.trainable)
    batch = ku.prepared(kcfg, ku.first_batch(config, proc))
    loss_fn = make_loss_fn(model)
    grads = jax.jit(jax.grad(lambda tr: loss_fn(tr, frozen, batch, jax.random.key(3))[0]))(trainable)
    return kcfg, trainable, grads


def test_local_mixing_reaches_the_training_step(shapes_dir, proc):
    """`model.generator.overrides.local_mixing` builds the DiT with the convolution over the target
    grid, and the train step's loss differentiates its weight (zero at init: a gradient that
    is not zero is what moves it); the weight is trainable in stage 2 and not decayed."""
    kcfg, trainable, grads = _stage2_gradients(shapes_dir, proc, "model.generator.overrides.local_mixing=True")
    assert kcfg.generator.local_mixing
    weight_grad = grads["dit"]["double_blocks"]["img_mlp"]["local_mix"]["weight"]
    assert weight_grad.shape == (kcfg.generator.num_layers, 9, kcfg.generator.mlp_dim)
    assert float(jnp.abs(weight_grad).max()) > 0
    assert not optim.decay_mask(trainable)["dit"]["double_blocks"]["img_mlp"]["local_mix"]["weight"]


def test_patch_bottleneck_reaches_the_training_step(shapes_dir, proc):
    """`model.generator.overrides.patch_bottleneck` builds the DiT with the narrow projection
    before `img_in`, and the train step's loss differentiates it (trainable in stage 2)."""
    kcfg, _, grads = _stage2_gradients(shapes_dir, proc, "model.generator.overrides.patch_bottleneck=16")
    assert kcfg.generator.patch_bottleneck == 16
    assert grads["dit"]["img_in_bottleneck"]["kernel"].shape == (kcfg.generator.in_channels, 16)
    assert grads["dit"]["img_in"]["kernel"].shape == (16, kcfg.generator.inner_dim)
    assert float(jnp.abs(grads["dit"]["img_in_bottleneck"]["kernel"]).max()) > 0


def test_cell_conv_reaches_the_training_step(shapes_dir, proc):
    """`model.generator.overrides.cell_conv_width` builds the DiT with the convolutions over the
    target's latent cells, and the train step's loss differentiates them: the zero-initialised
    stem projection and head convolution get a gradient (trainable in stage 2)."""
    kcfg, trainable, grads = _stage2_gradients(shapes_dir, proc, "model.generator.overrides.cell_conv_width=8")
    assert kcfg.generator.cell_conv_width == 8
    dit = grads["dit"]
    assert set(trainable["dit"]) >= {"cell_stem", "cell_head"}
    assert float(jnp.abs(dit["cell_stem"]["proj"]["kernel"]).max()) > 0
    last = f"conv_{kcfg.generator.patch_size - 1}"
    assert dit["cell_head"]["convs"][last]["kernel"].shape[-1] == kcfg.latent_channels
    assert float(jnp.abs(dit["cell_head"]["convs"][last]["kernel"]).max()) > 0


def test_log_record_averages_the_window():
    """Batches are grouped by input count, so one step holds one task: a log line must average
    every step of its window, per task over that task's samples."""
    steps = [  # loss, grad norm, per-task loss sums and counts (6 tasks), learning rate
        dict(
            loss=1.0,
            grad_norm=2.0,
            task_loss_sum=np.array([4.0, 0, 0, 0, 0, 0]),
            task_count=np.array([4.0, 0, 0, 0, 0, 0]),
            learning_rate=0.1,
        ),
        dict(
            loss=3.0,
            grad_norm=4.0,
            task_loss_sum=np.array([0, 12.0, 0, 0, 0, 0]),
            task_count=np.array([0, 4.0, 0, 0, 0, 0]),
            learning_rate=0.3,
        ),
        dict(
            loss=2.0,
            grad_norm=0.0,
            task_loss_sum=np.array([2.0, 2.0, 0, 0, 0, 0]),
            task_count=np.array([2.0, 2.0, 0, 0, 0, 0]),
            learning_rate=0.2,
        ),
    ]
    window = None
    for m in steps:
        window = accumulate(window, {k: jnp.asarray(v) for k, v in m.items()})
    batch = {"position_ids": np.zeros((3, 4, 8)), "img_ids": np.zeros((4, 16, 3))}
    rec = window_record(3, jax.device_get(window), 3, 0.5, batch, 1e9, 1e12)
    assert rec["loss"] == pytest.approx(2.0) and rec["grad_norm"] == pytest.approx(2.0)
    assert rec["learning_rate"] == pytest.approx(0.2) and rec["steps_averaged"] == 3
    assert rec["task_loss"] == {"t2i": pytest.approx(1.0), "reconstruction": pytest.approx(14.0 / 6.0)}


def test_content_fixing_records():
    fixed = {"scene": '{"spec": {"objects": [{"shape": "star", "colour": "red", "cell": "top"}], "relations": []}}'}
    loose = {"scene": '{"spec": {"objects": [{"shape": "star", "colour": null, "cell": "top"}], "relations": []}}'}
    unplaced = {"scene": '{"spec": {"objects": [{"shape": "star", "colour": "red", "cell": null}], "relations": []}}'}
    related = {
        "scene": '{"spec": {"objects": [{"shape": "star", "colour": "red", "cell": null},'
        ' {"shape": "circle", "colour": "blue", "cell": null}], "relations": [[0, "left of", 1]]}}'
    }
    assert signal_lib.content_fixing("t2i", fixed) and signal_lib.content_fixing("t2i", related)
    assert not signal_lib.content_fixing("t2i", loose) and not signal_lib.content_fixing("t2i", unplaced)
    assert signal_lib.content_fixing("reconstruction", loose)
    assert [signal_lib.fixing_degree("t2i", r) for r in (fixed, loose, unplaced, related)] == [2, 0, 1, 2]


class _ToyDenoiser:
    """A stand-in generator whose clean-latent prediction is exactly known: with any condition it
    predicts `reads` ? the target its condition encodes : the batch's mean target; with the
    condition masked out, zeros. Its condition tokens are the targets themselves."""

    class config:  # noqa: N801 - the attribute the signal reads
        low_level = False

    def __init__(self, reads: bool):
        self.reads = reads

    def condition(self, params, batch):
        cond = batch["target"].reshape(batch["target"].shape[0], 1, -1)
        return cond, jnp.ones(cond.shape[:2], bool), None

    def encode(self, params, images):
        return images.reshape(images.shape[0], -1, 3)

    def noised(self, params, x0, noise, t, height, width):  # plain rectified flow
        return flow.noise_latents(x0, noise, t)

    def velocity(self, params, x, tokens, img_ids, cond, mask, t):
        told = cond.reshape(x.shape)
        x0_hat = told if self.reads else jnp.broadcast_to(jnp.mean(told, 0, keepdims=True), x.shape)
        x0_hat = jnp.where(mask.any(axis=1)[:, None, None], x0_hat, 0.0)
        return (x - x0_hat) / t[:, None, None]


@pytest.mark.parametrize("reads", [True, False])
def test_content_gain_separates_reading_the_condition_from_using_it_as_a_flag(reads):
    """Both toy models gain from the condition (masking it out costs them); only the one that
    reads it loses when it gets another record's condition."""
    target = 0.5 + 0.3 * jax.random.uniform(jax.random.key(0), (4, 8, 8, 3), minval=-1, maxval=1)
    batch = {"target": target, "img_ids": jnp.zeros((4, 64, 3))}
    with_c, without, swapped = signal_lib.LearningSignal._x0_errors_impl(
        _ToyDenoiser(reads), {}, batch, jax.random.key(1), jnp.float32(0.7)
    )
    gain = 1 - float(jnp.mean(with_c)) / float(jnp.mean(without))
    content = 1 - float(jnp.mean(with_c)) / float(jnp.mean(swapped))
    assert gain > 0.3
    if reads:
        assert float(jnp.max(with_c)) < 1e-10 and content == pytest.approx(1.0)
    else:
        assert content == pytest.approx(0.0, abs=1e-6)


def test_pixel_autoencoder_keep_reaches_the_training_loss(shapes_dir, proc):
    """`model.vae.keep` gives the train step the blocks' low DCT frequencies as latents: the loss
    (x0-prediction, F = 0) is computed on them, and a keep above the factor is refused."""
    config = ku.stage_config(
        2,
        shapes_dir,
        "model.prediction=x0",
        "model.vae.keep=1",
        "model.generator.overrides.in_channels=12",
        "model.generator.overrides.out_channels=3",
        "data.mixture={'t2i': 1.0}",
    )
    kcfg, batch, loss, aux, x0, noise, t, x_t = _loss_with_zeroed_output(config, proc)
    assert kcfg.vae.keep == 1 and kcfg.latent_channels == 3
    images = np.asarray(batch["target"], np.float64)  # keep = 1: each 2x2 block's mean, times 2
    b, h, w, _ = images.shape
    means = images.reshape(b, h // 2, 2, w // 2, 2, 3).mean(axis=(2, 4)) * 2
    tokens = means.reshape(b, h // 4, 2, w // 4, 2, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b, -1, 12)
    np.testing.assert_allclose(x0, tokens, atol=1e-5)
    want = jnp.mean(jnp.square(x_t / t[:, None, None] - (noise - x0)), axis=(1, 2))
    np.testing.assert_allclose(aux["per_sample"], want, rtol=1e-4)
    np.testing.assert_allclose(loss, jnp.mean(want), rtol=1e-4)
    with pytest.raises(Exception, match="model.vae.keep=3"):
        ku.model_config(ku.stage_config(2, shapes_dir, "model.vae.keep=3"), proc)
