"""`qk-jax parity <model> [flags]`: dispatches to the parity tool of one model.

Each tool's module (see `qk_jax.parity.TOOLS`) defines its absl flags, so the module
must be imported before the flags are parsed: `qk_jax.cli` calls `select(args)` to get
the tool. Flag names may be written with dashes (`--image-sizes`) or underscores.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from types import SimpleNamespace

from qk_jax.cli import underscore_flags as normalize_flags  # also this module's API
from qk_jax.parity import TOOLS


def usage() -> str:
    return (
        "usage: qk-jax parity <model> --checkpoint DIR [flags]\n\nmodels: "
        + ", ".join(sorted(TOOLS))
        + "\n\nEach model takes --help for its own flags."
    )


def load(model: str) -> SimpleNamespace:
    """The tool of `model` as `qk_jax.cli` runs a tool module: `main(argv)`, `__doc__`, and
    `__name__` = the module whose absl flags it reads."""
    tool = TOOLS[model]
    module = importlib.import_module(tool.module)
    main = module.main if tool.kind is None else module.main_for(tool.kind)
    return SimpleNamespace(main=main, __doc__=tool.doc or module.__doc__, __name__=module.__name__)


def select(args: Sequence[str]) -> tuple[SimpleNamespace, list[str]]:
    """(tool, its flag arguments) for `args` = [model, *flags]."""
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if args else 2)
    model = args[0]
    if model not in TOOLS:
        print(f"qk-jax parity: unknown model {model!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = load(model)
    rest = normalize_flags(args[1:])
    if any(a in ("-h", "--help", "--helpshort") for a in rest):
        from absl import flags

        # A tool's flags may live in a shared module (e.g. dit_tool.py): list every qk_jax one.
        print(f"usage: qk-jax parity {model} [flags]\n\n{(module.__doc__ or '').strip()}\n\nflags:")
        for name in flags.FLAGS.flags_by_module_dict():
            if name.startswith("qk_jax."):
                print(flags.FLAGS.module_help(name))
        raise SystemExit(0)
    return module, rest


def main(argv: Sequence[str]) -> None:
    """`argv` = [program, model, *flags]: parses the model's flags and runs its tool."""
    from absl import flags

    module, rest = select(list(argv[1:]))
    remaining = flags.FLAGS([f"{argv[0]} {argv[1]}", *rest])
    module.main(remaining)


if __name__ == "__main__":
    from absl import app

    _module, _rest = select(sys.argv[1:])
    app.run(_module.main, argv=[f"qk_jax.parity {sys.argv[1]}", *_rest])
