"""`qk-jax <tool> [flags]`: one console script in front of the `python -m qk_jax.<tool>` jobs.

Only the chosen tool's module is imported, so each tool owns its absl flags.
"""

from __future__ import annotations

import importlib
import sys

# tool -> (module with `main(argv)`, one-line description)
TOOLS: dict[str, tuple[str, str]] = {
    "smoke": ("qk_jax.smoke", "check a machine: mesh, sharded init, train steps, checkpoint round trip"),
    "parity": ("qk_jax.parity.cli", "compare a model with its PyTorch reference: qk-jax parity <model> --checkpoint DIR"),
}


def usage() -> str:
    width = max(len(t) for t in TOOLS)
    lines = ["usage: qk-jax <tool> [--help] [flags]", "", "tools:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in TOOLS.items()]
    lines += ["", "Each tool takes --help for its own flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if len(argv) >= 2 else 2)
    tool = argv[1]
    if tool not in TOOLS:
        print(f"qk-jax: unknown tool {tool!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(TOOLS[tool][0])
    if getattr(module, "IS_DISPATCHER", False):  # sub-commands own their flags: hand argv over unparsed
        return module.main([f"qk-jax {tool}"] + argv[2:])
    from absl import app, logging

    rest = argv[2:]
    quiet = not any(a.startswith(("--verbosity", "-v=", "--v=")) for a in rest)

    def tool_main(args):
        if quiet:  # library INFO chatter (Orbax, grain) hides a tool's own progress
            logging.set_verbosity(logging.WARNING)
        return module.main(args)

    sys.argv = [f"qk-jax {tool}"] + rest
    app.run(tool_main, argv=sys.argv)


if __name__ == "__main__":
    main()
