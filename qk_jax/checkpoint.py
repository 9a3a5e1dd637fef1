"""Orbax checkpoints: params, optimizer state, step, EMA, data-iterator state and config.

One `Checkpointer` per run directory wraps an Orbax `CheckpointManager` whose items are

  params     the parameter tree                    (PyTree, sharded arrays)
  opt_state  the optimizer state (trainable only)  (PyTree)
  ema        EMA of the trainable weights          (PyTree, optional)
  data       the data iterator's state             (JSON, optional)
  config     the run's config                      (JSON, optional)
  meta       step and free-form scalars             (JSON)
  checksums  a hash of every saved array            (JSON)

Saves are asynchronous (the step continues while the previous save finishes writing);
Orbax writes a step under a temporary name and renames it when complete, so an
interrupted save never shows up as a step. `check_save()` surfaces a failed background
save at the next step boundary as a `CheckpointSaveError` naming the step and the cause.

Orbax does not checksum: every saved array is hashed on its devices (`tree_checksums`,
independent of the mesh) and the hashes are saved with the step; a restore recomputes
them, so flipped bytes are caught. A step that is incomplete or corrupt (an item or
metadata file missing, a file truncated or unreadable, a checksum that does not match)
is reported in one warning line and the next older step is used; the run that owns the
directory (`quarantine=True`) moves it aside to `<step>.corrupt`, so a later save of the
same step number does not collide with it. With several processes each read's outcome is
agreed across them before the (collective) checksums run, so every process skips the same
steps and resumes from the same one, and only the primary process renames a folder (the
others wait at a barrier). Only faults of the checkpoint itself do that:
an out-of-memory or a transient I/O error stops with the step named. Restores take
*abstract targets* (`jax.ShapeDtypeStruct` with shardings), so a checkpoint written on
one mesh restores onto any other mesh or a single device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from qk_jax import distributed, logs, paths
from qk_jax.checkpoint_integrity import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointSaveError,
    CorruptCheckpointError,
    NoGoodCheckpointError,
    first_line,
    is_checkpoint_fault,
    tree_checksums,
)
from qk_jax.checkpoint_items import REPLICA_PARALLEL_MIN_SLICE_BYTES, restore_args_for, to_json, type_handlers
from qk_jax.tree import path_str

ARRAY_ITEMS = ("params", "opt_state", "ema")
JSON_ITEMS = ("data", "config", "meta", "checksums")
ITEMS = ARRAY_ITEMS + JSON_ITEMS
CORRUPT_SUFFIX = ".corrupt"


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
      keep_period: also keep every step divisible by this (None / 0: none), so a long run
        keeps periodic steps to go back to beside the newest N.
      async_save: write in a background thread; call `wait()` before reading back.
      save_interval_steps: `save()` is a no-op for other steps unless `force=True`.
      replica_parallel_min_slice_bytes: a replicated array is written in slices, one per
        copy, only when each slice holds at least this many bytes (0: always).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        save_interval_steps: int = 1,
        create: bool = True,
        keep_period: int | None = None,
        replica_parallel_min_slice_bytes: int = REPLICA_PARALLEL_MIN_SLICE_BYTES,
    ):
        self.directory = absolute_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period or None,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=create,
        )
        registry = type_handlers(replica_parallel_min_slice_bytes)
        handlers = {name: ocp.PyTreeCheckpointHandler(type_handler_registry=registry) for name in ARRAY_ITEMS}
        handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._saving: int | None = None  # the step of the save in flight (or last started)
        self._failed: CheckpointSaveError | None = None
        self._reader: ocp.PyTreeCheckpointHandler | None = None  # reads array items (see _read_item)

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        *,
        params,
        opt_state=None,
        ema=None,
        data=None,
        config=None,
        meta: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving `step`; returns whether a save was started (see save_interval_steps).

        Raises CheckpointSaveError when the previous save failed."""
        self.check_save()
        arrays = {"params": params, "opt_state": opt_state, "ema": ema}
        arrays = {k: v for k, v in arrays.items() if v is not None}
        items = {name: ocp.args.PyTreeSave(tree) for name, tree in arrays.items()}
        if data is not None:
            items["data"] = ocp.args.JsonSave(to_json(data))
        if config is not None:
            items["config"] = ocp.args.JsonSave(to_json(config))
        items["meta"] = ocp.args.JsonSave(to_json({"step": int(step), **dict(meta or {}), "checksummed": True}))
        items["checksums"] = ocp.args.JsonSave({name: tree_checksums(tree) for name, tree in arrays.items()})
        try:
            started = self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # the synchronous part of a save (or of a previous one)
            raise self._save_error(int(step), e) from e
        if started:
            self._saving = int(step)
        return started

    def check_save(self) -> None:
        """Raises CheckpointSaveError if a finished background save failed; never blocks on
        a save still in flight. Call it at every step boundary."""
        if self._failed is not None:
            raise self._failed
        if self._saving is None or self._manager.is_saving_in_progress():
            return
        self.wait()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk; CheckpointSaveError if one failed."""
        if self._failed is not None:
            raise self._failed
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # any failure of the background write
            raise self._save_error(self._saving, e) from e
        self._saving = None

    def _save_error(self, step: int | None, error: BaseException) -> CheckpointSaveError:
        where = self.directory / str(step) if step is not None else self.directory
        self._failed = CheckpointSaveError(f"saving checkpoint {where} failed: {first_line(error, limit=None)}")
        return self._failed

    def close(self, report: bool = True) -> None:
        """Waits for pending saves and closes; CheckpointSaveError if the last one failed
        (reported once: closing after a reported failure only releases the manager). With
        `report=False` (closing while another error is on its way up) a failed save is
        logged in one line instead of raised."""
        reported = self._failed is not None
        try:
            if not reported:
                self.wait()
        except CheckpointSaveError as e:
            if report:
                raise
            logs.error("%s", e)
        finally:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            try:
                self._manager.close()
            except Exception:  # the failure was raised (or is being raised) above
                if not (reported or self._failed is not None):
                    raise

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

    def restore(
        self,
        step: int | None = None,
        *,
        params=None,
        opt_state=None,
        ema=None,
        json_items: Iterable[str] = ("data", "config", "meta"),
        fallback: bool = True,
        quarantine: bool = False,
    ) -> dict[str, Any]:
        """Restores the given items of `step` (default: the newest good step).

        Array items are restored only when an abstract target is given: a tree of
        `jax.ShapeDtypeStruct` whose `sharding` says where each array goes (leaves
        without a sharding come back as numpy). JSON items present in the step are
        restored when listed in `json_items`. See `restore_newest` for the choice of step
        and `quarantine`; `fallback` is kept for callers that name a step (which never
        falls back).
        Returns a dict with the restored items and `step`.
        """
        del fallback
        targets = {"params": params, "opt_state": opt_state, "ema": ema}
        targets = {k: v for k, v in targets.items() if v is not None}
        return self.restore_newest(
            lambda _step, _json: targets, step=step, json_items=json_items, quarantine=quarantine
        )

    def restore_newest(
        self,
        targets_for: Callable[[int, dict], Mapping[str, Any]],
        *,
        step: int | None = None,
        json_items: Iterable[str] = ("data", "config", "meta"),
        required: Iterable[str] = (),
        quarantine: bool = False,
    ) -> dict[str, Any]:
        """Restores the newest good step (or exactly `step`).

        `targets_for(step, json)` returns the abstract array targets ({'params': ...}) given
        the step's JSON items (e.g. targets built from the step's own config); a step that
        lacks a `required` JSON item is incomplete. A step that is incomplete or corrupt is
        named in one warning line and skipped; with `quarantine` (the run that owns the
        directory) it is also moved aside to `<step>.corrupt`.
        Raises CorruptCheckpointError when the named `step` is corrupt, CheckpointError when
        it was never saved (naming the steps there are), when no step is good, when a tree
        does not fit its target, or when reading failed for a reason outside the checkpoint
        (e.g. out of memory), naming the step.
        """
        # Every process walks the same candidates and takes the same decision at each one: the
        # outcome of each read is agreed across processes (`_agree`) before anything collective
        # (the checksums) runs, so a step unreadable on any process is skipped by all of them
        # and only the primary process moves it aside.
        candidates = (
            [int(step)] if step is not None else distributed.same_on_all_processes(list(reversed(self.steps())))
        )
        if not candidates:
            raise CheckpointError(f"no checkpoint steps in {self.directory}")
        if step is not None and not (self.directory / str(int(step))).exists():
            raise CheckpointError(f"no checkpoint step {step} in {self.directory}; its steps: {self.steps()}")
        json_items, required = tuple(json_items), tuple(required)
        bad = []
        for s in candidates:
            present = set(self.items_in(s))
            items, fault = self._attempt(s, lambda: self._read_json(s, present, json_items + required, required))
            fault = self._agree(s, fault)
            if fault is None:
                targets = targets_for(s, items)  # errors here are the caller's, not the checkpoint's
                read, fault = self._attempt(s, lambda: self._read_arrays(s, present, targets, items["meta"]))
                fault = self._agree(s, fault)
            if fault is None:  # every process holds the arrays: verified together, one outcome for all
                arrays, fault = self._attempt(s, lambda: self._verify_arrays(s, *read))
            if fault is None:
                out = {k: v for k, v in items.items() if k in json_items or k in required}
                return {**out, **arrays, "step": s}
            if step is not None and isinstance(fault, CorruptCheckpointError):
                raise fault
            if step is not None:
                raise CorruptCheckpointError(
                    f"checkpoint step {s} in {self.directory} is incomplete or corrupt: {first_line(fault)}"
                ) from fault
            self._set_aside(s, fault, quarantine)
            bad.append(s)
        raise NoGoodCheckpointError(
            f"no readable checkpoint in {self.directory}: steps {bad} are incomplete or corrupt"
        )

    def _attempt(self, step: int, read: Callable[[], Any]) -> tuple[Any, BaseException | None]:
        """(read(), None), or (None, the failure): a fault of the checkpoint as it was raised,
        any other failure as a CheckpointError naming the step (see `_is_fault`)."""
        try:
            return read(), None
        except CheckpointError as e:
            return None, e
        except Exception as e:  # noqa: BLE001 - classified here
            if is_checkpoint_fault(e):
                return None, e
            error = CheckpointError(
                f"reading checkpoint step {step} in {self.directory} failed: {first_line(e)} "
                f"(not a fault of the checkpoint; nothing was skipped)"
            )
            error.__cause__ = e
            return None, error

    @staticmethod
    def _is_fault(error: BaseException) -> bool:
        """A fault of the checkpoint (skip the step) rather than an error to stop with."""
        return isinstance(error, CorruptCheckpointError) or not isinstance(error, CheckpointError)

    def _agree(self, step: int, outcome: BaseException | None) -> BaseException | None:
        """The outcome of reading `step`, the same on every process: any process that failed
        for a reason outside the checkpoint stops them all (raised); else any process that
        found a fault makes the step faulty for all. One process: `outcome` unchanged (or raised)."""
        code = 0 if outcome is None else 1 if self._is_fault(outcome) else 2
        codes = distributed.gather_ints(code)
        if max(codes) == 2:
            if code == 2:
                raise outcome
            raise CheckpointError(
                f"reading checkpoint step {step} in {self.directory} failed on process(es) "
                f"{[i for i, c in enumerate(codes) if c == 2]} (not a fault of the checkpoint; "
                f"nothing was skipped)"
            )
        if max(codes) == 1 and code == 0:
            return CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} is unreadable on process(es) "
                f"{[i for i, c in enumerate(codes) if c == 1]}"
            )
        return outcome

    def _set_aside(self, step: int, fault: BaseException, quarantine: bool) -> None:
        """One warning line naming the step and the fault; with `quarantine`, the step's
        folder is renamed to `<step>.corrupt` (`.corrupt.1`, ... if taken) by the primary
        process, while the others wait."""
        source = self.directory / str(step)
        if not quarantine:
            logs.warning(
                "checkpoint step %d in %s is incomplete or corrupt (%s); skipping it",
                step,
                self.directory,
                first_line(fault),
            )
            return
        dest = self.directory / f"{step}{CORRUPT_SUFFIX}"
        n = 0
        while dest.exists():
            n += 1
            dest = self.directory / f"{step}{CORRUPT_SUFFIX}.{n}"
        distributed.barrier(
            f"qk_checkpoint_set_aside_named_{step}"
        )  # every process has named `dest` before it is taken
        if jax.process_index() == 0:
            source.rename(dest)
        distributed.barrier(f"qk_checkpoint_set_aside_{step}")
        self._manager.reload()
        logs.warning(
            "checkpoint step %d in %s is incomplete or corrupt (%s); moved aside to %s, trying an older step",
            step,
            self.directory,
            first_line(fault),
            dest,
        )

    def _read_arrays(
        self, step: int, present: set[str], targets: Mapping[str, Any], meta: Mapping[str, Any]
    ) -> tuple[dict, dict, dict | None]:
        """Reads the array items named by `targets` (each process its own shards), their
        shapes checked: (restored, stored leaves, stored checksums or None)."""
        for name in targets:
            if name not in present:
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {self.directory} has no item {name!r} (it holds {sorted(present)})"
                )
        if not targets:
            return {}, {}, None
        stored = {name: self._check_shapes(step, name, target) for name, target in targets.items()}
        # Each item through its handler, not the manager: Orbax's Checkpointer.restore ends at a
        # barrier of all processes, which a process whose read failed never reaches (the others
        # would wait there forever); here the processes meet in `_agree` instead.
        restored = {name: self._read_item(step, name, t) for name, t in targets.items()}
        sums = self._stored_checksums(step, present, meta)
        return restored, stored, sums

    def _read_item(self, step: int, name: str, target) -> Any:
        """One array item of a step, read by this process alone (one handler serves every
        read of this Checkpointer and is closed with it, as the manager's own handlers are)."""
        if self._reader is None:
            self._reader = ocp.PyTreeCheckpointHandler()
        return self._reader.restore(
            self.directory / str(step) / name,
            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args_for(target)),
        )

    def _verify_arrays(self, step: int, restored: dict, stored: dict, sums: dict | None) -> dict[str, Any]:
        """The restored arrays, their checksums verified (computed where the arrays live, the
        same result on every process)."""
        if sums is not None:
            for name in restored:
                self._verify(step, name, restored[name], stored[name], sums.get(name, {}))
        return restored

    def _read_json(
        self, step: int, present: set[str], names: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """The listed JSON items present in the step; CorruptCheckpointError when `meta` (which
        every step has) or a `required` item is missing."""
        for name in ("meta", *required):
            if name not in present:
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {self.directory} has no item {name!r} (it holds {sorted(present)})"
                )
        return {name: read_json_item(self.directory, step, name) for name in set(names) | {"meta"} if name in present}

    def _stored_checksums(
        self, step: int, present: set[str], meta: Mapping[str, Any]
    ) -> dict[str, dict[str, int]] | None:
        """The step's checksums; None (with a warning) for a step written before checksums;
        CorruptCheckpointError when a step written with checksums lost them."""
        if "checksums" not in present and meta.get("checksummed"):
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} has no item 'checksums' (it holds {sorted(present)})"
            )
        if "checksums" not in present:
            logs.warning(
                "checkpoint step %d in %s has no checksums (written by an older version); its arrays are "
                "restored unverified",
                step,
                self.directory,
            )
            return None
        return read_json_item(self.directory, step, "checksums")

    def _verify(self, step: int, name: str, tree, stored_flat: Mapping[str, Any], sums: Mapping[str, int]) -> None:
        """CorruptCheckpointError naming the first array whose bits differ from what was saved
        (arrays restored into another dtype are not comparable and are left out)."""
        same_dtype = {
            p: v
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
            if np.dtype(v.dtype) == np.dtype(stored_flat[path_str(p)].dtype)
        }
        got = tree_checksums({path_str(p): v for p, v in same_dtype.items()})
        for key, value in got.items():
            if key not in sums:
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {self.directory}: {name}/{key} has no checksum"
                )
            if int(sums[key]) != value:
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {self.directory}: {name}/{key} does not "
                    f"match its checksum (the file's bytes changed after saving)"
                )

    def _check_shapes(self, step: int, name: str, target) -> dict[str, Any]:
        """Refuses a target whose paths, shapes or structure differ from the stored tree, naming
        the path. Returns the stored leaves by path."""
        stored = self.abstract_item(step, name)
        # Paths compared as 'a/0/count': Orbax stores named tuples as dicts and tuples as lists.
        s_flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
        t_flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
        missing = sorted(set(t_flat) - set(s_flat))
        if missing:
            raise CheckpointMismatchError(
                f"{name}/{missing[0]} is not in checkpoint step {step} of {self.directory}"
                f" ({len(missing)} target paths missing)"
            )
        for key, t in t_flat.items():
            if tuple(s_flat[key].shape) != tuple(t.shape):
                raise CheckpointMismatchError(
                    f"{name}/{key}: checkpoint step {step} holds shape {tuple(s_flat[key].shape)}, "
                    f"the target expects {tuple(t.shape)}"
                )
            sharding = getattr(t, "sharding", None)
            if sharding is not None:
                try:
                    sharding.shard_shape(tuple(t.shape))
                except Exception as e:  # noqa: BLE001
                    raise CheckpointMismatchError(
                        f"{name}/{key}: target sharding {sharding} does not fit shape {tuple(t.shape)}: {e}"
                    ) from None
        return s_flat

    def restore_subtree(self, step: int | None, item: str, subtree) -> Any:
        """Partial restore: only the arrays named by `subtree` (an abstract tree that mirrors
        a part of the stored `item`, e.g. `{'vlm': {...}}` of `params`), checksums verified.

        Used by stage surgery to read the parts it keeps without reading the rest.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint steps in {self.directory}")
        stored = self._check_shapes(step, item, subtree)
        handler = ocp.PyTreeCheckpointHandler()
        tree = handler.restore(
            self.directory / str(step) / item,
            args=ocp.args.PyTreeRestore(item=subtree, restore_args=restore_args_for(subtree), partial_restore=True),
        )
        sums = self._stored_checksums(step, set(self.items_in(step)), read_json_item(self.directory, step, "meta"))
        if sums is not None:
            self._verify(step, item, tree, stored, sums.get(item, {}))
        return tree


def replace_shardings(abstract_tree, shardings) -> Any:
    """Attach shardings (a matching tree, or one sharding for all) to abstract leaves."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), abstract_tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def read_json_item(directory, step: int, item: str) -> Any:
    """A JSON item of a step without building a manager (e.g. the config of a checkpoint)."""
    path = epath.Path(directory) / str(step) / item / "metadata"
    if not path.exists():
        raise CorruptCheckpointError(f"checkpoint step {step} in {directory} has no {item!r} item")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {directory}: {item}/metadata is not valid JSON ({first_line(e)})"
        ) from None


def resolve_run(path: str | os.PathLike) -> tuple[str, str | None]:
    """(checkpoint root, processor folder or None) of a run workdir (`RUN`, holding
    `checkpoints/` and `processor/`) or of a checkpoint root (e.g. written by surgery).

    Every option that takes a run (`train.init_from`, `qk-jax sample --checkpoint`,
    `qk-jax surgery --src`) goes through here, so each accepts both.
    """
    path = os.fspath(path)  # a local path or a URL (`paths`)
    root = paths.join(path, "checkpoints") if paths.isdir(paths.join(path, "checkpoints")) else path
    if not paths.isdir(root):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    for cand in (paths.join(path, "processor"), paths.join(paths.dirname(root), "processor")):
        if paths.exists(paths.join(cand, "tokenizer_config.json")):
            return root, cand
    return root, None
