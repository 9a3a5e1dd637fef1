"""The jitted, sharded train step shared by every stage.

    state = {"step", "trainable", "frozen", "opt_state", "ema"}   (a pytree)
    state, metrics = step(state, batch)

- the trainable / frozen split comes from `config.train.trainable` (`optim.partition`):
  gradients are taken w.r.t. the trainable tree only and the optimizer state covers it
  only, so frozen parameters carry no optimizer state;
- LoRA adapters (`params["lora"]`) run unmerged (`x W + x a (s b)`), so only the small
  factors are differentiated;
- the state's shardings and the jitted step over them are `train_state.py`'s;
- gradient accumulation scans over micro-batches stacked on a leading axis;
- the step's randomness is `fold_in(seed, step)`, so a resumed run draws the same noise,
  timesteps and condition dropout as an uninterrupted one;
- a non-finite step (loss, gradient norm or updated parameters not finite) is flagged in
  the metrics (`nonfinite`); with `skip_nonfinite` its update is dropped inside the step
  (parameters, optimizer state and EMA stay as they were; the step counter moves on);
- metrics: loss, per-task loss sums and counts, gradient norm, learning rate, nonfinite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qk_jax import optim
from qk_jax.data.vocab import TASKS
from qk_jax.models.kontext import QueryKontext

NUM_TASKS = len(TASKS)  # batch["task_id"] indexes TASKS


def make_loss_fn(model: QueryKontext) -> Callable:
    def loss_fn(trainable, frozen, batch, rng):
        return model.loss(optim.combine(trainable, frozen), batch, rng, train=True)

    return loss_fn


def _task_sums(per_sample: jax.Array, task_id: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = valid.astype(jnp.float32)
    sums = jax.ops.segment_sum(per_sample * w, task_id, NUM_TASKS)
    counts = jax.ops.segment_sum(w, task_id, NUM_TASKS)
    return sums, counts


def all_finite(tree: Any) -> jax.Array:
    """True when every element of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """`new` where `finite`, else `old`, leaf by leaf (a skipped update)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def make_train_step(
    model: QueryKontext,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    grad_accum: int = 1,
    ema_decay: float = 0.0,
    lr_schedule: Callable | None = None,
    skip_nonfinite: bool = False,
) -> Callable:
    """`step(state, batch) -> (state, metrics)`; with `grad_accum > 1` every batch leaf has a
    leading micro-batch axis of that size. With `skip_nonfinite`, a step whose loss, gradient
    norm or updated parameters are not finite leaves the state unchanged but its step counter."""
    loss_fn = make_loss_fn(model)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    base_key = jax.random.key(seed)

    def micro(trainable, frozen, batch, rng):
        (loss, aux), grads = grad_fn(trainable, frozen, batch, rng)
        sums, counts = _task_sums(aux["per_sample"], batch["task_id"], batch["valid"])
        return loss, grads, sums, counts

    def step(state, batch):
        rng = jax.random.fold_in(base_key, state["step"])
        trainable, frozen = state["trainable"], state["frozen"]
        if grad_accum == 1:
            loss, grads, sums, counts = micro(trainable, frozen, batch, rng)
        else:

            def body(carry, xs):
                i, mb = xs
                micro_loss, g, s, c = micro(trainable, frozen, mb, jax.random.fold_in(rng, i))
                acc_l, acc_g, acc_s, acc_c = carry
                return (acc_l + micro_loss, jax.tree.map(jnp.add, acc_g, g), acc_s + s, acc_c + c), None

            zeros = (
                jnp.zeros((), jnp.float32),
                jax.tree.map(jnp.zeros_like, trainable),
                jnp.zeros((NUM_TASKS,), jnp.float32),
                jnp.zeros((NUM_TASKS,), jnp.float32),
            )
            (loss, grads, sums, counts), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), batch))
            loss = loss / grad_accum
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
        grad_norm = optim.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        trainable = optax.apply_updates(trainable, updates)
        updated = {"trainable": trainable, "opt_state": opt_state}
        if state.get("ema") is not None:
            updated["ema"] = optim.ema_update(state["ema"], trainable, optim.ema_decay_at(state["step"], ema_decay))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(trainable)
        if skip_nonfinite:
            updated = keep_if_finite(finite, updated, {k: state[k] for k in updated})
        new_state = dict(state, step=state["step"] + 1, **updated)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "task_loss_sum": sums,
            "task_count": counts,
            "nonfinite": jnp.logical_not(finite),
        }
        if lr_schedule is not None:
            metrics["learning_rate"] = lr_schedule(state["step"])
        return new_state, metrics

    return step
