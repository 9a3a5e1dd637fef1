"""Streaming safetensors folders in and out (never pickle).

A HF / diffusers folder holds either one `model.safetensors` (or
`diffusion_pytorch_model.safetensors`) or shards listed by a `*.safetensors.index.json`.
`iter_tensors` yields one tensor at a time as numpy; `write_sharded` writes shards of at
most `max_shard_bytes` plus the index, atomically (a temporary folder renamed into place),
so a crash never leaves a half-written folder that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from etils import epath
from safetensors import safe_open
from safetensors.numpy import save_file

from qk_jax.convert.mapping import Mapping
from qk_jax.tree import unflatten_tree

WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


class DestinationError(ValueError):
    """An output folder that holds something other than a model folder (the message names it)."""


def check_destination(folder: str | os.PathLike, flag: str = "--to-hf") -> None:
    """Refuses an existing output folder that is not an earlier export: an export replaces its
    folder whole, so anything in it that no export writes (a subfolder, as a pipeline folder or
    a folder of models has; a README, `.gitattributes` or `generation_config.json` of a
    downloaded model) would be lost. An empty folder, or one holding only what an export writes
    (`config.json`, safetensors and their index, the processor files), may be replaced."""
    from qk_jax.data.vlm_inputs import PROCESSOR_FILES

    folder = os.fspath(folder)
    if not os.path.exists(folder):
        return
    if not os.path.isdir(folder):
        raise DestinationError(f"{flag} {folder} is a file")
    exported = {"config.json", *PROCESSOR_FILES}
    entries = [e + "/" if os.path.isdir(os.path.join(folder, e)) else e for e in sorted(os.listdir(folder))]
    foreign = [e for e in entries if not (e in exported or e.endswith((".safetensors", ".safetensors.index.json")))]
    if foreign:
        raise DestinationError(
            f"{flag} {folder} already holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, which no export "
            "writes: an export replaces its folder whole, so give it a new folder, or the folder of an earlier export"
        )


def safetensors_files(folder: str | os.PathLike) -> list[epath.Path]:
    """The safetensors files of a checkpoint folder, in index order.

    Raises FileNotFoundError naming the folder when there are none (e.g. a folder that
    only holds a PyTorch pickle, which qk_jax refuses to read).
    """
    folder = epath.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = json.loads(indexes[0].read_text())
        files = []
        for f in index["weight_map"].values():
            if f not in files:
                files.append(f)
        paths = [folder / f for f in files]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{indexes[0]} lists shards that are missing: {missing}")
        return paths
    for name in WEIGHT_NAMES:
        if (folder / name).exists():
            return [folder / name]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {folder} (qk_jax reads safetensors only; convert pickles first)"
        )
    return files


class CorruptCheckpointError(ValueError):
    """A safetensors file that cannot be read (truncated, not safetensors); names the file."""


def open_safetensors(path) -> Any:
    """`safe_open(path)` (numpy), raising CorruptCheckpointError naming the file when it is unreadable."""
    try:
        return safe_open(os.fspath(path), framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e


def tensor_names(folder) -> list[str]:
    names = []
    for path in safetensors_files(folder):
        with open_safetensors(path) as f:
            names.extend(f.keys())
    return names


def tensor_shapes(folder) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in safetensors_files(folder):
        with open_safetensors(path) as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


# safetensors dtypes numpy lacks (the numpy backend of `safe_open` refuses them): read
# the bytes ourselves and view them through ml_dtypes (a jax dependency).
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_raw(path: str, name: str) -> np.ndarray:
    """One tensor of a safetensors file read from its header offsets (for ml_dtypes dtypes)."""
    import ml_dtypes

    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_len))[name]
        if info["dtype"] not in _ML_DTYPES:
            raise TypeError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        f.seek(8 + header_len + start)
        data = f.read(end - start)
    dtype = np.dtype(getattr(ml_dtypes, _ML_DTYPES[info["dtype"]]))
    return np.frombuffer(data, dtype=dtype).reshape(info["shape"]).copy()


def iter_tensors(folder) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(name, numpy array)` one tensor at a time, file by file.

    bfloat16 / float8 tensors come back as `ml_dtypes` arrays (numpy has no such dtypes).
    """
    for path in safetensors_files(folder):
        with open_safetensors(path) as f:
            for k in f.keys():
                try:
                    value = f.get_tensor(k)
                except TypeError:
                    value = _read_raw(os.fspath(path), k)
                yield k, value


def load_params(
    folder, mapping: Mapping, dtype: Any = None, shardings: Any = None, strict: bool = True
) -> dict[str, Any]:
    """Reads a safetensors folder into a nested parameter tree through `mapping`.

    Each parameter is converted to `dtype` as it streams in and, when `shardings` (a
    nested tree of `jax.sharding.Sharding` matching the parameter tree) is given, placed
    on its devices at once so the host never holds the whole tree in float32.
    """
    flat_shardings = None
    if shardings is not None:
        from qk_jax.tree import flatten_tree

        flat_shardings = flatten_tree(shardings)
    flat = {}
    for path, value in mapping.to_jax(iter_tensors_grouped(folder, mapping), dtype=dtype, strict=strict):
        if flat_shardings is not None:
            if path not in flat_shardings:
                raise KeyError(f"parameter {path!r} from {folder} is not in the model's parameter tree")
            value = jax.device_put(value, flat_shardings[path])
        flat[path] = value
    return unflatten_tree(flat)


def iter_tensors_grouped(folder, mapping: Mapping) -> Iterator[tuple[str, np.ndarray]]:
    """`iter_tensors` in the order of the JAX parameters the tensors map to (random access
    across files), so that all slices of one stacked (scanned) parameter arrive together:
    `Mapping.to_jax` then holds at most one partly filled stacked parameter at a time,
    instead of every layer stack at once (files list tensors layer by layer)."""
    where: dict[str, epath.Path] = {}
    for path in safetensors_files(folder):
        with open_safetensors(path) as f:
            for k in f.keys():
                where[k] = path

    def key(name):
        if mapping.rule_for_hf(name) is None:
            return ("", ())
        path, index, _ = mapping.jax_path(name)
        return (path, index)

    with contextlib.ExitStack() as stack:
        handles = {}
        for name in sorted(where, key=key):
            path = where[name]
            if path not in handles:
                handles[path] = stack.enter_context(open_safetensors(path))
            try:
                value = handles[path].get_tensor(name)
            except TypeError:
                value = _read_raw(os.fspath(path), name)
            yield name, value


def _np_for_save(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x))


def write_sharded(
    folder,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int = 4 << 30,
    weights_name: str = "model.safetensors",
    metadata: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> list[str]:
    """Writes tensors as safetensors shards (+ index when more than one) into `folder`.

    The folder is written under a temporary name next to it and renamed at the end;
    an existing folder is replaced only after the new one is complete, and only when it is
    empty or a model folder (`check_destination`). `extra_files`
    (name -> text, e.g. config.json) are written alongside.
    Returns the list of shard file names.
    """
    folder = os.fspath(folder)
    check_destination(folder, flag="output folder")
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=parent)
    stem = weights_name[: -len(".safetensors")]
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    # Shards are flushed to disk as they fill so only one shard is held in memory.
    written: list[tuple[str, list[str]]] = []
    n_written = 0

    def flush():
        nonlocal n_written
        if not shards[-1]:
            return
        n_written += 1
        name = f"{stem}-{n_written:05d}.safetensors"
        save_file(shards[-1], os.path.join(tmp, name), metadata=metadata or {"format": "pt"})
        written.append((name, list(shards[-1])))
        shards[-1] = {}
        sizes[-1] = 0

    try:
        for name, value in tensors:
            value = _np_for_save(value)
            if sizes[-1] and sizes[-1] + value.nbytes > max_shard_bytes:
                flush()
            shards[-1][name] = value
            sizes[-1] += value.nbytes
        flush()
        files = []
        if len(written) == 1:
            os.rename(os.path.join(tmp, written[0][0]), os.path.join(tmp, weights_name))
            files = [weights_name]
        else:
            weight_map = {}
            total = len(written)
            for i, (name, keys) in enumerate(written):
                final = f"{stem}-{i + 1:05d}-of-{total:05d}.safetensors"
                os.rename(os.path.join(tmp, name), os.path.join(tmp, final))
                files.append(final)
                for k in keys:
                    weight_map[k] = final
            total_size = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
            with open(os.path.join(tmp, weights_name + ".index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        if os.path.exists(folder):
            backup = tmp + ".replaced"  # unique, as `tmp` is: no folder of the user's is in the way
            os.rename(folder, backup)
            os.rename(tmp, folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, folder)
        return files
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_params(
    folder,
    params,
    mapping: Mapping,
    *,
    dtype: Any = None,
    hf_shapes=None,
    weights_name: str = "model.safetensors",
    extra_files: dict[str, str] | None = None,
    max_shard_bytes: int = 4 << 30,
    host_fetch: Callable[[Any], np.ndarray] | None = None,
) -> list[str]:
    """Exports a parameter tree to a safetensors folder through `mapping` (streamed)."""
    fetch = host_fetch or (lambda x: np.asarray(jax.device_get(x)))
    from qk_jax.tree import flatten_tree

    flat = {k: _LazyArray(v, fetch) for k, v in flatten_tree(params).items()}
    return write_sharded(
        folder,
        mapping.to_hf(flat, hf_shapes=hf_shapes, dtype=dtype),
        weights_name=weights_name,
        extra_files=extra_files,
        max_shard_bytes=max_shard_bytes,
    )


class _LazyArray:
    """Fetches a device array to host only when the exporter reaches it."""

    def __init__(self, value, fetch):
        self._value, self._fetch = value, fetch
        self.shape = value.shape

    def __array__(self, dtype=None, copy=None):
        out = self._fetch(self._value)
        return out if dtype is None else out.astype(dtype)
