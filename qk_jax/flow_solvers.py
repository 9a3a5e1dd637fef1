"""Flow-matching samplers: schedules equal to diffusers' `FlowMatchEulerDiscreteScheduler`,
and jittable Euler and Heun loops over a velocity closure.

    sched = read_schedule("Qwen-Image")        # convert.diffusers_configs: its scheduler/scheduler_config.json
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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.flow import calculate_shift, exponential_time_shift, linear_time_shift

Array = jax.Array
VelocityFn = Callable[[Array, Array], Array]


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

    def mu(self, image_seq_len: int) -> float:
        return calculate_shift(
            image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift
        )


# The schedules of Qwen-Image's and FLUX.1-dev's published scheduler/scheduler_config.json (copies in
# tests/fixtures/published/); with a real folder `diffusers_configs.read_schedule(folder)` reads its own file.
QWEN_IMAGE_SCHEDULE = FlowMatchSchedule(
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)
FLUX_SCHEDULE = FlowMatchSchedule(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)


def pipeline_sigmas(num_steps: int) -> np.ndarray:
    """The sigmas the FLUX and Qwen-Image pipelines pass: linspace(1, 1/n, n)."""
    return np.linspace(1.0, 1 / num_steps, num_steps)


def flow_schedule(
    num_steps: int,
    schedule: FlowMatchSchedule = FlowMatchSchedule(),
    *,
    sigmas: Any = None,
    mu: float | None = None,
    image_seq_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
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


def euler_sample(
    velocity_fn: VelocityFn,
    x: Array,
    sigmas: Array,
    timesteps: Array,
    degrade: Callable[[Array, Array], Array] | None = None,
    min_t: float = 0.0,
) -> Array:
    """Euler integration from sigmas[0] to sigmas[-1]: x <- x + (s_{i+1} - s_i) v(x, t_i).

    Identical to stepping diffusers' `FlowMatchEulerDiscreteScheduler` over the same
    schedule. x is float32 (B, ...); sigmas (S+1,), timesteps (S,).

    With `degrade(x0, s)`, the B_s of a blurring process x_s = (1 - s) B_s x0 + s eps
    (`qk_jax.models.blur`), each step is DDIM's for that process: the clean prediction
    x0 = x - max(t, min_t) v (an x0 generator's own output) and the noise it implies,
    eps = (x - (1 - t) B_t x0) / t, put together again at the next sigma s. With B the
    identity that is the Euler step above.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    timesteps = jnp.asarray(timesteps, jnp.float32)

    def body(i, x):
        v = velocity_fn(x, timesteps[i])
        return (x.astype(jnp.float32) + (sigmas[i + 1] - sigmas[i]) * v).astype(x.dtype)

    def blurred_body(i, x):
        v = velocity_fn(x, timesteps[i]).astype(jnp.float32)
        return blurred_step(x.astype(jnp.float32), v, sigmas[i], sigmas[i + 1], degrade, min_t).astype(x.dtype)

    return jax.lax.fori_loop(0, timesteps.shape[0], body if degrade is None else blurred_body, x)


def blurred_step(x: Array, v: Array, t, s, degrade: Callable[[Array, Array], Array], min_t: float = 0.0) -> Array:
    """One DDIM step from t to s of the blurring process (see `euler_sample`), given the velocity v
    of an x0 generator at (x, t)."""
    x0 = x - jnp.maximum(t, min_t) * v
    eps = (x - (1.0 - t) * degrade(x0, t)) / t
    return (1.0 - s) * degrade(x0, s) + s * eps


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


def sample(
    velocity_fn: VelocityFn,
    noise: Array,
    sigmas: Array,
    timesteps: Array,
    method: str = "euler",
    degrade: Callable[[Array, Array], Array] | None = None,
    min_t: float = 0.0,
) -> Array:
    """Runs the chosen sampler (`"euler"` or `"heun"`) from `noise` at sigmas[0]; `degrade`: the
    blurring process's B_s (see `euler_sample`; Euler only)."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; known: {sorted(SAMPLERS)}")
    if degrade is not None:
        if method != "euler":
            raise ValueError(f"sampler {method!r} with a blurring process (model.blur): only 'euler' steps it")
        return euler_sample(velocity_fn, noise, sigmas, timesteps, degrade, min_t)
    return SAMPLERS[method](velocity_fn, noise, sigmas, timesteps)
