"""The package's import structure, read from the source with `ast` (nothing is imported):
no import cycles between modules, `qk_jax.models` free of everything above it, and every
other module importing only from its own layer or the layers below (`LAYERS`).

An import inside a function counts like one at the top of a module: deferring an import
hides a cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "qk_jax"

# Layer of each top-level unit of qk_jax (a module or a subpackage), bottom first. A module
# may import its own layer and the layers below, never one above.
LAYERS: tuple[tuple[str, ...], ...] = (
    # 0 foundations: tree paths, flow math, solvers, CFG, platform choice, test pause points, logging,
    # run folders (local or URL) and their TensorBoard writer
    ("tree", "flow", "flow_solvers", "guidance", "platforms", "fault_points", "logs", "paths", "tb_writer"),
    ("models",),  # 1 Flax modules and their config dataclasses
    ("data", "flops", "sharding", "distributed", "optim", "dit_seeding"),  # 2 inputs, FLOPs, mesh rules, optax
    # 3 config, Orbax, the step, its state, timing, a run's metrics records, non-finite steps
    (
        "config",
        "checkpoint",
        "checkpoint_integrity",
        "checkpoint_items",
        "train_step",
        "train_state",
        "profiling",
        "train_metrics",
        "nonfinite",
    ),
    ("model_config",),  # 4 a loaded config -> the model's KontextConfig
    ("run_params",),  # 5 a run's weights, as sampling and export read them
    ("convert", "eval"),  # 6 HF / diffusers <-> ours; the judge and the learning signal
    ("pretrained", "sample", "surgery", "smoke"),  # 7 tools built on the above
    ("train", "aot", "aot_report"),  # 8 the training loop; AOT compilation of its step and the sampler, its report
    ("demo", "cli", "parity"),  # 9 entry points (parity's dispatcher reuses cli's flag spelling)
)
# What `qk_jax.models.*` may import besides itself (a model must build without converters,
# data pipelines or training code).
MODELS_MAY_IMPORT = ("qk_jax.models", "qk_jax.tree", "qk_jax.flow")


def module_files(root: str = ROOT) -> dict[str, str]:
    """{dotted module name: path} for every .py file of the package."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(root, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                parts = os.path.relpath(path, root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def imports_of(name: str, path: str, modules: set[str]) -> set[str]:
    """The qk_jax modules `name` imports (`from pkg import sub` counts as pkg.sub when sub is a module)."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = os.path.basename(path) == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                # `import qk_jax.a.b` imports qk_jax.a.b (and its packages, which import nothing of it)
                while t not in modules and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t != name and t != PACKAGE:
                    out.add(t)
    return out


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def unit(module: str) -> str:
    """'qk_jax.models.mmdit.model' -> 'models'."""
    return module.split(".")[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a imports b (layer i above layer j)' for every upward import, and every unit LAYERS lacks."""
    level = {u: i for i, names in enumerate(LAYERS) for u in names}
    out = []
    for m, deps in sorted(graph.items()):
        if m == PACKAGE:
            continue
        if unit(m) not in level:
            out.append(f"{m}: unit {unit(m)!r} is in no layer of LAYERS")
            continue
        if unit(m) == "models":
            out += [
                f"{m} imports {d}: qk_jax.models may import only {', '.join(MODELS_MAY_IMPORT)}"
                for d in sorted(deps)
                if not any(d == a or d.startswith(a + ".") for a in MODELS_MAY_IMPORT)
            ]
        for d in sorted(deps):
            if unit(d) in level and level[unit(d)] > level[unit(m)]:
                out.append(f"{m} (layer {level[unit(m)]}) imports {d} (layer {level[unit(d)]}): an upward import")
    return out


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_and_layers_import_only_downwards():
    problems = layer_violations(import_graph())
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_bad_import(tmp_path):
    """A model importing the converter, and a cycle, are reported by name."""
    graph = import_graph()
    bad = {**graph, "qk_jax.models.lora": graph["qk_jax.models.lora"] | {"qk_jax.convert.mapping"}}
    problems = layer_violations(bad)
    assert any(p.startswith("qk_jax.models.lora imports qk_jax.convert.mapping") for p in problems), problems
    bad = {**graph, "qk_jax.tree": {"qk_jax.train"}}
    assert find_cycle(bad) is not None
    assert any("qk_jax.tree (layer 0) imports qk_jax.train" in p for p in layer_violations(bad))


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from qk_jax.models import layers", {"qk_jax.models.layers"}),
        ("from qk_jax.models.mmdit import MMDiT", {"qk_jax.models.mmdit"}),
        ("from . import report", {"qk_jax.parity.report"}),
        ("import qk_jax.tree", {"qk_jax.tree"}),
        ("def f():\n    from qk_jax import sharding", {"qk_jax.sharding"}),
    ],
)
def test_imports_are_resolved_to_modules(tmp_path, source, expected):
    path = tmp_path / "x.py"
    path.write_text(source)
    modules = set(module_files())
    assert imports_of("qk_jax.parity.x", str(path), modules) == expected
