"""The count type (`MatmulFlops`), its accumulator, and counting the products of a traced
function (`traced_matmul_flops`), the exact cross-check of the analytic counts."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
from jax.extend import core as jcore


@dataclasses.dataclass(frozen=True)
class MatmulFlops:
    """Forward matmul FLOPs of one model part, term by term.

    kernels: parameter path (relative to the part's module, e.g.
      `language_model/layers/self_attn/q_proj/kernel`) -> FLOPs of the products that use
      that weight (summed over stacked layers).
    pairs: name -> FLOPs of products whose two operands are both computed (attention
      QK^T and AV; the LoRA factors a @ b): their backward needs two products.
    `int(f)`, `float(f)` and `f.total` give the sum; parts add with `+`.
    """

    kernels: Mapping[str, int] = dataclasses.field(default_factory=dict)
    pairs: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def weights(self) -> int:
        return sum(self.kernels.values())

    @property
    def pair_total(self) -> int:
        return sum(self.pairs.values())

    @property
    def total(self) -> int:
        return self.weights + self.pair_total

    def select(self, patterns: str | Iterable[str]) -> int:
        """FLOPs of the kernels whose path matches any of the regexes (`re.search`)."""
        regexes = [re.compile(p) for p in ([patterns] if isinstance(patterns, str) else patterns)]
        return sum(v for k, v in self.kernels.items() if any(r.search(k) for r in regexes))

    def __add__(self, other: MatmulFlops) -> MatmulFlops:
        if isinstance(other, int) and other == 0:  # sum([...]) starts at 0
            return self
        if not isinstance(other, MatmulFlops):
            return NotImplemented
        merge = lambda a, b: {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}
        return MatmulFlops(merge(self.kernels, other.kernels), merge(self.pairs, other.pairs))

    __radd__ = __add__

    def __int__(self) -> int:
        return self.total

    def __float__(self) -> float:
        return float(self.total)


class _Counter:
    """Accumulates products into a `MatmulFlops`."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.kernels: dict[str, int] = {}
        self.pairs: dict[str, int] = {}

    def dense(self, path: str, rows: int, d_in: int, d_out: int) -> None:
        """`rows` rows through a (d_in, d_out) kernel at `path` (no `/kernel` suffix)."""
        key = f"{self.prefix}{path}/kernel"
        self.kernels[key] = self.kernels.get(key, 0) + 2 * int(rows) * int(d_in) * int(d_out)

    def pair(self, name: str, flops: int) -> None:
        key = self.prefix + name
        self.pairs[key] = self.pairs.get(key, 0) + int(flops)

    def attention(self, name: str, batch: int, s_q: int, s_k: int, width: int) -> None:
        """QK^T and AV over the full (s_q, s_k) score matrix; width = heads * head_dim."""
        self.pair(name, 4 * batch * s_q * s_k * width)

    def conv(
        self,
        path: str,
        b: int,
        h: int,
        w: int,
        c_in: int,
        c_out: int,
        k: int = 3,
        stride: int = 1,
        pad: tuple[int, int] | None = None,
    ) -> tuple[int, int]:
        """A k x k conv on (b, h, w, c_in) with the same padding on both spatial axes; returns (h, w) out."""
        pad = (k // 2, k // 2) if pad is None else pad
        (h_out, taps_h), (w_out, taps_w) = (_conv_taps(n, k, stride, pad) for n in (h, w))
        key = f"{self.prefix}{path}/kernel"
        self.kernels[key] = self.kernels.get(key, 0) + 2 * b * taps_h * taps_w * c_in * c_out
        return h_out, w_out

    def result(self) -> MatmulFlops:
        return MatmulFlops(dict(self.kernels), dict(self.pairs))


def _conv_taps(
    size: int, k: int, stride: int, pad: tuple[int, int], lhs_dilation: int = 1, rhs_dilation: int = 1
) -> tuple[int, int]:
    """(output size, number of (output, tap) pairs that read a real input element) on one axis."""
    span = (size - 1) * lhs_dilation + 1
    out = (span + pad[0] + pad[1] - ((k - 1) * rhs_dilation + 1)) // stride + 1
    valid = 0
    for o in range(max(out, 0)):
        for t in range(k):
            pos = o * stride + t * rhs_dilation - pad[0]
            valid += 0 <= pos < span and pos % lhs_dilation == 0
    return out, valid


def _positive(**values: float) -> None:
    for name, v in values.items():
        if v <= 0:  # not int(v): a step of 0.5 s is positive
            raise ValueError(f"flops: {name} must be positive, got {v}")


# ----------------------------------------------------------------------- from a trace


def traced_matmul_flops(fn: Callable, *args, **kwargs) -> int:
    """2*M*N*K of every `dot_general` and conv in `jax.make_jaxpr(fn)(*args, **kwargs)`.

    Scans count `length` times their body; `cond` its costliest branch; a `while` loop
    (trip count unknown) its body once, with a warning. Convs count the taps that read
    real input, as XLA does. Arguments may be arrays or `jax.ShapeDtypeStruct`s.
    """
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def _jaxpr_flops(jaxpr: Any) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(_jaxpr_flops(br.jaxpr) for br in eqn.params["branches"])
        else:
            if name == "while":
                warnings.warn(
                    "traced_matmul_flops: a while loop's body is counted once (unknown trip count)", stacklevel=2
                )
            for sub in jcore.jaxprs_in_params(eqn.params):
                total += _jaxpr_flops(getattr(sub, "jaxpr", sub))
    return total


def _dot_flops(eqn: Any) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    free = 1
    for i, n in enumerate(rhs):
        if i not in rhs_contract and i not in rhs_batch:
            free *= n
    size = 1
    for n in lhs:
        size *= n
    return 2 * size * free


def _conv_flops(eqn: Any) -> int:
    p = eqn.params
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec = dn.lhs_spec, dn.rhs_spec
    flops = 2 * lhs[lhs_spec[0]] // p["batch_group_count"] * rhs[rhs_spec[0]] * rhs[rhs_spec[1]]
    for i in range(len(lhs_spec) - 2):
        _, valid = _conv_taps(
            lhs[lhs_spec[2 + i]],
            rhs[rhs_spec[2 + i]],
            p["window_strides"][i],
            p["padding"][i],
            (p["lhs_dilation"] or (1,) * 9)[i],
            (p["rhs_dilation"] or (1,) * 9)[i],
        )
        flops *= valid
    return flops
