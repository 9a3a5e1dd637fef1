"""`qk-jax <tool> [flags]`: one console script in front of the `python -m qk_jax.<tool>` jobs.

Only the chosen tool's module is imported, so each tool owns its absl flags. Before it is,
`platforms.configure` picks the JAX platform (quiet on machines without a TPU).
"""

from __future__ import annotations

import importlib
import os
import sys

from qk_jax import platforms

# tool -> (module with `main(argv)`, one-line description)
TOOLS: dict[str, tuple[str, str]] = {
    "demo": ("qk_jax.demo", "the whole system on Kontext-Shapes: data, 3 stages, surgery, sampling, judge report"),
    "train": ("qk_jax.train", "train one stage: qk-jax train --config configs/stage1.py:tiny --workdir DIR"),
    "surgery": ("qk_jax.surgery", "move a checkpoint between stages: --from 1 --to 2 --src RUN --dst CKPT"),
    "sample": ("qk_jax.sample", "generate / edit / customise: --checkpoint RUN --prompt TEXT --out PNG"),
    "aot": ("qk_jax.aot", "compile the train step and sampler for a TPU topology on this machine: "
                          "--config configs/stage2.py:paper --topology v5p:4x4x4"),
    "smoke": ("qk_jax.smoke", "check a machine: mesh, sharded init, train steps, checkpoint round trip"),
    "parity": ("qk_jax.parity.cli", "compare a model with its PyTorch reference: qk-jax parity <model> --checkpoint DIR"),
    "data": ("qk_jax.data.cli", "datasets: `data shapes` (generate Kontext-Shapes), `data import` (JSONL manifest)"),
    "eval": ("qk_jax.eval.cli", "the judge: `eval detect IMAGE...`, `eval score` generations against scene graphs"),
    "convert": ("qk_jax.convert.cli", "HF/diffusers safetensors <-> Orbax: --from-hf DIR --to-orbax DIR (or back); a "
                                      "run's sub-model -> HF: --from-run RUN --subtree vlm|generator|vae --to-hf DIR"),
}


def underscore_flags(args: list[str]) -> list[str]:
    """`--from-hf=DIR` -> `--from_hf=DIR`: flags may be spelt with dashes (absl names use underscores)."""
    out = []
    for a in args:
        if a.startswith("--") and len(a) > 2:
            name, sep, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + sep + value
        out.append(a)
    return out


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
    platforms.configure(os.environ, tool)  # before the tool imports jax
    module = importlib.import_module(TOOLS[tool][0])
    from absl import app, flags, logging

    rest = underscore_flags(argv[2:])
    if hasattr(module, "select"):  # a dispatcher (`parity <model>`) hands over the module owning the flags
        name = rest[0] if rest else ""
        module, rest = module.select(rest)
        tool = f"{tool} {name}"
    if hasattr(module, "define_flags"):
        module.define_flags()
    quiet = not any(a.startswith(("--verbosity", "-v=", "--v=")) for a in rest)

    def tool_main(args):
        if quiet:  # library INFO chatter (Orbax, grain) hides a tool's own progress
            logging.set_verbosity(logging.WARNING)
        return module.main(args)

    # `--help` prints the __main__ module's docstring and the key flags of the module named
    # sys.argv[0]: make them the tool's.
    prog = f"qk-jax {tool}"
    for flag in flags.FLAGS.get_flags_for_module(module.__name__):
        flags.FLAGS.register_key_flag_for_module(prog, flag)
    sys.modules["__main__"].__doc__ = module.__doc__
    sys.argv = [prog] + rest
    app.run(tool_main, argv=sys.argv)


if __name__ == "__main__":
    main()
