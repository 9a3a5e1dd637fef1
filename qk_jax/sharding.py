"""Mesh, logical-axis rules, and placing parameter trees and batches on devices.

Every parameter in qk_jax is created with `nn.with_logical_partitioning`, naming its
dimensions with *logical* axes (`embed`, `heads`, `mlp`, ...). One table of rules per
sub-model maps logical axes to the mesh axes `('data', 'fsdp', 'tensor')`. The rule
table for a parameter is picked by the first key of its path (`vlm/...` uses the `vlm`
rules, `dit/...` the `dit` rules), so the VLM can be tensor-parallel while the DiT is
fully sharded (the paper's setup) inside one model.

Activations are constrained with `act_*` logical names (see `ACTIVATION_RULES`), which
are shared by every sub-model and active through `nn.logical_axis_rules` while a step
is traced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qk_jax.tree import path_keys, path_str

MESH_AXES = ("data", "fsdp", "tensor")
# `config.mesh` fields that are not axes: the number of TPU slices (DCN-connected groups of
# chips) the `data` axis spans, 1 = a single slice.
MESH_OPTIONS = ("num_slices",)

Rules = tuple[tuple[str, Any], ...]

# Activation axes: the batch is split over every data-parallel axis; hidden widths stay
# whole (the tensor axis shards weights, XLA inserts the collectives).
ACTIVATION_RULES: Rules = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# Parameter axes shared by every sub-model unless its table overrides them.
_COMMON_PARAM_RULES: Rules = (
    ("layers", None),  # the nn.scan stacking axis
    ("norm", None),
    ("head_dim", None),
    ("rope", None),
    ("conv_kernel", None),
    ("patch", None),
    ("queries", None),
    # The rank axis of LoRA factors: FSDP-sharded when the factor's wide axis is not (its
    # weight's fsdp axis is the one the factor lacks) and the rank divides; see OPTIONAL_AXES.
    ("lora_rank", "fsdp"),
)

# Logical axes sharded only where the mesh divides them and their mesh axes are still
# free after the other dimensions took theirs; elsewhere they are replicated (no error).
OPTIONAL_AXES = frozenset({"lora_rank"})

# The VLM is tensor-parallel (heads, MLP and vocabulary split over `tensor`) with its
# embedding dimension additionally split over `fsdp`.
VLM_RULES: Rules = _COMMON_PARAM_RULES + (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("vision_embed", "fsdp"),
    ("qkv", None),  # the q/k/v axis of the vision tower's fused (D, 3, D) projection
    ("in_channels", None),  # image channels of the vision patch embedding
)

# The DiT is ZeRO/FSDP-sharded over `fsdp` and optionally tensor-parallel.
DIT_RULES: Rules = _COMMON_PARAM_RULES + (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("cond_embed", None),
    ("modulation", "tensor"),
    ("in_channels", None),
    ("out_channels", None),
)

# The VAE is small and convolutional: its weights are replicated, its activations are
# split over the batch.
VAE_RULES: Rules = _COMMON_PARAM_RULES + (
    ("conv_in", None),
    ("conv_out", None),
    ("embed", None),
)

# Connector and kontext queries: small; shard the wide output over fsdp.
CONNECTOR_RULES: Rules = _COMMON_PARAM_RULES + (
    ("embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("cond_embed", "fsdp"),
    ("vision_embed", None),
)

DEFAULT_RULES: Rules = DIT_RULES

RULES_BY_SUBMODEL: dict[str, Rules] = {
    "vlm": VLM_RULES,
    "dit": DIT_RULES,
    "head": DIT_RULES,
    "vae": VAE_RULES,
    "connector": CONNECTOR_RULES,
    "queries": CONNECTOR_RULES,
}


def default_rules_config() -> dict[str, list[list[Any]]]:
    """`config.sharding.rules`'s default: every table of `RULES_BY_SUBMODEL` as a list of
    `[logical axis, mesh axes]` pairs (plain values: the config is saved as JSON)."""
    return {
        name: [[axis, list(mesh) if isinstance(mesh, tuple) else mesh] for axis, mesh in table]
        for name, table in RULES_BY_SUBMODEL.items()
    }


def rules_from_config(config) -> dict[str, Rules]:
    """The rule tables of a run: `config.sharding.rules.<sub-model>` (each replaces that
    sub-model's table), `RULES_BY_SUBMODEL` for any sub-model it leaves out and for a
    config saved before the field existed. ValueError naming the field for an unknown
    sub-model, a malformed pair or an unknown mesh axis."""
    section = config.get("sharding") if hasattr(config, "get") else None
    given = (section.get("rules") if section is not None else None) or {}
    out = dict(RULES_BY_SUBMODEL)
    for name, pairs in dict(given).items():
        field = f"config field sharding.rules.{name}"
        if name not in RULES_BY_SUBMODEL:
            raise ValueError(f"{field}: unknown sub-model; known: {sorted(RULES_BY_SUBMODEL)}")
        table = []
        for pair in pairs:
            if isinstance(pair, str) or len(pair) != 2 or not isinstance(pair[0], str):
                raise ValueError(f"{field}: {pair!r} is not a (logical axis, mesh axes) pair")
            axis, mesh = pair
            axes = () if mesh is None else (mesh,) if isinstance(mesh, str) else tuple(mesh)
            unknown = [a for a in axes if a not in MESH_AXES]
            if unknown:
                raise ValueError(f"{field}: logical axis {axis!r} names mesh axes {unknown}; known: {MESH_AXES}")
            table.append((axis, None if mesh is None else mesh if isinstance(mesh, str) else axes))
        out[name] = tuple(table)
    return out


# ----------------------------------------------------------------------------- mesh


def mesh_shape_from_config(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves `{'data': -1, 'fsdp': 2, 'tensor': 1}` into a concrete shape.

    At most one axis may be -1 ("the rest of the devices"). Raises ValueError naming the
    `mesh.<axis>` field when the product does not match the device count.
    """
    sizes = {}
    for axis in MESH_AXES:
        if axis not in mesh_cfg:
            raise ValueError(f"config field mesh.{axis} is missing (expected an int, -1 for 'the rest')")
        value = int(mesh_cfg[axis])
        if value == 0 or value < -1:
            raise ValueError(f"config field mesh.{axis}={value}: must be a positive int or -1")
        sizes[axis] = value
    unknown = set(mesh_cfg) - set(MESH_AXES) - set(MESH_OPTIONS)
    if unknown:
        raise ValueError(f"config field mesh has unknown axes {sorted(unknown)}; known: {MESH_AXES + MESH_OPTIONS}")
    rest = [a for a, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise ValueError(f"config field mesh: only one axis may be -1, got {rest}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if num_devices % fixed:
            others = ", ".join(f"mesh.{a}={v}" for a, v in sizes.items() if v != -1)
            raise ValueError(
                f"config fields {others} take {fixed} devices, which does not divide the {num_devices} "
                f"available devices, so mesh.{rest[0]}=-1 cannot take the rest"
            )
        sizes[rest[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total > num_devices:
        big = max(sizes, key=lambda a: sizes[a])
        raise ValueError(
            f"config field mesh.{big}: the mesh {sizes} needs {total} devices but only {num_devices} exist"
        )
    # A mesh smaller than the device count is allowed (e.g. one device out of 8 in a test).
    return tuple(sizes[a] for a in MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """The `--mesh` flag of every tool: 'data=1,fsdp=-1,tensor=2' -> {'data': 1, 'fsdp': -1, 'tensor': 2};
    unnamed axes are 1, -1 is "the rest of the devices" (resolved by `mesh_shape_from_config`)."""
    out = {a: 1 for a in MESH_AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = (x.strip() for x in part.partition("="))
        if not eq or name not in MESH_AXES + MESH_OPTIONS:
            raise ValueError(
                f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES + MESH_OPTIONS}"
            )
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {text!r}: size of {name!r} is not an int (-1 for the rest)") from None
    return out


def num_slices(mesh_cfg: Mapping[str, int]) -> int:
    """`mesh.num_slices` (default 1), ValueError naming the field when it is not a positive int."""
    n = mesh_cfg.get("num_slices", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"config field mesh.num_slices={n!r}: must be a positive int")
    return n


def make_mesh(mesh_cfg: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `('data', 'fsdp', 'tensor')` mesh with Auto axis types.

    `mesh_cfg` is a mapping axis -> size (-1: the rest) or a shape tuple. With fewer mesh
    positions than devices, the first devices are used. With `mesh_cfg["num_slices"] > 1`
    the `data` axis spans the slices (data parallelism over DCN, `fsdp` and `tensor` inside
    each slice over ICI): `mesh_utils.create_hybrid_device_mesh`, which reads each device's
    `slice_index`.
    """
    devices = list(jax.devices() if devices is None else devices)
    slices = 1
    if isinstance(mesh_cfg, Mapping) or hasattr(mesh_cfg, "keys"):
        slices = num_slices(dict(mesh_cfg))
        shape = mesh_shape_from_config(dict(mesh_cfg), len(devices))
    else:
        shape = tuple(int(s) for s in mesh_cfg)
        if len(shape) != len(MESH_AXES):
            raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
        shape = mesh_shape_from_config(dict(zip(MESH_AXES, shape)), len(devices))
    n = math.prod(shape)
    if slices > 1:
        if shape[0] % slices or n != len(devices):
            raise ValueError(
                f"config field mesh.num_slices={slices}: the data axis ({shape[0]}) must be a multiple of it "
                f"and the mesh {dict(zip(MESH_AXES, shape))} must use all {len(devices)} devices"
            )
        ici = (shape[0] // slices, *shape[1:])
        device_array = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
        return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    try:
        # Topology-aware device order when the whole device set is used (TPU ICI rings).
        if n == len(devices):
            device_array = mesh_utils.create_device_mesh(shape, devices)
        else:
            raise ValueError
    except Exception:  # noqa: BLE001 - CPU / subsets: plain order
        device_array = np.asarray(devices[:n], dtype=object).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# -------------------------------------------------------------------- logical -> mesh


def rules_for_path(
    path: Sequence[str], rules_by_submodel: Mapping[str, Rules] | None = None, default: Rules = DEFAULT_RULES
) -> Rules:
    """The rule table for a parameter path: chosen by the first path key that names a sub-model."""
    table = RULES_BY_SUBMODEL if rules_by_submodel is None else rules_by_submodel
    for key in path:
        if key in table:
            return table[key]
    return default


def _is_spec_leaf(x) -> bool:
    return x is None or isinstance(x, P) or isinstance(x, nn.Partitioned)


def logical_specs(boxed_tree) -> Any:
    """Logical PartitionSpecs of a tree of `nn.Partitioned` boxes (None-free: unboxed leaves get P())."""
    return nn.get_partition_spec(boxed_tree)


def logical_to_mesh_spec(
    logical: P, rules: Rules, mesh: Mesh, shape: Sequence[int] | None = None, where: str = ""
) -> P:
    """Maps one logical spec to a mesh spec, dropping mesh axes of size 1 and checking divisibility."""
    names = tuple(logical)
    # Required names resolved together by flax (a mesh axis claimed twice goes by rule
    # order); optional ones on their own, and they only get what is left (below).
    required = tuple(None if n in OPTIONAL_AXES else n for n in names)
    spec = tuple(nn.logical_to_mesh_axes(required, rules))
    spec = tuple(nn.logical_to_mesh_axes((n,), rules)[0] if n in OPTIONAL_AXES else a for n, a in zip(names, spec))
    out: list[Any] = [None] * len(names)
    used: set[str] = set()
    # Required axes first, then the optional ones with the mesh axes left over.
    order = sorted(range(len(names)), key=lambda d: names[d] in OPTIONAL_AXES)
    for dim in order:
        name, axes = names[dim], spec[dim]
        if axes is None:
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if mesh.shape[a] > 1 and a not in used)
        if not axes_t:
            continue
        if shape is not None:
            size = math.prod(mesh.shape[a] for a in axes_t)
            if shape[dim] % size:
                if name in OPTIONAL_AXES:
                    continue
                raise ValueError(
                    f"parameter {where or '?'}: dimension {dim} (logical axis '{name}', size {shape[dim]}) "
                    f"is not divisible by mesh axes {axes_t} of size {size}; change the model width or "
                    f"the mesh (config field mesh.{axes_t[0]})"
                )
        used.update(axes_t)
        out[dim] = axes_t[0] if len(axes_t) == 1 else axes_t
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def tree_shardings(
    abstract_tree, logical_tree, mesh: Mesh, rules_by_submodel: Mapping[str, Rules] | None = None
) -> Any:
    """NamedShardings for a tree given its shapes and logical specs (path-dependent rule tables)."""

    def one(path, leaf, logical):
        keys = path_keys(path)
        rules = rules_for_path(keys, rules_by_submodel)
        logical = P() if logical is None else logical
        shape = getattr(leaf, "shape", ())
        if len(tuple(logical)) > len(shape):
            raise ValueError(f"parameter {'/'.join(keys)}: logical spec {logical} has more axes than shape {shape}")
        return NamedSharding(mesh, logical_to_mesh_spec(logical, rules, mesh, shape, "/".join(keys)))

    logical_tree = jax.tree.map(lambda s: s, logical_tree, is_leaf=_is_spec_leaf)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf, spec: one(path, leaf, spec), abstract_tree, logical_tree, is_leaf=lambda x: x is None
    )


def activation_rules(extra: Rules = ()) -> Rules:
    """Rules active while tracing a step: activation axes plus the default parameter axes."""
    return tuple(extra) + ACTIVATION_RULES + DEFAULT_RULES


def activation_rules_context(extra: Rules = ()):
    """`with activation_rules_context():` while tracing a step, so `act_*` constraints apply."""
    return nn.logical_axis_rules(activation_rules(extra))


# ----------------------------------------------------------------- sharded init


def abstract_init(init_fn: Callable[..., Any], *args) -> tuple[Any, Any]:
    """Shapes and logical specs of `init_fn(*args)` without allocating anything.

    Returns `(abstract_tree, logical_spec_tree)` where the abstract tree holds unboxed
    `jax.ShapeDtypeStruct`s.
    """
    boxed = jax.eval_shape(init_fn, *args)
    specs = logical_specs(boxed)
    return unbox_abstract(boxed), specs


def unbox_abstract(boxed) -> Any:
    """Unboxes leaves without the sharding constraint `Partitioned.unbox` would apply under
    an active mesh (a constraint cannot run on a ShapeDtypeStruct, and inside a jitted
    init the out_shardings already say where each leaf goes)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
        boxed,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def init_sharded(
    init_fn: Callable[..., Any], mesh: Mesh, *args, rules_by_submodel: Mapping[str, Rules] | None = None
) -> tuple[Any, Any, Any]:
    """Initialises parameters directly sharded on `mesh`.

    The tree is first traced abstractly (`jax.eval_shape`), its logical specs mapped to
    NamedShardings, then `init_fn` is jitted with those `out_shardings`: every device
    materialises only its own shard, so no full replicated copy ever exists on one device.

    Args:
      init_fn: `(*args) -> boxed tree` (e.g. `lambda rng: model.init(rng, x)`).
      mesh: the device mesh.
    Returns:
      `(params, shardings, logical_specs)` with plain (unboxed) arrays.
    """
    abstract, specs = abstract_init(init_fn, *args)
    shardings = tree_shardings(abstract, specs, mesh, rules_by_submodel)

    def unboxed_init(*a):
        # Placement comes from out_shardings; no per-leaf constraints inside the init.
        return unbox_abstract(init_fn(*a))

    with jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules()):
        params = jax.jit(unboxed_init, out_shardings=shardings)(*args)
    return params, shardings, specs


def abstract_with_shardings(abstract_tree, shardings) -> Any:
    """ShapeDtypeStructs carrying the given shardings (restore targets, AOT arguments)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


# ----------------------------------------------------------------- batches


def batch_axes(mesh: Mesh, rows: int | None = None):
    """The spec entry of a batch dimension: ('data', 'fsdp') without their size-1 axes
    (None on a mesh without data parallelism), or None when `rows` does not divide."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    if not axes or (rows is not None and rows % math.prod(mesh.shape[a] for a in axes)):
        return None
    return axes[0] if len(axes) == 1 else axes


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension over ('data', 'fsdp'); the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))) if ndim else P())


def place_batch(batch, mesh: Mesh):
    """Places a host-local batch (a tree of numpy arrays) on the mesh, split along the batch dim.

    Each process passes only its own slice of the global batch (its `process_index`-th
    part); `jax.make_array_from_process_local_data` assembles the global array, so the
    same call works on one host and on a multi-host pod. Scalars are replicated.
    """

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        sharding = batch_sharding(mesh, x.ndim)
        n_shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % n_shards:
            raise ValueError(
                f"global batch of {global_rows} rows is not divisible by the data-parallel mesh size "
                f"{n_shards} (mesh.data x mesh.fsdp); change config field train.batch_size"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, batch)


# ----------------------------------------------------------------- reporting


def format_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: '24.61 GiB', '512.00 KiB', '12 B'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def bytes_per_device(leaf) -> int:
    """Bytes of one device's shard of an array (or ShapeDtypeStruct with a sharding)."""
    shape = tuple(leaf.shape)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and hasattr(sharding, "shard_shape"):
        shape = sharding.shard_shape(shape)
    return int(math.prod(shape)) * jnp.dtype(leaf.dtype).itemsize


def sharding_table(tree, max_rows: int | None = None) -> str:
    """A human-readable table: path, shape, dtype, partition spec, bytes per device."""
    rows = []
    total_dev = 0
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = getattr(leaf, "sharding", None)
        spec = getattr(sharding, "spec", None)
        b_dev = bytes_per_device(leaf)
        total_dev += b_dev
        total += int(math.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        rows.append(
            (
                path_str(path),
                str(tuple(leaf.shape)),
                str(jnp.dtype(leaf.dtype)),
                str(tuple(spec)) if spec is not None else "-",
                format_bytes(b_dev),
            )
        )
    header = ("path", "shape", "dtype", "spec", "bytes/device")
    shown = rows if max_rows is None or len(rows) <= max_rows else rows[:max_rows]
    widths = [max(len(h), *(len(r[i]) for r in shown)) if shown else len(h) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    out = [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in shown]
    if len(shown) < len(rows):
        out.append(f"... {len(rows) - len(shown)} more rows")
    out.append(f"{len(rows)} arrays, {format_bytes(total)} in all, {format_bytes(total_dev)} per device")
    return "\n".join(out)
