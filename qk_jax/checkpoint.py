"""Orbax checkpoints: params, optimizer state, step, EMA, data-iterator state and config.

One `Checkpointer` per run directory wraps an Orbax `CheckpointManager` whose items are

  params     the parameter tree                    (PyTree, sharded arrays)
  opt_state  the optimizer state (trainable only)  (PyTree)
  ema        EMA of the trainable weights          (PyTree, optional)
  data       the data iterator's state             (JSON, optional)
  config     the run's config                      (JSON, optional)
  meta       step and free-form scalars             (JSON)

Saves are asynchronous (the step continues while the previous save finishes writing);
Orbax writes a step under a temporary name and renames it when complete, so an
interrupted save never shows up as a step. A step that is listed but unreadable (a
truncated or deleted file) is skipped with a message naming it, and the newest readable
step is used. Restores take *abstract targets* (`jax.ShapeDtypeStruct` with shardings),
so a checkpoint written on one mesh restores onto any other mesh or a single device.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from qk_jax.sharding import path_str

log = logging.getLogger(__name__)

ARRAY_ITEMS = ("params", "opt_state", "ema")
JSON_ITEMS = ("data", "config", "meta")
ITEMS = ARRAY_ITEMS + JSON_ITEMS


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a tree that does not fit its target (named in the message)."""


def _to_json(obj: Any) -> Any:
    """Config dicts / ConfigDicts / numpy scalars -> plain JSON values."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, bytes):
        return {"__bytes__": obj.decode("latin-1")}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def _restore_args_for(target) -> Any:
    """Restore args from an abstract target: each leaf restored with its sharding and dtype."""

    def one(leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=getattr(leaf, "dtype", None))
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(leaf.shape), dtype=leaf.dtype)

    return jax.tree.map(one, target)


def absolute_path(directory: str | os.PathLike) -> epath.Path:
    """A local path made absolute (Orbax refuses relative ones: `--workdir runs/demo`);
    URLs such as gs://bucket/run are kept as they are."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


class Checkpointer:
    """A run directory of Orbax checkpoint steps.

    Args:
      directory: local path or any `etils.epath` URL (gs://...).
      max_to_keep: keep the newest N steps (None: keep all).
      async_save: write in a background thread; call `wait()` before reading back.
      save_interval_steps: `save()` is a no-op for other steps unless `force=True`.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True,
                 save_interval_steps: int = 1, create: bool = True):
        self.directory = absolute_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save, create=create)
        handlers = {name: ocp.PyTreeCheckpointHandler() for name in ARRAY_ITEMS}
        handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # ------------------------------------------------------------------ saving

    def save(self, step: int, *, params, opt_state=None, ema=None, data=None, config=None,
             meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Starts saving `step`; returns whether a save was started (see save_interval_steps)."""
        items = {"params": ocp.args.PyTreeSave(params)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.PyTreeSave(opt_state)
        if ema is not None:
            items["ema"] = ocp.args.PyTreeSave(ema)
        if data is not None:
            items["data"] = ocp.args.JsonSave(_to_json(data))
        if config is not None:
            items["config"] = ocp.args.JsonSave(_to_json(config))
        items["meta"] = ocp.args.JsonSave(_to_json({"step": int(step), **dict(meta or {})}))
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ listing

    def steps(self) -> list[int]:
        """Finalised steps, oldest first (a save still in flight is not listed)."""
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def items_in(self, step: int) -> list[str]:
        path = self.directory / str(step)
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.exists() else []

    def abstract_item(self, step: int, item: str = "params") -> Any:
        """Shapes and dtypes stored for an array item, as a tree of `jax.ShapeDtypeStruct` (no sharding)."""
        handler = ocp.PyTreeCheckpointHandler()
        meta = handler.metadata(self.directory / str(step) / item)
        tree = meta.tree if hasattr(meta, "tree") else meta

        def one(m):
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)

        return jax.tree.map(one, tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))

    # ------------------------------------------------------------------ restoring

    def restore(self, step: int | None = None, *, params=None, opt_state=None, ema=None,
                json_items: Iterable[str] = ("data", "config", "meta"), fallback: bool = True) -> dict[str, Any]:
        """Restores the given items of `step` (default: the newest readable step).

        Array items are restored only when an abstract target is given: a tree of
        `jax.ShapeDtypeStruct` whose `sharding` says where each array goes (leaves
        without a sharding come back as numpy). JSON items present in the step are
        restored when listed in `json_items`.

        With `fallback` (the default when `step` is None), a step that fails to read is
        reported and the next older one is tried.
        Returns a dict with the restored items and `step`.
        Raises CheckpointError when no step can be read.
        """
        targets = {"params": params, "opt_state": opt_state, "ema": ema}
        targets = {k: v for k, v in targets.items() if v is not None}
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise CheckpointError(f"no checkpoint steps in {self.directory}")
        errors = []
        for s in candidates:
            try:
                return self._restore_step(s, targets, tuple(json_items))
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure marks the step unusable
                msg = f"checkpoint step {s} in {self.directory} is incomplete or corrupt ({type(e).__name__}: " \
                      f"{str(e).splitlines()[0][:300] if str(e) else ''}); skipping it"
                log.warning(msg)
                errors.append(msg)
                if step is not None and not fallback:
                    break
        raise CheckpointError(f"no readable checkpoint in {self.directory}: " + " | ".join(errors))

    def _restore_step(self, step: int, targets: Mapping[str, Any], json_items: tuple[str, ...]) -> dict[str, Any]:
        present = set(self.items_in(step))
        for name in targets:
            if name not in present:
                raise CheckpointError(f"checkpoint step {step} in {self.directory} has no item {name!r} "
                                      f"(it holds {sorted(present)})")
        self._check_shapes(step, targets)
        args = {name: ocp.args.PyTreeRestore(item=t, restore_args=_restore_args_for(t))
                for name, t in targets.items()}
        for name in json_items:
            if name in present:
                args[name] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        out = {name: restored[name] for name in args}
        out["step"] = step
        return out

    def _check_shapes(self, step: int, targets: Mapping[str, Any]) -> None:
        """Refuses a target whose paths, shapes or structure differ from the stored tree, naming the path."""
        for name, target in targets.items():
            stored = self.abstract_item(step, name)
            # Paths compared as 'a/0/count': Orbax stores named tuples as dicts and tuples as lists.
            s_flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
            t_flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
            missing = sorted(set(t_flat) - set(s_flat))
            if missing:
                raise CheckpointError(f"{name}/{missing[0]} is not in checkpoint step {step} of {self.directory}"
                                      f" ({len(missing)} target paths missing)")
            for key, t in t_flat.items():
                if tuple(s_flat[key].shape) != tuple(t.shape):
                    raise CheckpointError(
                        f"{name}/{key}: checkpoint step {step} holds shape {tuple(s_flat[key].shape)}, "
                        f"the target expects {tuple(t.shape)}")
                sharding = getattr(t, "sharding", None)
                if sharding is not None:
                    try:
                        sharding.shard_shape(tuple(t.shape))
                    except Exception as e:  # noqa: BLE001
                        raise CheckpointError(f"{name}/{key}: target sharding {sharding} does not fit shape "
                                              f"{tuple(t.shape)}: {e}") from None

    def restore_subtree(self, step: int | None, item: str, subtree) -> Any:
        """Partial restore: only the arrays named by `subtree` (an abstract tree that mirrors
        a part of the stored `item`, e.g. `{'vlm': {...}}` of `params`).

        Used by stage surgery to read the parts it keeps without reading the rest.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint steps in {self.directory}")
        self._check_shapes(step, {item: subtree})
        handler = ocp.PyTreeCheckpointHandler()
        return handler.restore(
            self.directory / str(step) / item,
            args=ocp.args.PyTreeRestore(item=subtree, restore_args=_restore_args_for(subtree),
                                        partial_restore=True))


def replace_shardings(abstract_tree, shardings) -> Any:
    """Attach shardings (a matching tree, or one sharding for all) to abstract leaves."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), abstract_tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def read_json_item(directory, step: int, item: str) -> Any:
    """A JSON item of a step without building a manager (e.g. the config of a checkpoint)."""
    path = epath.Path(directory) / str(step) / item / "metadata"
    if not path.exists():
        raise CheckpointError(f"checkpoint step {step} in {directory} has no {item!r} item")
    return json.loads(path.read_text())


def resolve_run(path: str | os.PathLike) -> tuple[str, str | None]:
    """(checkpoint root, processor folder or None) of a run workdir (`RUN`, holding
    `checkpoints/` and `processor/`) or of a checkpoint root (e.g. written by surgery).

    Every option that takes a run (`train.init_from`, `qk-jax sample --checkpoint`,
    `qk-jax surgery --src`) goes through here, so each accepts both.
    """
    path = os.fspath(path)
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if not os.path.isdir(root):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    for cand in (os.path.join(path, "processor"), os.path.join(os.path.dirname(root), "processor")):
        if os.path.exists(os.path.join(cand, "tokenizer_config.json")):
            return root, cand
    return root, None
