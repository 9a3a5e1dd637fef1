"""Sampling schedules from the published scheduler_config.json files equal those QwenImagePipeline
and FluxPipeline compute (their sigmas and mu, diffusers' FlowMatchEulerDiscreteScheduler), and
`qk-jax sample` takes its schedule from a diffusers folder when it has one."""

from __future__ import annotations

import json
import os
import shutil
import types

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux import pipeline_flux
from diffusers.pipelines.qwenimage import pipeline_qwenimage

from qk_jax import flow, flow_solvers
from qk_jax.config import ConfigError, load_config
from qk_jax.convert import diffusers_configs
from qk_jax.convert.diffusers_configs import from_diffusers
from qk_jax.sample import Sampler

PUBLISHED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "published")
PIPELINES = {"Qwen-Image": pipeline_qwenimage, "FLUX.1-dev": pipeline_flux}
# (height, width, steps): the pipelines' default sizes and steps, and unlike ones
CASES = [(1328, 1328, 50), (1024, 1024, 28), (512, 768, 20), (928, 1664, 30), (256, 256, 4)]


def _pipeline_schedule(module, folder: str, height: int, width: int, steps: int):
    """What the pipeline's __call__ does before its denoising loop, with its own functions."""
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.load(f))
    image_seq_len = (height // 16) * (width // 16)  # latents.shape[1]: packed 2x2 patches of the 8x VAE latents
    sigmas = np.linspace(1.0, 1 / steps, steps)
    c = scheduler.config
    mu = module.calculate_shift(
        image_seq_len,
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", 1.15),
    )
    timesteps, _ = module.retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    return scheduler.sigmas.numpy(), (timesteps / 1000).numpy(), image_seq_len


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
@pytest.mark.parametrize("height,width,steps", CASES)
def test_published_schedules_equal_the_pipelines(pipeline, height, width, steps):
    folder = os.path.join(PUBLISHED, pipeline)
    ref_sigmas, ref_t, seq = _pipeline_schedule(PIPELINES[pipeline], folder, height, width, steps)
    schedule = diffusers_configs.read_schedule(folder)
    sigmas, model_t = flow_solvers.flow_schedule(
        steps, schedule, sigmas=flow_solvers.pipeline_sigmas(steps), image_seq_len=seq
    )
    np.testing.assert_array_equal(sigmas, ref_sigmas)
    np.testing.assert_array_equal(model_t, ref_t)


def test_named_schedules_are_the_published_ones():
    assert diffusers_configs.read_schedule(os.path.join(PUBLISHED, "Qwen-Image")) == flow_solvers.QWEN_IMAGE_SCHEDULE
    assert diffusers_configs.read_schedule(os.path.join(PUBLISHED, "FLUX.1-dev")) == flow_solvers.FLUX_SCHEDULE


def _sampler(scheduler: str = "", generator: str = ""):
    """The parts of a Sampler that `schedule` reads: the run config and the training timesteps."""
    config = load_config("configs/stage2.py:tiny")
    config.sample.scheduler = scheduler
    config.model.generator.checkpoint = generator
    return types.SimpleNamespace(config=config, kcfg=types.SimpleNamespace(timesteps=flow.TimestepConfig()))


def test_sampler_takes_the_schedule_from_a_diffusers_folder(tmp_path):
    qwen = diffusers_configs.read_schedule(os.path.join(PUBLISHED, "Qwen-Image"))
    # sample.scheduler names a pipeline folder (or its scheduler_config.json)
    s = _sampler(scheduler=os.path.join(PUBLISHED, "Qwen-Image"))
    assert Sampler.schedule(s) == qwen
    # the generator was initialised from a pipeline's transformer/: the pipeline's scheduler/ is used
    pipe = tmp_path / "Qwen-Image"
    shutil.copytree(os.path.join(PUBLISHED, "Qwen-Image"), pipe)
    s = _sampler(generator=str(pipe / "transformer"))
    assert Sampler.schedule(s) == qwen
    # no scheduler beside the generator: the training shift (dynamic, FLUX's constants)
    shutil.rmtree(pipe / "scheduler")
    default = Sampler.schedule(_sampler(generator=str(pipe / "transformer")))
    assert default.use_dynamic_shifting and default.max_shift == flow.TimestepConfig().max_shift
    assert default != qwen
    with pytest.raises(ConfigError, match="sample.scheduler"):
        Sampler.schedule(_sampler(scheduler=str(tmp_path / "missing")))


def test_scheduler_options_are_read_as_diffusers_reads_them(caplog):
    raw = json.load(open(os.path.join(PUBLISHED, "FLUX.1-dev", "scheduler", "scheduler_config.json")))
    with caplog.at_level("WARNING", logger="qk_jax.config"):
        assert from_diffusers(flow_solvers.FlowMatchSchedule, {**raw, "foo": 1}) == flow_solvers.FLUX_SCHEDULE
    assert any("foo" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        from_diffusers(flow_solvers.FlowMatchSchedule, {**raw, "stochastic_sampling": True})
    with pytest.raises(ValueError, match="time_shift_type"):
        from_diffusers(flow_solvers.FlowMatchSchedule, {**raw, "time_shift_type": "cosine"})
    # Values the schedule cannot use are named with their key, not met inside the sampler's arithmetic.
    for key, value, message in (
        ("shift", "abc", r"shift='abc': must be a finite number"),
        ("shift", 0.0, r"shift=0.0: need num_train_timesteps >= 1 and shift > 0"),
        ("base_shift", float("nan"), r"base_shift=nan: must be a finite number"),
        ("use_dynamic_shifting", "yes", r"use_dynamic_shifting='yes': must be true or false"),
        ("max_image_seq_len", 256, r"base_image_seq_len and max_image_seq_len are both 256"),
        ("shift_terminal", 1.0, r"shift_terminal=1.0: must lie in \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=message):
            from_diffusers(flow_solvers.FlowMatchSchedule, {**raw, key: value})
