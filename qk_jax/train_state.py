"""The train state's shapes and shardings, and the one jitted train step over them.

    abstract = state_target(model, config, mesh, tx)   # ShapeDtypeStructs + NamedShardings
                  # = abstract_state(params_target(model, mesh, rules), trainable, tx, ema)
    state = init_state(params, trainable, tx, ema, state_shardings(abstract))   # a fresh start
    step = jit_train_step(model, tx, config.train, state_shardings(abstract))   # in/out shardings, donation

`train.py` places a fresh state with these shardings and restores a checkpoint into
`abstract`; `qk-jax aot` lowers the same `jit_train_step` with `abstract` and an abstract
batch, so the program it judges is the one training runs.

Shardings of the state {step, trainable, frozen, opt_state, ema}:
- trainable / frozen: those of the parameters (logical-axis rules, `sharding.py`);
- opt_state: each parameter-shaped leaf (Adam moments, ...) takes the sharding of *its*
  parameter, matched by the optimizer's structure (`optax.tree_map_params`), never by shape
  (a (D, D) query kernel and a (D, D) output kernel are sharded differently); the rest
  (step counts, ...) is replicated;
- ema: float32, sharded like its parameter; step: replicated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qk_jax import optim, sharding
from qk_jax.train_step import make_train_step


def _replicated(like: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The replicated sharding on `like`'s devices (a single device's sharding is its own)."""
    if isinstance(like, NamedSharding):
        return NamedSharding(like.mesh, P())
    if len(like.device_set) == 1:
        return like
    raise ValueError(f"parameters placed with {like!r}: expected NamedShardings (sharding.tree_shardings)")


def _struct(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def params_target(model, mesh, rules_by_submodel=None) -> Any:
    """ShapeDtypeStructs of `model`'s parameter tree with the NamedShardings of the rule tables
    `rules_by_submodel` (default `sharding.RULES_BY_SUBMODEL`); touches no device."""
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    abstract, specs = sharding.abstract_init(model.init, key)
    return sharding.abstract_with_shardings(abstract, sharding.tree_shardings(abstract, specs, mesh, rules_by_submodel))


def state_target(model, config, mesh, tx: optax.GradientTransformation) -> dict[str, Any]:
    """The abstract train state of a stage config (`abstract_state` of `params_target` under the
    config's rule tables): the restore target of a resumed run and what `qk-jax aot` compiles."""
    params = params_target(model, mesh, sharding.rules_from_config(config))
    return abstract_state(params, config.train.trainable, tx, config.train.ema_decay > 0)


def abstract_state(params: Mapping[str, Any], trainable_prefixes, tx: optax.GradientTransformation, ema: bool):
    """The abstract train state of `params` (arrays or ShapeDtypeStructs carrying shardings):
    the same tree `init_state` returns, every leaf a ShapeDtypeStruct with its sharding."""
    params = jax.tree.map(lambda x: _struct(x.shape, x.dtype, x.sharding), params)
    trainable, frozen = optim.partition(params, trainable_prefixes)
    leaves = jax.tree.leaves(trainable)
    if not leaves:
        raise ValueError(f"trainable prefixes {list(trainable_prefixes)} select no parameter")
    replicated = _replicated(leaves[0].sharding)
    opt = jax.eval_shape(tx.init, trainable)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, p: p.sharding,
        opt,
        trainable,
        transform_non_params=lambda _: replicated,
    )
    return {
        "step": _struct((), jnp.int32, replicated),
        "trainable": trainable,
        "frozen": frozen,
        "opt_state": jax.tree.map(lambda a, s: _struct(a.shape, a.dtype, s), opt, opt_shardings),
        "ema": jax.tree.map(lambda p: _struct(p.shape, jnp.float32, p.sharding), trainable) if ema else None,
    }


def state_shardings(abstract: Mapping[str, Any]) -> dict[str, Any]:
    """The sharding tree of an abstract (or concrete) train state."""
    return jax.tree.map(lambda a: a.sharding, dict(abstract))


def init_state(
    params: Mapping[str, Any],
    trainable_prefixes,
    tx: optax.GradientTransformation,
    ema: bool,
    shardings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fresh train state of a parameter tree (step 0, optimizer initialised, EMA = the
    trainable weights in float32), placed with `shardings` (a `state_shardings` tree; default:
    those of `abstract_state(params, ...)`, i.e. the parameters' own)."""
    if shardings is None:
        shardings = state_shardings(abstract_state(params, trainable_prefixes, tx, ema))

    def build(params):
        trainable, frozen = optim.partition(params, trainable_prefixes)
        return {
            "step": jnp.zeros((), jnp.int32),
            "trainable": trainable,
            "frozen": frozen,
            "opt_state": tx.init(trainable),
            "ema": jax.tree.map(lambda x: x.astype(jnp.float32), trainable) if ema else None,
        }

    return jax.jit(build, out_shardings=dict(shardings))(params)


def jit_train_step(model, tx: optax.GradientTransformation, train_cfg, shardings: Mapping[str, Any]):
    """The jitted `train_step.make_train_step` of a stage's train config: the state comes in and
    goes out with `shardings` (donated: its buffers are reused for the new state), the batch
    keeps the sharding it is placed with (`model_inputs.place_batch`), the metrics are replicated."""
    step = make_train_step(
        model,
        tx,
        seed=int(train_cfg.seed),
        grad_accum=int(train_cfg.grad_accum),
        ema_decay=float(train_cfg.ema_decay),
        lr_schedule=optim.learning_rate_schedule(train_cfg),
        skip_nonfinite=train_cfg.get("nonfinite", "stop") == "skip_step",
    )
    shardings = dict(shardings)
    return jax.jit(
        step,
        in_shardings=(shardings, None),
        out_shardings=(shardings, _replicated(shardings["step"])),
        donate_argnums=(0,),
    )
