"""`qk-jax parity <model> [flags]`: dispatches to the parity tool registered for <model>.

`argv[1]` is the model name (a key of `qk_jax.parity.TOOLS`); the rest is parsed by that
tool's own absl flags, so only the chosen tool's module (and flags) is imported.
"""

from __future__ import annotations

import importlib
import sys

from qk_jax.parity import TOOLS

# Tells `qk_jax.cli` to hand over argv unparsed: the flags belong to the sub-tool.
IS_DISPATCHER = True


def usage() -> str:
    return "usage: qk-jax parity <model> --checkpoint DIR [flags]\n\nmodels: " + ", ".join(sorted(TOOLS)) + \
        "\n\nEach model takes --help for its own flags."


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if len(argv) >= 2 else 2)
    model = argv[1]
    if model not in TOOLS:
        print(f"qk-jax parity: unknown model {model!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(TOOLS[model])
    from absl import app, flags

    if {"-h", "--help", "--helpshort"} & set(argv[2:]):  # absl would list only the __main__ module's flags
        print(f"usage: {argv[0]} {model} [flags]\n\n{(module.__doc__ or '').strip()}\n")
        for name in flags.FLAGS.flags_by_module_dict():
            if name.startswith("qk_jax."):
                print(flags.FLAGS.module_help(name))
        raise SystemExit(0)
    app.run(module.main, argv=[f"{argv[0]} {model}"] + argv[2:])


if __name__ == "__main__":
    main()
