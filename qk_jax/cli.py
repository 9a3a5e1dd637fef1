"""`qk-jax <tool> [flags]`: one console script in front of the `python -m qk_jax.<tool>` jobs.

Only the chosen tool's module is imported, so each tool owns its absl flags. Before it is,
`platforms.configure` picks the JAX platform (quiet on machines without a TPU). A tool that
fails ends with one line naming the cause (`qk-jax train: error: ...`), not a traceback;
`--debug` (any tool) shows the tracebacks, those of background threads included.
"""

from __future__ import annotations

import importlib
import logging as py_logging
import os
import re
import signal
import sys
import threading
import warnings

from qk_jax import logs, platforms

# tool -> (module with `main(argv)`, one-line description)
TOOLS: dict[str, tuple[str, str]] = {
    "demo": ("qk_jax.demo", "the whole system on Kontext-Shapes: data, 3 stages, surgery, sampling, judge report"),
    "train": ("qk_jax.train", "train one stage: qk-jax train --config configs/stage1.py:tiny --workdir DIR"),
    "surgery": ("qk_jax.surgery", "move a checkpoint between stages: --from 1 --to 2 --src RUN --dst CKPT"),
    "sample": ("qk_jax.sample", "generate / edit / customise: --checkpoint RUN --prompt TEXT --out PNG"),
    "aot": (
        "qk_jax.aot",
        "compile the train step and sampler for a TPU topology on this machine: "
        "--config configs/stage2.py:paper --topology v5p:4x4x4",
    ),
    "smoke": ("qk_jax.smoke", "check a machine: mesh, sharded init, train steps, checkpoint round trip"),
    "parity": (
        "qk_jax.parity.cli",
        "compare a model with its PyTorch reference: qk-jax parity <model> --checkpoint DIR",
    ),
    "data": ("qk_jax.data.cli", "datasets: `data shapes` (generate Kontext-Shapes), `data import` (JSONL manifest)"),
    "eval": ("qk_jax.eval.cli", "the judge: `eval detect IMAGE...`, `eval score` generations against scene graphs"),
    "convert": (
        "qk_jax.convert.cli",
        "HF/diffusers safetensors <-> Orbax: --from-hf DIR --to-orbax DIR (or back); a "
        "run's sub-model -> HF: --from-run RUN --subtree vlm|generator|vae --to-hf DIR",
    ),
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
    lines += ["", "Each tool takes --help for its own flags, and --debug to show tracebacks."]
    return "\n".join(lines)


def config_override_message(error: AttributeError, args: list[str]) -> str:
    """'config field train.stepz does not exist (did you mean train.steps?)' from the
    AttributeError ml_collections raises for a `--config.<path>=...` naming no field."""
    text = str(error.args[0] if error.args else error)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    names = re.findall(r"[\w-]+", text.split("Did you mean")[0])
    wrong = names[0] if names else "?"
    paths = [a[len("--config.") :].partition("=")[0] for a in args if a.startswith("--config.")]
    path = next((p for p in paths if p.split(".")[-1] == wrong), wrong)
    parent = path.rpartition(".")[0]
    hint = f" (did you mean {parent + '.' if parent else ''}{suggestion.group(1)}?)" if suggestion else ""
    return f"config field {path} does not exist{hint}"


def size_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """(the other args, the `--config.<...>.overrides.<field>=<value>` ones as `path=value`).

    A size's overrides (`model.generator.overrides`, `model.vlm.overrides`) hold only the fields
    the size changes, so such an override may name a field they lack, which ml_collections'
    flag parser refuses; these are applied after it (`config.set_field`), and the model config
    checks the name when the model is built."""
    rest, overrides = [], []
    for arg in args:
        path = arg[len("--config.") :].partition("=")[0] if arg.startswith("--config.") else ""
        if ".overrides." in path and "=" in arg:
            overrides.append(arg[len("--config.") :])
        else:
            rest.append(arg)
    return rest, overrides


def config_flag(args: list[str]) -> tuple[int, str, str] | None:
    """(index in `args`, prefix, value) of the `--config` value: `--config X` gives the index of X
    and prefix "", `--config=X` its own index and prefix "--config="; None without one."""
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return i + 1, "", args[i + 1]
        if arg.startswith("--config="):
            return i, "--config=", arg[len("--config=") :]
    return None


def resolve_config_file(args: list[str], found: tuple[int, str, str]) -> list[str]:
    """`args` with the file of `--config FILE[:ARG]` (`found`: its `config_flag`) found as
    `config.load_config` finds it (as given, else under the repository root); ConfigError naming
    the flag when it is nowhere. (ml_collections would defer a missing file to the first read of
    the config, and then name neither the flag nor the file.)"""
    from qk_jax.config import ConfigError, resolve_config_path

    index, prefix, spec = found
    file, sep, arg = spec.partition(":")
    try:
        resolved = resolve_config_path(file) + sep + arg
    except ConfigError as e:
        raise ConfigError(f"--config {spec}: {e}") from None
    return [*args[:index], prefix + resolved, *args[index + 1 :]]


def config_file_message(error: Exception, spec: str | None) -> str | None:
    """'--config configs/stage1.py:huge: ValueError: unknown size ...' from the error absl raises
    when the `get_config` of the config file fails (ml_collections puts the whole traceback in
    it); None for any other flag error."""
    text = str(error)
    if spec is None or not re.match(r"flag --config=\S+: Error whilst parsing config file", text):
        return None
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    return f"--config {spec}: {last}"


def parse_flags(args: list[str]) -> list[str]:
    """absl's flag parsing, with a mistyped `--config.<field>`, a config file that is not there
    and one whose `get_config` fails each reported in one line as a ConfigError, and the
    `size_overrides` applied to the parsed `--config`."""
    from absl import app, flags

    from qk_jax.config import ConfigError, apply_overrides

    args, overrides = size_overrides(args)
    found = config_flag(args) if "config" in flags.FLAGS else None
    spec = found[2] if found else None
    if found:
        args = resolve_config_file(args, found)
    argv, sys.argv = sys.argv, list(args)  # ml_collections reads its `--config.*` flags from sys.argv
    try:
        rest = flags.FLAGS(args)
    except AttributeError as e:
        raise ConfigError(config_override_message(e, args)) from None
    except flags.Error as e:
        message = config_file_message(e, spec)
        if message is None:
            rest = app.parse_flags_with_usage(args)  # fails the same way: absl's own report and exit
        else:
            raise ConfigError(message) from None
    finally:
        sys.argv = argv
    if overrides:
        if "config" not in flags.FLAGS or flags.FLAGS.config is None:
            raise ConfigError(f"{overrides[0]}: a config override needs --config")
        apply_overrides(flags.FLAGS.config, overrides)
    return rest


class OneLineLogs(py_logging.Filter):
    """Library log records without tracebacks, cut to their first line (background threads of
    Orbax log each failure with several tracebacks). The tools' own records (`qk_jax.logs`) stay
    whole: some are tables (`qk-jax smoke`'s parameter shardings)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if logs.is_ours(record):
            return True
        message = record.getMessage()
        record.msg, record.args = (message.splitlines()[0] if message else message), None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def quiet_tracebacks() -> None:
    """Outside --debug: library log records in one line, and exceptions of background
    threads or of objects finalised at exit (asyncio's 'Event loop is closed') in one line."""
    for handler in py_logging.getLogger().handlers:
        handler.addFilter(OneLineLogs())

    def thread_hook(args):
        print(
            f"background thread {getattr(args.thread, 'name', '?')}: {args.exc_type.__name__}: "
            f"{str(args.exc_value).splitlines()[0] if str(args.exc_value) else ''}",
            file=sys.stderr,
        )

    threading.excepthook = thread_hook
    sys.unraisablehook = lambda _unraisable: None


def error_line(prog: str, error: BaseException) -> str:
    """The one line a failed tool ends with."""
    from qk_jax.checkpoint import first_line

    return f"{prog}: error: {first_line(error, limit=None)} (rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
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
        if quiet:  # the tool's own progress at INFO; library INFO chatter (Orbax, grain) would hide it
            logging.set_verbosity(logging.INFO)
            logging.get_absl_handler().addFilter(logs.OnlyOursBelowWarning())
        if not debug:
            quiet_tracebacks()
        return module.main(args)

    # `--help` prints the __main__ module's docstring and the key flags of the module named
    # sys.argv[0]: make them the tool's.
    prog = f"qk-jax {tool}"
    for flag in flags.FLAGS.get_flags_for_module(module.__name__):
        flags.FLAGS.register_key_flag_for_module(prog, flag)
    sys.modules["__main__"].__doc__ = module.__doc__
    sys.argv = [prog] + rest
    try:
        app.run(tool_main, argv=sys.argv, flags_parser=parse_flags)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and exits by itself)
        if debug:
            raise
        py_logging.disable(py_logging.CRITICAL)
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None
    except Exception as e:  # every failure ends in one line unless --debug
        if debug:
            raise
        # Background threads and objects finalised at exit (Orbax's event loops) must not bury the
        # cause: no more log records, and no warnings (e.g. a coroutine never awaited) after it.
        py_logging.disable(py_logging.CRITICAL)
        warnings.simplefilter("ignore")
        print(error_line(prog, e), file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
