"""How the checkpoint's items meet Orbax: the type handlers that write arrays, the restore
arguments that place them, and the JSON form of the small items (`qk_jax.checkpoint`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # the Store Orbax's default array handler uses

# Orbax saves a replicated array "replica-parallel": each of its R copies writes 1/R of it, cut
# out by a slice program per array shape and copy, compiled at the first save of a process (on
# 8 local devices, ~300 programs and 10 s for a stage's hundred leaves). An array whose slices would be
# smaller than this is written whole by one copy, with no slicing: the small leaves (norms,
# biases, LoRA factors) cost nothing to compile, and the large ones still spread their bytes
# over the replicas.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def to_json(obj: Any) -> Any:
    """Config dicts / ConfigDicts / numpy scalars -> plain JSON values."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, bytes):
        return {"__bytes__": obj.decode("latin-1")}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def restore_args_for(target) -> Any:
    """Restore args from an abstract target: each leaf restored with its sharding and dtype."""

    def one(leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=getattr(leaf, "dtype", None))
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(leaf.shape), dtype=leaf.dtype)

    return jax.tree.map(one, target)


def type_handlers(replica_parallel_min_slice_bytes: int) -> ocp.type_handlers.TypeHandlerRegistry:
    """Orbax's standard type handlers, with the jax.Array one writing small arrays from one copy."""
    array_handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=replica_parallel_min_slice_bytes,
        array_metadata_store=array_metadata_store.Store(),  # as Orbax's default handler
    )
    return ocp.type_handlers.create_type_handler_registry(
        *[
            (ty, array_handler if ty is jax.Array else ocp.type_handlers.get_type_handler(ty))
            for ty in ocp.type_handlers.supported_types()
        ]
    )
