"""Rectified flow, schedules and samplers against diffusers' FlowMatch schedulers; guidance; a 4-step
sampling loop of ours vs a loop over the diffusers transformer with the diffusers scheduler."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, QwenImageTransformer2DModel

from dit_testing import QWEN_TINY, rel_err, save_tiny, t
from qk_jax import flow, flow_solvers, guidance
from qk_jax.convert import qwen_image
from qk_jax.convert.diffusers_configs import from_diffusers
from qk_jax.models.mmdit import MMDiT
from qk_jax.models.mmdit import positions as pos

SCHEDULES = [
    (dict(), None, 10),
    (dict(shift=3.0), None, 7),
    (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), "pipeline", 28),  # FLUX.1-dev
    (
        dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02),
        "pipeline",
        50,
    ),  # Qwen-Image
    (dict(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.5, max_shift=1.15), None, 5),
    (dict(shift=2.0, shift_terminal=0.1), "pipeline", 4),
]


@pytest.mark.parametrize("settings,sigmas,steps", SCHEDULES)
def test_schedule_equals_flow_match_euler(settings, sigmas, steps):
    sched = FlowMatchEulerDiscreteScheduler(**settings)
    ours_cfg = from_diffusers(flow_solvers.FlowMatchSchedule, dict(sched.config))
    seq = 1024
    sig_in = flow_solvers.pipeline_sigmas(steps) if sigmas == "pipeline" else None
    mu = ours_cfg.mu(seq) if ours_cfg.use_dynamic_shifting else None
    sched.set_timesteps(steps, sigmas=sig_in, mu=mu)
    ours_sigmas, model_t = flow_solvers.flow_schedule(steps, ours_cfg, sigmas=sig_in, image_seq_len=seq)
    np.testing.assert_array_equal(ours_sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(model_t, (sched.timesteps / 1000).numpy())


def test_schedule_rejects_unsupported_options():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        from_diffusers(flow_solvers.FlowMatchSchedule, {"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="mu or image_seq_len"):
        flow_solvers.flow_schedule(4, flow_solvers.FlowMatchSchedule(use_dynamic_shifting=True))


def _toy_velocity(x, tt):
    """A smooth nonlinear field, so Euler and Heun differ and step placement matters."""
    return jnp.sin(3 * x) * (1 + tt) - 0.5 * x


def test_euler_and_heun_loops_equal_diffusers_schedulers():
    x0 = np.random.default_rng(0).standard_normal((2, 6, 4)).astype(np.float32)
    for cls, fn in (
        (FlowMatchEulerDiscreteScheduler, flow_solvers.euler_sample),
        (FlowMatchHeunDiscreteScheduler, flow_solvers.heun_sample),
    ):
        sched = cls(shift=3.0)
        sched.set_timesteps(6)
        x = torch.from_numpy(x0.copy())
        for ts in sched.timesteps:
            v = torch.from_numpy(np.array(_toy_velocity(jnp.asarray(x.numpy()), ts.item() / 1000)))
            x = sched.step(v, ts, x).prev_sample
        sigmas, model_t = flow_solvers.flow_schedule(6, flow_solvers.FlowMatchSchedule(shift=3.0))
        ours = jax.jit(lambda x: fn(_toy_velocity, x, sigmas, model_t))(x0)
        assert rel_err(ours, x.numpy()) < 1e-5, cls.__name__
    # Heun is really second order: closer to a fine Euler solution than Euler with the same steps
    fine = flow_solvers.euler_sample(
        _toy_velocity, x0, *flow_solvers.flow_schedule(400, flow_solvers.FlowMatchSchedule())
    )
    coarse = flow_solvers.flow_schedule(6, flow_solvers.FlowMatchSchedule())
    err = lambda m: np.abs(np.asarray(flow_solvers.sample(_toy_velocity, x0, *coarse, method=m)) - fine).max()
    assert err("heun") < 0.5 * err("euler")


def test_noising_target_and_loss():
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 3))
    tt = np.array([0.0, 1.0])
    xt = np.asarray(flow.noise_latents(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(tt)))
    np.testing.assert_allclose(xt[0], x0[0], atol=1e-6)
    np.testing.assert_allclose(xt[1], eps[1], atol=1e-6)
    # the target is d x_t / dt
    h = 1e-3
    d = (flow.noise_latents(x0, eps, np.array([0.5 + h] * 2)) - flow.noise_latents(x0, eps, np.array([0.5] * 2))) / h
    np.testing.assert_allclose(np.asarray(d), np.asarray(flow.velocity_target(x0, eps)), atol=1e-3)
    pred = np.zeros((2, 3, 2), np.float32)
    target = np.ones((2, 3, 2), np.float32) * np.array([1.0, 2.0], np.float32)[:, None, None]
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    # valid tokens: sample 0 has 2 (se 1), sample 1 has 1 (se 4) -> (2 * 1 + 4) / 3
    assert float(flow.flow_loss(pred, target, mask)) == pytest.approx(2.0)
    assert float(flow.flow_loss(pred, target, mask, weights=np.array([1.0, 0.0]))) == pytest.approx(2 / 3)
    assert float(flow.flow_loss(pred, target)) == pytest.approx(2.5)


def test_timestep_sampling_and_shift():
    key = jax.random.key(0)
    cfg = flow.TimestepConfig(method="logit_normal", shift="none")
    ts = np.asarray(flow.sample_timesteps(key, 20000, cfg))
    assert 0 < ts.min() and ts.max() < 1 and abs(np.median(ts) - 0.5) < 0.02
    u = np.asarray(flow.sample_timesteps(key, 20000, flow.TimestepConfig(method="uniform", shift="none")))
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12**-0.5) < 0.01
    m = np.asarray(flow.sample_timesteps(key, 20000, flow.TimestepConfig(method="mode", shift="none")))
    assert 0 <= m.min() and m.max() <= 1
    static = np.asarray(flow.sample_timesteps(key, 20000, flow.TimestepConfig(shift="static", static_shift=3.0)))
    np.testing.assert_allclose(static, 3 * ts / (1 + 2 * ts), rtol=1e-5)
    assert np.median(static) == pytest.approx(0.75, abs=0.02)
    # dynamic: FLUX's exponential time shift with mu from the token count, larger images noisier
    dyn = flow.TimestepConfig(shift="dynamic")
    mu = flow.calculate_shift(4096)
    np.testing.assert_allclose(
        np.asarray(dyn.apply_shift(jnp.asarray(ts), 4096)),
        flow.exponential_time_shift(ts.astype(np.float64), mu),
        rtol=1e-5,
    )
    assert np.median(np.asarray(flow.sample_timesteps(key, 4000, dyn, 4096))) > np.median(
        np.asarray(flow.sample_timesteps(key, 4000, dyn, 256))
    )
    sd3 = flow.TimestepConfig(shift="sd3", base_seq_len=1024)
    np.testing.assert_allclose(np.asarray(sd3.apply_shift(jnp.asarray(ts), 4096)), 2 * ts / (1 + ts), rtol=1e-5)
    with pytest.raises(ValueError, match="image token count"):
        dyn.apply_shift(ts)
    # high_noise_share: that share of the (shifted) draws redrawn uniformly in [high_noise_min, 1];
    # 0 leaves the draws as they were
    mixed = np.asarray(flow.sample_timesteps(key, 20000, flow.TimestepConfig(shift="none", high_noise_share=0.25)))
    base_above = float((ts >= 0.9).mean())
    assert float((mixed >= 0.9).mean()) == pytest.approx(0.25 + 0.75 * base_above, abs=0.015)
    assert float((mixed >= 0.98).mean()) > 0.04 > 10 * float((ts >= 0.98).mean())
    assert 0 < mixed.min() and mixed.max() <= 1
    with pytest.raises(ValueError, match="high_noise_min"):
        flow.TimestepConfig(high_noise_min=1.0)
    out = flow.training_inputs(key, jnp.ones((4, 16, 3)), dyn)
    np.testing.assert_allclose(np.asarray(out["target"]), np.asarray(out["noise"] - 1), atol=1e-6)


def test_guidance_combinations():
    rng = np.random.default_rng(0)
    c, i, u = (rng.standard_normal((2, 5, 4)).astype(np.float32) for _ in range(3))
    np.testing.assert_allclose(guidance.cfg(c, u, 1.0), c, atol=1e-6)
    np.testing.assert_allclose(guidance.dual_cfg(c, i, u, 4.0, 1.0), guidance.cfg(c, i, 4.0), atol=1e-6)
    np.testing.assert_allclose(guidance.dual_cfg(c, i, u, 1.0, 1.0), c, atol=1e-6)
    out = np.asarray(guidance.true_cfg(c, u, 4.0))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(c, axis=-1), rtol=1e-5)
    comb = guidance.cfg(c, u, 4.0)
    np.testing.assert_allclose(
        out / np.linalg.norm(out, axis=-1, keepdims=True),
        comb / np.linalg.norm(comb, axis=-1, keepdims=True),
        atol=1e-6,
    )
    # one batched call evaluates all three branches
    calls = []
    fake = lambda x, tt, cond: (calls.append(x.shape), x * cond)[1]
    vel = guidance.dual_cfg_velocity(
        fake, np.full((2, 1, 1), 3.0), np.full((2, 1, 1), 2.0), np.full((2, 1, 1), 1.0), text_scale=2.0, image_scale=1.5
    )
    v = vel(jnp.ones((2, 5, 4)), jnp.float32(0.5))
    assert calls == [(6, 5, 4)]
    np.testing.assert_allclose(np.asarray(v), 1 + 1.5 * (2 - 1) + 2.0 * (3 - 2))


def test_four_step_sampling_loop_equals_diffusers(tmp_path):
    """Qwen-Image true-CFG sampling, 4 Euler steps on the dynamically shifted schedule: our jitted
    fori_loop over MMDiT vs a Python loop over the diffusers transformer + scheduler."""
    model = save_tiny(QwenImageTransformer2DModel, tmp_path, QWEN_TINY, seed=7)
    config, params = qwen_image.load(tmp_path)
    rng = np.random.default_rng(0)
    b, h, w, tl, steps, scale = 1, 4, 4, 6, 4, 4.0
    latents = rng.standard_normal((b, h * w, config.in_channels)).astype(np.float32)
    cond = rng.standard_normal((b, tl, 24)).astype(np.float32)
    uncond = rng.standard_normal((b, tl, 24)).astype(np.float32)
    cond_mask = np.ones((b, tl), bool)
    uncond_mask = np.ones((b, tl), bool)
    uncond_mask[:, 3:] = False
    sched_cfg = dict(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02
    )

    sched = FlowMatchEulerDiscreteScheduler(**sched_cfg)
    mu = flow_solvers.FlowMatchSchedule(**sched_cfg).mu(h * w)
    sched.set_timesteps(steps, sigmas=flow_solvers.pipeline_sigmas(steps), mu=mu)
    x = t(latents)
    with torch.no_grad():
        for ts in sched.timesteps:
            kw = dict(hidden_states=x, timestep=ts.expand(b) / 1000, img_shapes=[[(1, h, w)]] * b)
            v_c = model(encoder_hidden_states=t(cond), encoder_hidden_states_mask=t(cond_mask), **kw).sample
            v_u = model(encoder_hidden_states=t(uncond), encoder_hidden_states_mask=t(uncond_mask), **kw).sample
            comb = v_u + scale * (v_c - v_u)
            v = comb * (torch.norm(v_c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
            x = sched.step(v, ts, x).prev_sample
    ref = x.numpy()

    img_ids = pos.batch_ids(pos.grid_ids(h, w, centred=True), 2 * b)
    mmdit = MMDiT(config)

    def model_fn(xs, ts, c):
        return mmdit.apply({"params": params}, xs, img_ids, c["txt"], c["mask"], ts)

    sigmas, model_t = flow_solvers.flow_schedule(
        steps,
        flow_solvers.FlowMatchSchedule(**sched_cfg),
        sigmas=flow_solvers.pipeline_sigmas(steps),
        image_seq_len=h * w,
    )

    @jax.jit
    def run(noise):
        vel = guidance.cfg_velocity(
            model_fn, {"txt": cond, "mask": cond_mask}, {"txt": uncond, "mask": uncond_mask}, scale, mode="true_cfg"
        )
        return flow_solvers.euler_sample(vel, noise, sigmas, model_t)

    ours = run(latents)
    assert rel_err(ours, ref) < 1e-4
    assert rel_err(ours, latents) > 0.1  # the loop really moved the latents


def test_sample_loop_guidance_mode_true_cfg():
    """`sample.guidance_mode="true_cfg"` reaches the sampling loop: the text-CFG branches are
    combined by Qwen-Image's norm-rescaled CFG, every Euler step."""
    from qk_jax import flow_solvers
    from qk_jax.config import ConfigError
    from qk_jax.models.blur import BlurConfig
    from qk_jax.sample import sample_loop

    class Model:  # a velocity that depends on whether the text is masked out
        config = types.SimpleNamespace(blur=BlurConfig(), min_t=0.05)

        @staticmethod
        def velocity(params, x, tokens, img_ids, cond, mask, t):
            on = jnp.any(mask, axis=1).astype(x.dtype)[:, None, None]
            return params["a"] * x + on * params["b"] * jnp.sin(x) + t[:, None, None]

    params = {"a": jnp.float32(-0.7), "b": jnp.float32(0.9)}
    noise = jax.random.normal(jax.random.key(0), (2, 5, 4))
    sigmas, timesteps = flow_solvers.flow_schedule(4, flow_solvers.FlowMatchSchedule(shift=1.0))
    cond, mask = jnp.zeros((2, 3, 8)), jnp.ones((2, 3), bool)
    img_ids = jnp.zeros((2, 5, 3))

    def manual(combine):
        x = noise
        for i in range(4):
            t = jnp.full((2,), timesteps[i])
            v = combine(
                Model.velocity(params, x, None, img_ids, cond, mask, t),
                Model.velocity(params, x, None, img_ids, cond, jnp.zeros_like(mask), t),
                3.0,
            )
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return x

    for mode, combine in (("cfg", guidance.cfg), ("true_cfg", guidance.true_cfg)):
        loop = jax.jit(sample_loop(Model(), "euler", True, False, mode))
        out = loop(params, noise, sigmas, timesteps, cond, mask, None, img_ids, jnp.float32(3.0), jnp.float32(1.0))
        np.testing.assert_allclose(out, manual(combine), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="sample.guidance_mode"):
        sample_loop(Model(), "euler", True, False, "truecfg")
