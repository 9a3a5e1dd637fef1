"""A training run's weights as its users read them: config, model config and parameters.

    weights = run_params.restore("runs/stage3")            # a run workdir or a checkpoint root
    weights.params["dit"], weights.params["lora"]["dit"]   # LoRA adapters still separate

The step's `config` item rebuilds the model (`model_config.build_kontext_config`, with the
special-token ids of the run's `processor/`); the parameters are restored sharded on the
config's mesh from abstract targets. Where the run keeps an EMA of its trainable parameters,
the EMA replaces them (`use_ema=False` keeps the trained values). `qk-jax sample` and
`qk-jax convert --from-run` both read runs through `restore`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from qk_jax import checkpoint as ckpt_lib
from qk_jax import model_config, optim, sharding
from qk_jax.config import saved_run_config
from qk_jax.models.kontext import KontextConfig, QueryKontext


@dataclasses.dataclass
class RunParams:
    """What `restore` read: `params` is the model's tree (`{"vlm", "connector", ..., "lora"?}`)."""

    config: ml_collections.ConfigDict
    kcfg: KontextConfig
    params: dict
    mesh: Any
    step: int
    used_ema: bool
    root: str  # the checkpoint root
    processor_dir: str | None


def restore(
    checkpoint: str, *, use_ema: bool = True, mesh_spec: Mapping[str, int] | None = None, step: int | None = None
) -> RunParams:
    """The weights of step `step` (default: the newest good one; a corrupt step is skipped
    with a warning, see `Checkpointer.restore_newest`) of a run workdir or checkpoint root.

    Raises FileNotFoundError naming the folder when it holds no checkpoint steps.
    """
    root, processor_dir = ckpt_lib.resolve_run(checkpoint)
    reader = ckpt_lib.Checkpointer(root, create=False)
    if reader.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint steps in {root}")
    special = model_config.read_special_token_ids(processor_dir) if processor_dir else None
    chosen: dict[str, Any] = {}

    def targets_for(s: int, items: dict) -> dict[str, Any]:
        """The step's own config decides the model, mesh and targets."""
        config = saved_run_config(items["config"])
        if mesh_spec:
            config.mesh = dict(mesh_spec)
        kcfg = model_config.build_kontext_config(config, special)
        mesh = sharding.make_mesh(config.mesh)
        with jax.set_mesh(mesh), sharding.activation_rules_context():
            abstract, specs = sharding.abstract_init(QueryKontext(kcfg).init, jax.random.key(0))
            shardings = sharding.tree_shardings(abstract, specs, mesh, sharding.rules_from_config(config))
            target = sharding.abstract_with_shardings(abstract, shardings)
        ema_target = None
        if use_ema and "ema" in reader.items_in(s):
            ema_target, _ = optim.partition(target, config.train.trainable)
        chosen.update(config=config, kcfg=kcfg, mesh=mesh, ema=ema_target is not None)
        return {"params": target, "ema": ema_target} if ema_target is not None else {"params": target}

    restored = reader.restore_newest(targets_for, step=step, json_items=(), required=("config",))
    reader.close()
    config, kcfg, mesh = chosen["config"], chosen["kcfg"], chosen["mesh"]
    params = restored["params"]
    if chosen["ema"]:  # the EMA replaces the trained weights
        _, frozen = optim.partition(params, config.train.trainable)
        params = optim.combine(restored["ema"], frozen)
    return RunParams(
        config=config,
        kcfg=kcfg,
        params=params,
        mesh=mesh,
        step=restored["step"],
        used_ema=chosen["ema"],
        root=root,
        processor_dir=processor_dir,
    )
