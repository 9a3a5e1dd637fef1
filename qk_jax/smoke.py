"""`qk-jax smoke --config configs/smoke.py:tiny --workdir DIR`: checks a machine end to end.

Builds the mesh from the config, initialises a small LM directly sharded, prints the
parameter shardings, trains a few steps on a learnable synthetic sequence task, saves an
Orbax checkpoint, restores it onto another (replicated) layout and checks it bit-exactly. Every
number it prints is measured.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from qk_jax import checkpoint as ckpt_lib
from qk_jax import config as config_lib
from qk_jax import distributed, logs, paths, sharding
from qk_jax.models.smoke_lm import SmokeLM


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/smoke.py:tiny.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where the checkpoint is written.")


DIVISIBLE = {
    "model.num_heads": ("tensor",),
    "model.mlp_dim": ("tensor",),
    "model.vocab_size": ("tensor",),
    "model.embed_dim": ("fsdp",),
    "train.batch_size": ("data", "fsdp"),
}


def synthetic_batch(rng: np.random.Generator, batch: int, length: int, vocab: int) -> np.ndarray:
    """Arithmetic sequences mod vocab: (B, T+1) int32. Learnable, so the loss must fall."""
    start = rng.integers(0, vocab, size=(batch, 1))
    stride = rng.integers(1, 4, size=(batch, 1))
    return ((start + stride * np.arange(length + 1)[None]) % vocab).astype(np.int32)


def make_train_step(model: SmokeLM, tx: optax.GradientTransformation):
    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def check_workdir(workdir: str) -> None:
    """Refuses a workdir that holds anything (an earlier smoke run's checkpoint would make the
    save fail after the training), then creates it and proves it writable, before any work:
    WorkdirError naming it."""
    if paths.exists(workdir) and (not paths.isdir(workdir) or paths.listdir(workdir)):
        what = f"is not empty (it holds {paths.listdir(workdir)[:3]})" if paths.isdir(workdir) else "is a file"
        raise paths.WorkdirError(
            f"workdir {workdir} {what}: the smoke check writes a new checkpoint; give it a new or empty folder"
        )
    distributed.barrier("smoke_workdir_checked")  # every process has looked before any writes
    paths.check_workdir(workdir)


def run(config, workdir: str) -> dict:
    """Runs the smoke job; returns a summary dict (also printed).

    Works the same in one process and in several (`launch/local.py`): each process
    feeds its own rows of the batch, and the checkpoint is written by all of them.
    """
    distributed.maybe_initialize()
    n_dev = jax.device_count()
    config_lib.check_divisible(config, n_dev, DIVISIBLE)
    check_workdir(workdir)
    mesh = sharding.make_mesh(config.mesh)
    logs.info(
        f"devices: {n_dev} x {jax.devices()[0].platform} in {jax.process_count()} process(es); mesh {dict(mesh.shape)}"
    )
    m = config.model
    model = SmokeLM(m.vocab_size, m.embed_dim, m.num_heads, m.mlp_dim, m.num_layers, remat=m.remat)
    t = config.train
    tokens0 = jnp.zeros((t.batch_size, t.seq_len), jnp.int32)
    init = lambda rng: model.init(rng, tokens0)["params"]
    t0 = time.perf_counter()
    params, shardings, _ = sharding.init_sharded(init, mesh, jax.random.key(t.seed))
    logs.info(sharding.sharding_table(params))
    tx = optax.adamw(t.learning_rate)
    opt_state = jax.jit(tx.init)(params)  # follows the params' shardings
    step_fn = jax.jit(make_train_step(model, tx), donate_argnums=(0, 1))
    rng = np.random.default_rng([t.seed, jax.process_index()])
    local_rows = distributed.local_batch_size(t.batch_size)
    losses = []
    with jax.set_mesh(mesh):
        for i in range(t.steps):
            batch = sharding.place_batch(synthetic_batch(rng, local_rows, t.seq_len, m.vocab_size), mesh)
            params, opt_state, loss = step_fn(params, opt_state, batch)
            losses.append(float(loss))
            if i % max(1, t.steps // 5) == 0 or i == t.steps - 1:
                logs.info(f"step {i + 1:4d}/{t.steps}  loss {losses[-1]:.4f}")
    train_s = time.perf_counter() - t0
    with ckpt_lib.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep) as ck:
        ck.save(t.steps, params=params, opt_state=opt_state, config=config, force=True)
        ck.wait()
        # Restore onto another layout (fully replicated) to exercise resharding on read.
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        target = ckpt_lib.replace_shardings(
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params), replicated
        )
        restored = ck.restore(params=target)["params"]
    same = jax.jit(
        lambda a, b: jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]))
    )
    exact = bool(same(params, restored))
    summary = {
        "devices": n_dev,
        "processes": jax.process_count(),
        "mesh": dict(mesh.shape),
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "train_seconds": round(train_s, 2),
        "checkpoint": str(workdir),
        "restore_bit_exact": exact,
    }
    print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    if not exact:
        raise SystemExit("checkpoint restored onto a replicated layout differs from the saved parameters")
    return summary


def main(argv):
    del argv
    if flags.FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    if flags.FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/smoke.py:tiny")
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
