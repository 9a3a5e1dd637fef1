"""What makes a checkpoint step good: checksums of its arrays, and which restore failures are
the step's own fault (incomplete, truncated, undecodable) rather than the machine's.

`checkpoint.Checkpointer` saves `tree_checksums` of every array item with each step and
verifies them on restore; a failure that `is_checkpoint_fault` calls the step's own sets the
step aside (`.corrupt`) and the next older one is tried, while an error of the environment
(no permission, out of memory, transient I/O) stops the run and discards nothing.
"""

from __future__ import annotations

import errno

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.tree import path_str

# Errors that say nothing about the checkpoint's bytes: the machine or the storage is
# (perhaps only for now) unable to read it. They stop the run instead of discarding a step.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
        errno.ECONNRESET,
        errno.ENOSPC,
    }
)
ENVIRONMENT_MARKERS = (
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "PERMISSION_DENIED",
    "Out of memory",
    "out of memory",
    "Permission denied",
)
# Exception types a damaged file raises on the way through Orbax / TensorStore / json.
FAULT_TYPES = (OSError, ValueError, KeyError, IndexError, TypeError, EOFError)


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a tree that does not fit its target (named in the message)."""


class CorruptCheckpointError(CheckpointError):
    """A step that is incomplete or unreadable, or whose arrays do not match their checksums."""


class NoGoodCheckpointError(CheckpointError):
    """Every step of a directory is incomplete or corrupt."""


class CheckpointMismatchError(CheckpointError):
    """A stored tree whose paths or shapes do not fit the restore target (named in the message)."""


class CheckpointSaveError(CheckpointError):
    """An (asynchronous) save that failed; the message names the step's path and the cause."""


def is_checkpoint_fault(error: BaseException) -> bool:
    """Whether a restore failure is a fault of the checkpoint itself (incomplete, truncated,
    undecodable, wrong checksum) rather than of the machine (out of memory, transient I/O)."""
    if isinstance(error, CorruptCheckpointError):
        return True
    if isinstance(error, MemoryError):
        return False
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
        return False
    if any(marker in str(error) for marker in ENVIRONMENT_MARKERS):
        return False
    return isinstance(error, FAULT_TYPES)


def first_line(error: BaseException, limit: int | None = 300) -> str:
    """'ValueError: DATA_LOSS: ...': an exception in one line (cut at `limit` characters)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:limit]}" if text else type(error).__name__


# ----------------------------------------------------------------------------- checksums

_HASH_MULTIPLIER = np.uint32(2654435761)  # Knuth's multiplicative constant
_HASH_OFFSET = np.uint32(0x9E3779B9)
_HASH_MIX = np.uint32(0x85EBCA6B)


def _as_uint32(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (1- and 2-byte types widened, 8-byte types split)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size < 4:
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis of itemsize // 4 words


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A position-weighted 32-bit hash of an array's bits: any changed word or any swap of
    two words changes it (with probability 1 - 2^-32). Integer sums wrap, so the result
    does not depend on how the array is sharded."""
    words = _as_uint32(jnp.asarray(x)).reshape(-1)
    index = jax.lax.iota(jnp.uint32, words.shape[0])
    mixed = (words ^ (words >> 15)) * _HASH_MIX
    return jnp.sum(mixed * (index * _HASH_MULTIPLIER + _HASH_OFFSET), dtype=jnp.uint32)


_tree_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def tree_checksums(tree) -> dict[str, int]:
    """{'a/b/kernel': hash} of every array leaf, computed where the arrays live."""
    flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    if not flat:
        return {}
    sums = jax.device_get(_tree_checksums_jit(flat))
    return {k: int(v) for k, v in sums.items()}
