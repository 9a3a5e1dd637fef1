"""Compile and run time of a stage's train step on CPU under XLA:CPU flag sets.

XLA reads its flags (`XLA_FLAGS`) once per process, so each flag set runs in a fresh
process with one CPU device. It builds the stage's model and a fresh train state (random
weights, as `qk-jax train` starts), takes one text-to-image batch from a small
Kontext-Shapes dataset, then traces, lowers and compiles the jitted train step
(`qk_jax.train_state.jit_train_step`, the persistent compilation cache off) and runs it
`--steps` times on that batch. The table gives the seconds of each phase, the median step
after the first, and the first step's loss relative to that under XLA's defaults, when they
are among the sets run (the flags change code generation, not float semantics: the losses
differ by rounding only).

The test suite compiles everything it runs with the fastest-compiling set here
(`tests/cli_env.py`): its programs are tiny and compiled once or twice each, so compile
time is most of its cost.

    python benchmarks/xla_cpu_flags.py [--config configs/stage2.py:tiny ...] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

try:
    from benchmarks import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

DEFAULT_CONFIGS = ("configs/stage2.py:tiny", "configs/stage2.py:demo")
# name: XLA_FLAGS. "llvm_o0": LLVM optimisation off; "legacy_fusion": XLA:CPU's older fusion
# code generator (not the MLIR fusion emitters); "suite": both, as tests/cli_env.py sets them.
FLAG_SETS = {
    "defaults": "",
    "llvm_o0": "--xla_backend_optimization_level=0",
    "legacy_fusion": "--xla_cpu_use_fusion_emitters=false",
    "suite": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
}


def one_case(config_spec: str, steps: int) -> dict:
    """In this process (its XLA_FLAGS already set): the phases' seconds and the losses."""
    import jax
    import numpy as np

    from qk_jax import optim, sharding, train_state
    from qk_jax.config import load_config
    from qk_jax.data import builders, pipeline, vlm_inputs
    from qk_jax.data.model_inputs import place_batch, prepare_batch
    from qk_jax.data.tokenizer import build_tokenizer
    from qk_jax.model_config import build_kontext_config, read_special_token_ids
    from qk_jax.models.kontext import QueryKontext

    jax.config.update("jax_enable_compilation_cache", False)  # real compilations only
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, processor_dir = os.path.join(tmp, "data"), os.path.join(tmp, "processor")
        config = load_config(config_spec, [f"data.data_dir={data_dir}", "data.mixture={'t2i': 1.0}"])
        builders.build_shapes(data_dir, ["t2i"], num=2 * config.train.batch_size, height=int(config.data.area**0.5))
        build_tokenizer(processor_dir)
        kcfg = build_kontext_config(config, read_special_token_ids(processor_dir))
        processor = vlm_inputs.load_processor(processor_dir)
        dataset = pipeline.make_dataset(config.data, processor, process_index=0, process_count=1)
        batch = prepare_batch(kcfg, next(iter(dataset)))
    mesh = sharding.make_mesh(config.mesh)
    model = QueryKontext(kcfg)
    tx = optim.make_optimizer(config.train)
    abstract = train_state.state_target(model, config, mesh, tx)
    shardings = train_state.state_shardings(abstract)
    with jax.set_mesh(mesh), sharding.activation_rules_context():
        params, _, _ = sharding.init_sharded(
            model.init, mesh, jax.random.key(0), rules_by_submodel=sharding.rules_from_config(config)
        )
        state = train_state.init_state(params, config.train.trainable, tx, abstract["ema"] is not None, shardings)
        placed = place_batch(batch, mesh)
        step_fn = train_state.jit_train_step(model, tx, config.train, shardings)
        t0 = time.perf_counter()
        traced = step_fn.trace(state, placed)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        compiled = lowered.compile()
        t3 = time.perf_counter()
        losses, seconds = [], []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = compiled(state, placed)
            losses.append(float(jax.device_get(metrics["loss"])))
            seconds.append(time.perf_counter() - start)
    assert np.all(np.isfinite(losses)), losses
    return {
        "trace_s": t1 - t0,
        "lower_s": t2 - t1,
        "compile_s": t3 - t2,
        "step_s": statistics.median(seconds[1:] or seconds),
        "losses": losses,
        "batch": config.train.batch_size,
    }


def run(configs: list[str], steps: int, flag_sets: dict[str, str]) -> list[dict]:
    rows = []
    for spec in configs:
        for name, flags in flag_sets.items():
            args = ("--one", spec, "--steps", str(steps))
            case = common.case_in_fresh_process(__file__, args, flags, f"{spec} with XLA_FLAGS={flags!r}")
            rows.append({"config": spec, "flags": name, "xla_flags": flags, **case})
    first_loss = {r["config"]: r["losses"][0] for r in rows if r["flags"] == "defaults"}
    for r in rows:
        reference = first_loss.get(r["config"])
        r["loss_rel_diff"] = abs(r["losses"][0] - reference) / abs(reference) if reference else None
    print(
        common.table(
            f"The train step on one CPU device under XLA:CPU flag sets ({steps} steps on one t2i batch)",
            ["config", "flags", "XLA_FLAGS", "batch", "trace s", "lower s", "compile s", "step s", "loss vs defaults"],
            [
                [
                    r["config"],
                    r["flags"],
                    r["xla_flags"] or "(none)",
                    r["batch"],
                    f"{r['trace_s']:.2f}",
                    f"{r['lower_s']:.2f}",
                    f"{r['compile_s']:.2f}",
                    f"{r['step_s']:.3f}",
                    "-" if r["loss_rel_diff"] is None else f"{r['loss_rel_diff']:.1e}",
                ]
                for r in rows
            ],
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="config spec (repeatable); default: stage 2 tiny and demo")
    parser.add_argument("--steps", type=int, default=5, help="train steps run after the compile (the first not timed)")
    parser.add_argument(
        "--flags", action="append", choices=sorted(FLAG_SETS), help="flag set (repeatable); default: all, in order"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single case, in this process
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.one:
        print(json.dumps(one_case(args.one, args.steps)))
    else:
        chosen = args.flags or list(FLAG_SETS)
        run(args.config or list(DEFAULT_CONFIGS), args.steps, {name: FLAG_SETS[name] for name in chosen})


if __name__ == "__main__":
    main()
