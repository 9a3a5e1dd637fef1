"""`qk-jax aot`: compile a stage's train step and sampling loop for a TPU topology, ahead
of time, on a CPU machine (libtpu), and say whether they fit the chip's memory.

    qk-jax aot --config configs/stage2.py:paper --topology v5p:4x4x4 \\
        --mesh data=1,fsdp=64,tensor=1 --batch 512 --json aot.json

What is compiled (with `jax.jit(...).lower(...).compile()` against the topology's
compile-only devices, every argument an abstract `jax.ShapeDtypeStruct` carrying the
NamedSharding the real run gives it):

- train: the jitted step `train.py` runs (`train_state.jit_train_step`: the stage's
  trainable set, optimizer (AdamW, clipping, schedule), EMA, gradient accumulation, the
  state's in/out shardings and its donation), lowered with the abstract train state
  (`train_state.abstract_state`: parameters sharded by the logical-axis rules of
  `sharding.py`, optimizer state and EMA sharded like their parameters) and a batch with
  the shapes `model_inputs.prepare_batch` gives for the config (square bucket of
  `data.area`, its VLM image at `data.vlm_area`, `data.max_text_len` tokens, K queries,
  `--inputs` input images per sample, default `data.image_slots`);
- sample: `sample.sample_loop`, the whole sampling loop (`sample.steps` steps of one
  batched, guided DiT call: text CFG, and dual guidance when the stage has the low-level
  path), on the inference parameters (LoRA merged) and the condition stream that
  `QueryKontext.condition` produces.

Per program it prints the per-device memory from `compiled.memory_analysis()`
(arguments, outputs, temporaries, aliased bytes, generated code; peak = arguments +
outputs - aliases + temporaries + code), the analytic FLOPs (`qk_jax.flops`; XLA's own
count is shown for reference only: it counts a scanned layer stack's body once), the
compile time, and whether the peak fits the chip's HBM with `--headroom` left free. A
program XLA refuses to compile for lack of memory (`RESOURCE_EXHAUSTED`) does not fit, with
the per-device bytes XLA says it asks for. The last line is the verdict: `FITS` or
`DOES NOT FIT` (exit code 0 / 1).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qk_jax import aot_report, flops, logs, model_config, optim, paths, sharding, train_state
from qk_jax.config import ConfigError
from qk_jax.data import buckets
from qk_jax.data.model_inputs import prepare_batch
from qk_jax.data.vocab import TASKS
from qk_jax.models.kontext import QueryKontext
from qk_jax.models.lora import LORA_KEY

GIB = aot_report.GIB
# HBM per chip (GiB).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_CHIP_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
PROGRAMS = aot_report.PROGRAMS


# ----------------------------------------------------------------------------- topology and mesh


def chip_of(topology: str) -> str:
    """'v5p:4x4x4' -> 'v5p' (a key of HBM_GIB); ValueError for an unknown chip."""
    chip = topology.split(":")[0].strip().lower()
    chip = _CHIP_ALIASES.get(chip, chip)
    if chip not in HBM_GIB:
        raise ValueError(
            f"--topology {topology!r}: unknown chip {chip!r}; known: {sorted(HBM_GIB)} "
            "(names look like v5p:4x4x4, v5e:2x2, v6e:4x4, v4:2x2x1)"
        )
    return chip


def topology_mesh(topology: str, mesh_cfg: Mapping[str, int]):
    """(mesh over the topology's compile-only devices, device kind). The mesh must use every chip.

    `mesh_cfg["num_slices"] > 1` compiles for that many copies of `topology` joined over DCN
    (a multi-slice job), the `data` axis spanning them (`sharding.make_mesh`)."""
    from jax.experimental import topologies

    slices = sharding.num_slices(dict(mesh_cfg))
    try:
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=slices)
    except Exception as e:  # noqa: BLE001 - libtpu raises several types
        raise ValueError(
            f"--topology {topology!r} is not a TPU topology libtpu knows ({e}); "
            "names look like v5p:4x4x4, v5e:2x2, v6e:4x4"
        ) from None
    devices = list(topo.devices)
    shape = sharding.mesh_shape_from_config(dict(mesh_cfg), len(devices))
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"--mesh {dict(zip(sharding.MESH_AXES, shape))} uses {math.prod(shape)} of the "
            f"{len(devices)} chips of {topology}: the mesh must cover the topology"
        )
    mesh = sharding.make_mesh({**dict(zip(sharding.MESH_AXES, shape)), "num_slices": slices}, devices)
    return mesh, devices[0].device_kind


# ----------------------------------------------------------------------------- abstract inputs


def example_host_batch(kcfg, data_cfg, rows: int, n_inputs: int) -> dict[str, np.ndarray]:
    """A pipeline-format batch (`data.pipeline` layout) of `rows` samples in the square
    bucket, each with `n_inputs` input images: the shapes a real batch has (zeros inside)."""
    table, vlm_table = buckets.paired_tables(
        data_cfg.area, data_cfg.multiple, data_cfg.vlm_area, data_cfg.vlm_multiple, data_cfg.ratios
    )
    bucket = buckets.choose_bucket(1, 1, table)
    (h, w), (vh, vw) = table[bucket], vlm_table[bucket]
    v, t = kcfg.vlm.vision, int(data_cfg.max_text_len)
    slots = int(data_cfg.image_slots)
    if not 0 <= n_inputs <= slots:
        raise ValueError(f"--inputs {n_inputs}: must be between 0 and data.image_slots={slots}")
    grid = (1, vh // v.patch_size, vw // v.patch_size)
    patches = int(np.prod(grid))
    tokens = patches // v.merge_unit
    image = [kcfg.vlm.vision_start_token_id] + [kcfg.vlm.image_token_id] * tokens + [kcfg.vlm.vision_end_token_id]
    prompt = image * n_inputs
    if len(prompt) >= t:
        raise ConfigError(
            f"config field data.max_text_len={t} cannot hold {n_inputs} input images of {tokens} "
            "tokens each plus a prompt"
        )
    ids = np.full((rows, t), kcfg.vlm.text.pad_token_id or 0, np.int32)
    ids[:, : len(prompt)] = prompt
    task = "t2i" if n_inputs == 0 else ("edit" if kcfg.low_level else "reconstruction")
    if n_inputs > 1:
        task = "multi_subject"
    pixel_values = np.zeros((rows, slots, patches, v.patch_dim), np.float32)
    grids = np.zeros((rows, slots, 3), np.int32)
    grids[:, :n_inputs] = grid
    return {
        "target": np.zeros((rows, h, w, 3), np.float32),
        "cond_images": np.zeros((rows, slots, h, w, 3), np.float32),
        "cond_mask": np.broadcast_to(np.arange(slots) < n_inputs, (rows, slots)).copy(),
        "num_inputs": np.full((rows,), n_inputs, np.int32),
        "task_id": np.full((rows,), TASKS.index(task), np.int32),
        "valid": np.ones((rows,), bool),
        "input_ids": ids,
        "attention_mask": np.ones((rows, t), np.int32),
        "pixel_values": pixel_values,
        "image_grid_thw": grids,
    }


# Row axis of each prepared field (see model_inputs.place_batch); the vision plan has none.
_ROW_AXIS = {"position_ids": 1}


def abstract_batch(kcfg, data_cfg, mesh, global_batch: int, n_inputs: int, accum: int = 1) -> dict[str, Any]:
    """ShapeDtypeStructs (with the NamedShardings `place_batch` gives) of the prepared batch
    of `global_batch` samples: `prepare_batch` runs on one sample per micro-batch and its
    row axes are scaled up, so every shape is the one a real batch has."""
    if global_batch % accum:
        raise ConfigError(f"--batch {global_batch} is not divisible by train.grad_accum={accum}")
    per_micro = global_batch // accum
    small = prepare_batch(kcfg, example_host_batch(kcfg, data_cfg, accum, n_inputs), accum=accum)
    lead = 1 if accum > 1 else 0
    dp_spec = sharding.batch_axes(mesh, per_micro)

    def one(key, x):
        x = np.asarray(x)
        if key == "vision_plan_field":
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P()))
        axis = _ROW_AXIS.get(key, 0) + lead
        shape = list(x.shape)
        shape[axis] *= per_micro  # one sample -> per_micro samples (n images each for pixel_values)
        spec = [None] * len(shape)
        spec[axis] = dp_spec
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype, sharding=NamedSharding(mesh, P(*spec)))

    out = {}
    for key, value in small.items():
        if key == "vision_plan":
            out[key] = type(value)(*(one("vision_plan_field", f) for f in value))
        else:
            out[key] = one(key, value)
    return out


def _replicated(mesh):
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- compiling


def memory_of(compiled) -> dict[str, int]:
    """Per-device bytes from `compiled.memory_analysis()`, and the peak they add up to."""
    m = compiled.memory_analysis()
    get = lambda name: int(getattr(m, name, 0) or 0)
    out = {
        "arguments": get("argument_size_in_bytes"),
        "outputs": get("output_size_in_bytes"),
        "temporaries": get("temp_size_in_bytes"),
        "aliases": get("alias_size_in_bytes"),
        "generated_code": get("generated_code_size_in_bytes"),
    }
    out["peak"] = out["arguments"] + out["outputs"] - out["aliases"] + out["temporaries"] + out["generated_code"]
    return out


# XLA's compile-time verdict on a program larger than the chip (libtpu), e.g. "RESOURCE_EXHAUSTED: Ran out of
# memory on HBM, the total memory required for HLO temporaries (136.79G) exceeds available HBM (15.75G)."
_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGTP]?)\) exceeds available HBM \(([\d.]+)([KMGTP]?)\)")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}  # XLA's sizes are binary


def out_of_memory(error: BaseException) -> dict[str, Any] | None:
    """For XLA's RESOURCE_EXHAUSTED at compile time: {"requested_bytes", "available_bytes"
    (per device; None when the message does not say), "message" (its first line)}; else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    line = text.strip().splitlines()[0]
    m = _OOM.search(text)
    size = lambda number, unit: int(float(number) * _UNITS[unit])
    return {
        "requested_bytes": size(m.group(1), m.group(2)) if m else None,
        "available_bytes": size(m.group(3), m.group(4)) if m else None,
        "message": line,
    }


def _compile_lowered(lowered, mesh) -> tuple[Any, float, dict[str, Any] | None]:
    """(compiled or None, seconds, `out_of_memory` or None): a program larger than the chip
    is a verdict, not an error."""
    with jax.set_mesh(mesh), sharding.activation_rules_context():
        t0 = time.perf_counter()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            oom = out_of_memory(e)
            if oom is None:
                raise
            return None, time.perf_counter() - t0, oom
    return compiled, time.perf_counter() - t0, None


def _lower(fn, args, mesh, **jit_kwargs) -> tuple[Any, float]:
    with jax.set_mesh(mesh), sharding.activation_rules_context():
        t0 = time.perf_counter()
        lowered = jax.jit(fn, **jit_kwargs).lower(*args)
    return lowered, time.perf_counter() - t0


def _compiled_entry(compiled, oom, lower_s: float, compile_s: float) -> dict[str, Any]:
    """The report entry's memory / timing fields of a compiled program, or of one XLA found
    too large (`out_of_memory` set, `memory` None)."""
    return {
        "memory": memory_of(compiled) if compiled is not None else None,
        "out_of_memory": oom,
        "lower_seconds": lower_s,
        "compile_seconds": compile_s,
    }


def lower_train(model, config, mesh, params, batch) -> tuple[Any, dict[str, Any], float]:
    """The train step `train.py` runs (`train_state.jit_train_step`: the same in/out shardings
    and donation) lowered with the abstract train state of `params` and the abstract `batch`.
    Returns (lowered, abstract state, seconds)."""
    t = config.train
    tx = optim.make_optimizer(t)
    state = train_state.abstract_state(params, t.trainable, tx, t.ema_decay > 0)
    step = train_state.jit_train_step(model, tx, t, train_state.state_shardings(state))
    with jax.set_mesh(mesh), sharding.activation_rules_context():
        t0 = time.perf_counter()
        lowered = step.lower(state, batch)
    return lowered, state, time.perf_counter() - t0


def compile_train(model, config, mesh, params, batch) -> dict[str, Any]:
    """Compiles the train step; returns its report entry."""
    lowered, state, lower_s = lower_train(model, config, mesh, params, batch)
    compiled, compile_s, oom = _compile_lowered(lowered, mesh)
    trainable = config.train.trainable
    counted = flops.kontext_train_step_flops(model.config, batch, trainable, state["trainable"].get(LORA_KEY))
    return {
        **_compiled_entry(compiled, oom, lower_s, compile_s),
        "flops": {
            "analytic": counted["total"],
            "analytic_with_remat": counted["hardware_total"],
            "parts": {k: v["total"] for k, v in counted["parts"].items()},
            "xla_per_device": flops.xla_flops_per_device(compiled) if compiled is not None else None,
        },
        "state_bytes_per_device": _tree_bytes(state),
        "params": {"trainable": _count(state["trainable"]), "frozen": _count(state["frozen"])},
    }


def compile_sample(model, config, mesh, params, batch, sample_batch: int) -> dict[str, Any]:
    """Compiles the sampling loop (`sample.sample_loop`) for `sample_batch` prompts."""
    from qk_jax.sample import sample_loop

    kcfg = model.config
    s = config.sample
    steps = int(s.steps)
    # The sampler's parameters: LoRA merged into the kernels (same shapes and shardings).
    inference = {k: v for k, v in params.items() if k != LORA_KEY}
    spec0 = sharding.batch_axes(mesh, sample_batch)

    def rows_of(x, b):
        return jax.ShapeDtypeStruct(
            (b,) + tuple(x.shape[1:]), x.dtype, sharding=NamedSharding(mesh, P(spec0, *([None] * (len(x.shape) - 1))))
        )

    one_batch = dict(batch)
    if batch["input_ids"].ndim == 3:  # grad accumulation: the shapes of one micro-batch
        one_batch = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype), batch)
    cond, mask, _ = jax.eval_shape(model.condition, inference, one_batch)
    n_target = math.prod(one_batch["target"].shape[1:3]) // kcfg.downsample**2
    c_in = kcfg.generator.in_channels
    cond_tokens = None
    dual = False
    if kcfg.low_level and "cond_images" in one_batch:
        ct = jax.eval_shape(model.encode_conditions, inference, one_batch["cond_images"])
        cond_tokens = rows_of(ct, sample_batch)
        dual = float(s.image_guidance) != 1.0
    text_cfg = float(s.guidance) != 1.0
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=_replicated(mesh))
    args = (
        inference,
        rows_of(jax.ShapeDtypeStruct((1, n_target, c_in), jnp.float32), sample_batch),
        f32((steps + 1,)),
        f32((steps,)),
        rows_of(cond, sample_batch),
        rows_of(mask, sample_batch),
        cond_tokens,
        rows_of(one_batch["img_ids"], sample_batch),
        f32(()),
        f32(()),
    )
    image_size = tuple(one_batch["target"].shape[1:3])
    loop = sample_loop(model, s.method, text_cfg, dual, s.get("guidance_mode", "cfg"), image_size)
    lowered, lower_s = _lower(loop, args, mesh)
    compiled, compile_s, oom = _compile_lowered(lowered, mesh)
    branches = 3 if dual else (2 if text_cfg else 1)
    evals = steps * (2 if s.method == "heun" else 1)
    n_total = one_batch["img_ids"].shape[1]
    per_eval = flops.mmdit_flops(kcfg.generator, branches * sample_batch, n_total, cond.shape[1], n_target).total
    return {
        **_compiled_entry(compiled, oom, lower_s, compile_s),
        "flops": {
            "analytic": per_eval * evals,
            "per_dit_call": per_eval,
            "xla_per_device": flops.xla_flops_per_device(compiled) if compiled is not None else None,
        },
        "sample_batch": sample_batch,
        "steps": steps,
        "branches": branches,
        "method": s.method,
    }


def _tree_bytes(tree) -> int:
    return int(sum(sharding.bytes_per_device(x) for x in jax.tree.leaves(tree)))


def _count(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def run(
    config,
    topology: str,
    mesh_cfg: Mapping[str, int] | None = None,
    batch: int | None = None,
    programs=PROGRAMS,
    n_inputs: int | None = None,
    sample_batch: int | None = None,
    headroom: float = 0.1,
    log=None,
) -> dict[str, Any]:
    """Compiles `programs` of `config` for `topology`; returns the report (see `aot_report.format_report`).
    Progress goes to `log` (default: `qk_jax.logs.info`)."""
    log = log or logs.info
    unknown = set(programs) - set(PROGRAMS)
    if unknown or not programs:
        raise ValueError(f"programs {sorted(programs)}: choose from {PROGRAMS}")
    chip = chip_of(topology)
    mesh_cfg = dict(config.mesh) if mesh_cfg is None else dict(mesh_cfg)
    mesh, device_kind = topology_mesh(topology, mesh_cfg)
    n_dev = mesh.devices.size
    with config.unlocked():
        config.mesh = {
            **{a: int(mesh.shape[a]) for a in sharding.MESH_AXES},
            "num_slices": sharding.num_slices(mesh_cfg),
        }
        if batch is not None:
            config.train.batch_size = int(batch)
    kcfg = model_config.validate(config, n_dev)
    n_inputs = int(config.data.image_slots if n_inputs is None else n_inputs)
    dp_size = mesh.shape["data"] * mesh.shape["fsdp"]
    sample_batch = int(sample_batch or dp_size)
    model = QueryKontext(kcfg)
    log(
        f"aot: {config.stage and f'stage {config.stage}'} {config.get('size', '')} on {topology} "
        f"({n_dev} x {device_kind}, {HBM_GIB[chip]} GiB HBM), mesh {dict(mesh.shape)}, global batch "
        f"{config.train.batch_size}, {n_inputs} input image(s), dtype {config.model.dtype}, "
        f"remat {config.model.remat}\n{model_config.describe(kcfg)}"
    )
    # Traced outside the topology's mesh: nothing here may touch its (compile-only) devices.
    params = train_state.params_target(model, mesh, sharding.rules_from_config(config))
    batch_abs = abstract_batch(
        kcfg, config.data, mesh, int(config.train.batch_size), n_inputs, int(config.train.grad_accum)
    )
    report: dict[str, Any] = {
        "config": {
            "stage": int(config.stage),
            "size": config.get("size", ""),
            "dtype": config.model.dtype,
            "remat": config.model.remat,
            "attention_impl": config.model.attention_impl,
            "global_batch": int(config.train.batch_size),
            "grad_accum": int(config.train.grad_accum),
            "num_queries": kcfg.num_queries,
            "input_images": n_inputs,
            "batch_shapes": {k: list(v.shape) for k, v in batch_abs.items() if k != "vision_plan"},
        },
        "topology": topology,
        "chip": chip,
        "device_kind": device_kind,
        "num_devices": int(n_dev),
        "mesh": {a: int(mesh.shape[a]) for a in sharding.MESH_AXES},
        "hbm_bytes": HBM_GIB[chip] * GIB,
        "headroom": headroom,
        "params_total": _count(params),
        "programs": {},
    }
    for name in programs:
        log(f"aot: compiling the {name} program ...")
        if name == "train":
            entry = compile_train(model, config, mesh, params, batch_abs)
        else:
            entry = compile_sample(model, config, mesh, params, batch_abs, sample_batch)
        xla = entry["flops"]["xla_per_device"]
        entry["flops"]["xla_total"] = None if xla is None else xla * n_dev
        entry["seconds_at_peak"] = aot_report.seconds_at_peak(entry["flops"]["analytic"], n_dev, device_kind)
        report["programs"][name] = entry
        log(f"aot: {name} compiled in {entry['compile_seconds']:.0f} s; {aot_report.memory_words(entry)} per device")
    return aot_report.judge(report)


# ----------------------------------------------------------------------------- CLI


def define_flags() -> None:
    """The tool's flags (defined on demand, so other tools may import this module)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Stage config, e.g. configs/stage2.py:paper.")
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v5e:2x2, v6e:4x4.", required=True)
    flags.DEFINE_string("mesh", "", "Mesh, e.g. data=1,fsdp=16,tensor=4 (default: the config's mesh).")
    flags.DEFINE_integer("batch", None, "Global batch (default: train.batch_size).")
    flags.DEFINE_list("programs", list(PROGRAMS), "What to compile: train, sample.")
    flags.DEFINE_integer("inputs", None, "Input images per sample (default: data.image_slots).")
    flags.DEFINE_integer("sample_batch", None, "Prompts per sampling run (default: data x fsdp).")
    flags.DEFINE_float("headroom", 0.1, "Fraction of HBM to leave free for the verdict.")
    flags.DEFINE_string("json", None, "Write the report as JSON here.")


def main(argv):
    from absl import app, flags

    del argv
    f = flags.FLAGS
    if f.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/stage2.py:paper")
    if f.json:  # before the compiles, which take minutes at the paper's size
        paths.check_output_file(f.json, "--json")
    report = run(
        f.config,
        f.topology,
        sharding.parse_mesh(f.mesh) if f.mesh else None,
        f.batch,
        tuple(f.programs),
        f.inputs,
        f.sample_batch,
        f.headroom,
    )
    if f.json:
        paths.write_text(f.json, json.dumps(report, indent=1))
    print(aot_report.format_report(report), flush=True)
    return 0 if report["fits"] else 1


def configure_platform() -> None:
    """`python -m qk_jax.aot`: the CPU platform and libtpu's placeholders (`platforms.configure`),
    set by the entry point, not at import. jax read `JAX_PLATFORMS` when this module imported
    it, so the platform is also handed to jax's config; backends start at the first device
    query, after this, and libtpu reads its variables then."""
    from qk_jax import platforms

    platforms.configure(os.environ, "aot")
    if os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


if __name__ == "__main__":
    from absl import app

    configure_platform()
    define_flags()
    app.run(main)
