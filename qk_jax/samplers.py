"""Flow-matching samplers: schedules equal to diffusers' `FlowMatchEulerDiscreteScheduler`,
and jittable Euler and Heun loops over a velocity closure.

    sched = read_schedule("Qwen-Image")        # its scheduler/scheduler_config.json
    sigmas, timesteps = flow_schedule(28, sched, image_seq_len=n_tokens, sigmas=pipeline_sigmas(28))
    x0 = euler_sample(velocity_fn, noise, sigmas, timesteps)        # inside jax.jit is fine

`velocity_fn(x, t) -> v` closes over everything that stays fixed across steps (the VLM /
connector condition tokens, masks, position ids, guidance settings: see `guidance.py`),
so the conditioning runs once and only the DiT runs per step. `t` is a float32 scalar,
the model timestep in [0, 1] (diffusers' `scheduler.timesteps / 1000`).

Schedules are computed on the host in numpy with the same dtype flow as diffusers (so
sigmas match bit for bit); the loops are `jax.lax.fori_loop`s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.convert.config_keys import reference_arguments
from qk_jax.flow import calculate_shift, exponential_time_shift, linear_time_shift

Array = jax.Array
VelocityFn = Callable[[Array, Array], Array]

SCHEDULER_CONFIG = "scheduler_config.json"
# diffusers `FlowMatchEulerDiscreteScheduler.__init__` arguments and defaults (0.35-0.42).
_SCHEDULER_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False)


@dataclasses.dataclass(frozen=True)
class FlowMatchSchedule:
    """The settings of diffusers' `FlowMatchEulerDiscreteScheduler` that qk_jax implements."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"

    _UNSUPPORTED = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "stochastic_sampling")

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping[str, Any]) -> FlowMatchSchedule:
        """Reads a `scheduler_config.json` dict as diffusers does (missing keys take the scheduler's
        defaults, keys it does not take are ignored with one warning); options that change the
        schedule in a way qk_jax does not implement are refused by name."""
        if cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"scheduler config _class_name={cfg['_class_name']!r}: qk_jax implements the "
                             "FlowMatchEulerDiscreteScheduler schedule only")
        get = reference_arguments(cfg, "FlowMatchEulerDiscreteScheduler", _SCHEDULER_DEFAULTS)
        on = [k for k in cls._UNSUPPORTED if get[k]]
        if on:
            raise ValueError(f"scheduler config sets {on}: qk_jax implements the plain (optionally shifted) "
                             "FlowMatchEulerDiscreteScheduler schedule only")
        if get["time_shift_type"] not in ("exponential", "linear"):
            raise ValueError(f"scheduler config time_shift_type={get['time_shift_type']!r}: use 'exponential' or "
                             "'linear'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in get.items() if k in names})

    def to_diffusers_config(self) -> dict[str, Any]:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **dataclasses.asdict(self)}

    def mu(self, image_seq_len: int) -> float:
        return calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                               self.max_shift)


# The schedules of Qwen-Image's and FLUX.1-dev's published scheduler/scheduler_config.json (copies in
# tests/fixtures/published/); with a real folder `read_schedule(folder)` reads its own file.
QWEN_IMAGE_SCHEDULE = FlowMatchSchedule(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                        time_shift_type="exponential")
FLUX_SCHEDULE = FlowMatchSchedule(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                  base_image_seq_len=256, max_image_seq_len=4096)


def find_scheduler_config(path: str | os.PathLike) -> str | None:
    """The `scheduler_config.json` that belongs to `path`, or None.

    `path` may be the file itself, a scheduler folder, a diffusers pipeline folder (its
    `scheduler/`), or a component folder of a pipeline such as `Qwen-Image/transformer`
    (the pipeline's `scheduler/`).
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    for candidate in (os.path.join(path, SCHEDULER_CONFIG), os.path.join(path, "scheduler", SCHEDULER_CONFIG),
                      os.path.join(os.path.dirname(os.path.abspath(path)), "scheduler", SCHEDULER_CONFIG)):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_schedule(path: str | os.PathLike) -> FlowMatchSchedule:
    """The `FlowMatchSchedule` of a scheduler_config.json, a scheduler folder or a pipeline folder;
    FileNotFoundError / ValueError naming the path."""
    found = find_scheduler_config(path)
    if found is None:
        raise FileNotFoundError(f"{path} is not a {SCHEDULER_CONFIG}, nor a folder holding one (or scheduler/"
                                f"{SCHEDULER_CONFIG}, as a diffusers pipeline folder does)")
    try:
        with open(found) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{found} is not valid JSON: {e}") from e
    try:
        return FlowMatchSchedule.from_diffusers_config(raw)
    except ValueError as e:
        raise ValueError(f"{found}: {e}") from None


def pipeline_sigmas(num_steps: int) -> np.ndarray:
    """The sigmas the FLUX and Qwen-Image pipelines pass: linspace(1, 1/n, n)."""
    return np.linspace(1.0, 1 / num_steps, num_steps)


def flow_schedule(num_steps: int, schedule: FlowMatchSchedule = FlowMatchSchedule(), *,
                  sigmas: Any = None, mu: float | None = None,
                  image_seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(sigmas (S+1,), model_timesteps (S,))` float32, equal to diffusers' `set_timesteps`.

    Args:
      sigmas: explicit sigmas before shifting (`pipeline_sigmas(n)` is what the pipelines
        pass); None uses the scheduler's own linspace between its sigma_max and sigma_min.
      mu: dynamic-shift parameter; when None and the schedule shifts dynamically it is
        `schedule.mu(image_seq_len)` as the pipelines compute it.
    Returns:
      sigmas with a trailing 0 (scheduler.sigmas) and the model timesteps
      `scheduler.timesteps / 1000` that the pipelines feed the transformer.
    """
    n_train = schedule.num_train_timesteps
    if schedule.use_dynamic_shifting and mu is None:
        if image_seq_len is None:
            raise ValueError("flow_schedule: a dynamically shifted schedule needs mu or image_seq_len")
        mu = schedule.mu(image_seq_len)
    # sigma_max / sigma_min as the scheduler computes them at construction (float32)
    train = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1].copy() / np.float32(n_train)
    if not schedule.use_dynamic_shifting:
        train = schedule.shift * train / (1 + (schedule.shift - 1) * train)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    if sigmas is None:
        s = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train
    else:
        s = np.array(sigmas).astype(np.float32)
        if len(s) != num_steps:
            raise ValueError(f"flow_schedule: {len(s)} sigmas for {num_steps} steps")
    if schedule.use_dynamic_shifting:
        shift_fn = exponential_time_shift if schedule.time_shift_type == "exponential" else linear_time_shift
        s = shift_fn(s, mu, 1.0)
    else:
        s = schedule.shift * s / (1 + (schedule.shift - 1) * s)
    if schedule.shift_terminal:
        one_minus = 1 - s
        s = 1 - (one_minus / (one_minus[-1] / (1 - schedule.shift_terminal)))
    s = np.asarray(s).astype(np.float32)
    model_t = (s * np.float32(n_train)) / np.float32(n_train)  # pipelines pass scheduler.timesteps / 1000
    return np.concatenate([s, np.zeros(1, np.float32)]), model_t.astype(np.float32)


# ------------------------------------------------------------------ loops


def euler_sample(velocity_fn: VelocityFn, x: Array, sigmas: Array, timesteps: Array) -> Array:
    """Euler integration from sigmas[0] to sigmas[-1]: x <- x + (s_{i+1} - s_i) v(x, t_i).

    Identical to stepping diffusers' `FlowMatchEulerDiscreteScheduler` over the same
    schedule. x is float32 (B, ...); sigmas (S+1,), timesteps (S,).
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    timesteps = jnp.asarray(timesteps, jnp.float32)

    def body(i, x):
        v = velocity_fn(x, timesteps[i])
        return (x.astype(jnp.float32) + (sigmas[i + 1] - sigmas[i]) * v).astype(x.dtype)

    return jax.lax.fori_loop(0, timesteps.shape[0], body, x)


def heun_sample(velocity_fn: VelocityFn, x: Array, sigmas: Array, timesteps: Array) -> Array:
    """Heun (2nd order, 2 evaluations per step) integration; the last step to sigma = 0 is Euler.

    The same scheme as diffusers' `FlowMatchHeunDiscreteScheduler` (EDM Heun without churn)
    on the same sigmas: 2S - 1 model evaluations for S steps.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    timesteps = jnp.asarray(timesteps, jnp.float32)
    n = timesteps.shape[0]

    def body(i, x):
        dt = sigmas[i + 1] - sigmas[i]
        v1 = velocity_fn(x, timesteps[i])
        v2 = velocity_fn(x + dt * v1, timesteps[i + 1])
        return x + dt * (0.5 * (v1 + v2))

    x = jax.lax.fori_loop(0, n - 1, body, x)
    return x + (sigmas[n] - sigmas[n - 1]) * velocity_fn(x, timesteps[n - 1])


SAMPLERS: dict[str, Callable[..., Array]] = {"euler": euler_sample, "heun": heun_sample}


def sample(velocity_fn: VelocityFn, noise: Array, sigmas: Array, timesteps: Array, method: str = "euler") -> Array:
    """Runs the chosen sampler (`"euler"` or `"heun"`) from `noise` at sigmas[0]."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; known: {sorted(SAMPLERS)}")
    return SAMPLERS[method](velocity_fn, noise, sigmas, timesteps)
