"""One declarative mapping per model drives conversion in both directions.

A mapping is a list of `Rule`s. Each rule names HF tensors by a pattern such as
`model.layers.{i}.self_attn.q_proj.weight` and a parameter path such as
`decoder/layers/attn/q_proj/kernel`, plus a reversible `Transform` (transpose, conv
permutation, reshape, ...). Placeholders are integers:

- a placeholder that also appears in the JAX path (`blocks_{i}/...`) indexes separate
  parameters (unrolled layers);
- a placeholder listed in `Rule.stack` is *stacked* along axis 0 of one JAX parameter,
  the layout `nn.scan` uses.

`Mapping.to_jax` consumes HF tensors one at a time (see `convert/safetensors_io.py`) and
emits each JAX parameter as soon as it is complete, so a 7B checkpoint never needs two
float32 copies in memory; `Mapping.to_hf` walks a parameter tree and yields HF tensors.
`Mapping.check_coverage` proves that every HF tensor and every JAX parameter is mapped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Mapping as TMapping
from typing import Any

import numpy as np

from qk_jax.tree import flatten_tree

# ----------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class Transform:
    """A reversible array transform: `to_jax(hf_array)`, `to_hf(jax_array)`.

    `to_jax` may need the target shape for reshapes; both get it as a keyword (`shape`)
    when a transform declares `needs_shape`.
    """

    name: str
    to_jax: Callable[..., np.ndarray]
    to_hf: Callable[..., np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch Linear weight (out, in) <-> kernel (in, out)
TRANSPOSE = Transform("transpose", lambda x: np.ascontiguousarray(x.T), lambda x: np.ascontiguousarray(x.T))
# Conv weights: torch (O, I, *spatial) <-> flax (*spatial, I, O)
CONV = Transform(
    "conv",
    lambda x: np.ascontiguousarray(np.transpose(x, tuple(range(2, x.ndim)) + (1, 0))),
    lambda x: np.ascontiguousarray(np.transpose(x, (x.ndim - 1, x.ndim - 2) + tuple(range(x.ndim - 2)))),
)


def reshape(
    jax_shape_fn: Callable[[tuple[int, ...]], tuple[int, ...]], name: str = "reshape", then: Transform = IDENTITY
) -> Transform:
    """`then`, followed by a reshape computed from the transformed shape (and back)."""

    def fwd(x):
        y = then.to_jax(x)
        return y.reshape(jax_shape_fn(y.shape))

    def bwd(y, hf_shape=None):
        if hf_shape is None:
            raise ValueError(f"transform {name} needs the HF shape to invert")
        inter = then.to_jax(np.empty(hf_shape, dtype=np.uint8)).shape
        return then.to_hf(y.reshape(inter))

    return Transform(name, fwd, bwd)


def squeeze_transform(axis: int) -> Transform:
    """HF has a leading singleton axis that the JAX parameter lacks, or vice versa."""
    return Transform(f"squeeze{axis}", lambda x: np.squeeze(x, axis), lambda y: np.expand_dims(y, axis))


# -------------------------------------------------------------------------- rules

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = []
    last = 0
    for m in _PLACEHOLDER.finditer(pattern):
        parts.append(re.escape(pattern[last : m.start()]))
        parts.append(f"(?P<{m.group(1)}>\\d+)")
        last = m.end()
    parts.append(re.escape(pattern[last:]))
    return re.compile("^" + "".join(parts) + "$")


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensor pattern <-> JAX parameter path pattern, with a transform.

    Attributes:
      hf: HF tensor name pattern, e.g. "model.layers.{i}.mlp.up_proj.weight".
      jax: '/'-separated parameter path pattern, e.g. "decoder/layers/mlp/up/kernel".
      transform: applied per HF tensor (before stacking).
      stack: placeholders stacked along leading JAX axes (outermost first), e.g. ("i",).
      stack_size: for each stacked placeholder, the config-derived count (needed to
        allocate the stacked array and to export); a callable of the mapping's config.
    """

    hf: str
    jax: str
    transform: Transform = IDENTITY
    stack: tuple[str, ...] = ()

    @property
    def hf_regex(self) -> re.Pattern:
        return _pattern_regex(self.hf)

    @property
    def jax_regex(self) -> re.Pattern:
        return _pattern_regex(self.jax)

    def match_hf(self, name: str) -> dict[str, int] | None:
        m = self.hf_regex.match(name)
        return None if m is None else {k: int(v) for k, v in m.groupdict().items()}

    def match_jax(self, path: str) -> dict[str, int] | None:
        m = self.jax_regex.match(path)
        return None if m is None else {k: int(v) for k, v in m.groupdict().items()}


def _fill(pattern: str, values: TMapping[str, int]) -> str:
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), pattern)


class MappingError(ValueError):
    """A tensor or parameter that the mapping cannot place (named in the message)."""


class Mapping:
    """An ordered list of rules plus the sizes of stacked placeholders.

    Args:
      rules: the rules; the first rule matching a name wins.
      stack_sizes: placeholder -> count for stacked placeholders (e.g. {"i": num_layers}).
      ignore_hf: regexes of HF tensors that are deliberately not converted (e.g. buffers
        such as rotary `inv_freq`), each documented where the mapping is defined.
    """

    def __init__(
        self, rules: Sequence[Rule], stack_sizes: TMapping[str, int] | None = None, ignore_hf: Sequence[str] = ()
    ):
        self.rules = list(rules)
        self.stack_sizes = dict(stack_sizes or {})
        self.ignore_hf = [re.compile(p) for p in ignore_hf]

    # ---------------------------------------------------------------- lookup

    def rule_for_hf(self, name: str) -> tuple[Rule, dict[str, int]] | None:
        for rule in self.rules:
            values = rule.match_hf(name)
            if values is not None:
                return rule, values
        return None

    def rule_for_jax(self, path: str) -> tuple[Rule, dict[str, int]] | None:
        for rule in self.rules:
            values = rule.match_jax(path)
            if values is not None:
                return rule, values
        return None

    def is_ignored(self, name: str) -> bool:
        return any(p.search(name) for p in self.ignore_hf)

    def jax_path(self, hf_name: str) -> tuple[str, tuple[int, ...], Rule]:
        """The JAX path of an HF tensor and its index into the stacked axes."""
        found = self.rule_for_hf(hf_name)
        if found is None:
            raise MappingError(f"HF tensor {hf_name!r} matches no rule of the mapping")
        rule, values = found
        index = tuple(values[s] for s in rule.stack)
        return _fill(rule.jax, values), index, rule

    # ---------------------------------------------------------------- HF -> JAX

    def to_jax(
        self, tensors: Iterable[tuple[str, np.ndarray]], dtype: Any = None, strict: bool = True
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Streams `(hf_name, array)` into `(jax_path, array)` pairs.

        A stacked parameter is emitted once all its slices arrived. With `strict`, a
        tensor that matches no rule (and is not ignored) raises `MappingError` naming it,
        and so does a stacked parameter missing slices at the end.
        """
        pending: dict[str, tuple[np.ndarray, set]] = {}
        for name, array in tensors:
            if self.rule_for_hf(name) is None:
                if self.is_ignored(name) or not strict:
                    continue
                raise MappingError(f"HF tensor {name!r} matches no rule of the mapping")
            path, index, rule = self.jax_path(name)
            value = rule.transform.to_jax(np.asarray(array))
            if dtype is not None:
                value = value.astype(dtype)
            if not rule.stack:
                yield path, value
                continue
            sizes = tuple(self._stack_size(s, rule) for s in rule.stack)
            if path not in pending:
                pending[path] = (np.zeros(sizes + value.shape, dtype=value.dtype), set())
            buf, seen = pending[path]
            if buf.shape[len(sizes) :] != value.shape:
                raise MappingError(
                    f"HF tensor {name!r} has shape {value.shape} after transform, expected "
                    f"{buf.shape[len(sizes) :]} like its other layers"
                )
            buf[index] = value
            seen.add(index)
            if len(seen) == int(np.prod(sizes)):
                del pending[path]
                yield path, buf
        if pending and strict:
            path, (buf, seen) = next(iter(pending.items()))
            n_stack = len(next(iter(seen)))
            raise MappingError(
                f"parameter {path!r} got {len(seen)} of {int(np.prod(buf.shape[:n_stack]))} "
                f"stacked slices: the checkpoint is missing layers"
            )

    def _stack_size(self, placeholder: str, rule: Rule) -> int:
        if placeholder not in self.stack_sizes:
            raise MappingError(f"rule {rule.hf!r} stacks over {{{placeholder}}} but the mapping has no size for it")
        return self.stack_sizes[placeholder]

    # ---------------------------------------------------------------- JAX -> HF

    def to_hf(
        self, params: TMapping[str, Any], hf_shapes: TMapping[str, tuple[int, ...]] | None = None, dtype: Any = None
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Streams a (nested or flat) parameter tree into `(hf_name, array)` pairs.

        `hf_shapes` is only needed for transforms that cannot be inverted from the JAX
        shape alone (reshapes); mappings usually do without.
        """
        flat = (
            params
            if all(isinstance(v, np.ndarray) or hasattr(v, "shape") for v in params.values())
            else flatten_tree(params)
        )
        for path, value in flat.items():
            found = self.rule_for_jax(path)
            if found is None:
                raise MappingError(f"parameter {path!r} matches no rule of the mapping")
            rule, values = found
            value = np.asarray(value)
            if dtype is not None:
                value = value.astype(dtype)
            if not rule.stack:
                yield _fill(rule.hf, values), self._inv(rule, value, _fill(rule.hf, values), hf_shapes)
                continue
            sizes = value.shape[: len(rule.stack)]
            for index in np.ndindex(*sizes):
                names = dict(values, **dict(zip(rule.stack, index)))
                name = _fill(rule.hf, names)
                yield name, self._inv(rule, value[index], name, hf_shapes)

    @staticmethod
    def _inv(rule: Rule, value: np.ndarray, name: str, hf_shapes) -> np.ndarray:
        try:
            return np.ascontiguousarray(rule.transform.to_hf(value))
        except TypeError:
            shape = None if hf_shapes is None else hf_shapes.get(name)
            return np.ascontiguousarray(rule.transform.to_hf(value, hf_shape=shape))

    # ---------------------------------------------------------------- coverage

    def check_coverage(self, hf_names: Iterable[str], jax_paths: Iterable[str]) -> None:
        """Raises MappingError unless the mapping is a bijection between the two name sets.

        Every HF name must map (or be explicitly ignored); every JAX path must be produced
        by some HF name; no two HF names may land on the same (path, stack index).
        """
        hf_names = list(hf_names)
        jax_paths = set(jax_paths)
        produced: dict[tuple[str, tuple[int, ...]], str] = {}
        unmapped = []
        for name in hf_names:
            if self.rule_for_hf(name) is None:
                if not self.is_ignored(name):
                    unmapped.append(name)
                continue
            path, index, _ = self.jax_path(name)
            key = (path, index)
            if key in produced:
                raise MappingError(f"HF tensors {produced[key]!r} and {name!r} both map to {path}{list(index)}")
            produced[key] = name
        if unmapped:
            raise MappingError(f"{len(unmapped)} HF tensors match no rule, e.g. {unmapped[:5]}")
        got = {p for p, _ in produced}
        missing = sorted(jax_paths - got)
        extra = sorted(got - jax_paths)
        if missing:
            raise MappingError(f"{len(missing)} JAX parameters are produced by no HF tensor, e.g. {missing[:5]}")
        if extra:
            raise MappingError(f"{len(extra)} HF tensors map to paths absent from the model, e.g. {extra[:5]}")
        # Round-trip names: every JAX path maps back to HF names that exist.
        hf_set = set(hf_names)
        for path in jax_paths:
            rule, values = self.rule_for_jax(path) or (None, None)
            if rule is None:
                raise MappingError(f"parameter {path!r} matches no rule in the JAX->HF direction")
            if not rule.stack:
                name = _fill(rule.hf, values)
                if name not in hf_set:
                    raise MappingError(f"parameter {path!r} exports to {name!r}, which the HF model lacks")
