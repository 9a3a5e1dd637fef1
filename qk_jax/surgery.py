"""Stage transitions as pure functions on parameter trees, applied to Orbax checkpoints.

    qk-jax surgery --from 1 --to 2 --src RUN1 --dst CKPT2 [--dit DIFFUSERS_DIR] [--config configs/stage2.py:SIZE]
    qk-jax surgery --from 1 --to 2 --src RUN1 --dst CKPT2 --dit QWEN_IMAGE_DIR --dit-layers every_other \\
        --config configs/stage2.py:paper                       # dit_10b seeded from Qwen-Image's even blocks
    qk-jax surgery --from 2 --to 3 --src RUN2 --dst CKPT3
    qk-jax train --config configs/stage2.py:SIZE --workdir RUN2 --config.train.init_from=CKPT2

1 -> 2  merge the VLM LoRA into the VLM kernels and drop it; drop the stage-1 head; graft
        the large DiT (converted from a diffusers folder with --dit, or initialised; a
        shallower target takes the --dit-layers subset of its blocks, listed per block in
        the report);
        re-initialise the connector output when its width changes (the DiT's condition
        width); keep queries, connector input layers and the autoencoder.
2 -> 3  keep everything; add the DiT LoRA (zero-initialised `b`, so the model's outputs are
        unchanged); the stage-3 config switches the VAE low-level path on.

The source is read sharded onto a mesh from abstract targets, every transform is a
jitted function with output shardings, and the destination is written sharded: the
whole tree is never gathered onto one host. The output is written aside (`DST.partial`),
read back, and every kept tensor is compared with its source bit for bit; the report
(every path kept / merged / added / removed / re-initialised, with shapes and dtypes) is
saved as `surgery_report.json` and `.md` in it, and only then is it renamed to DST. So DST
is complete or absent: an interrupted surgery is simply rerun (the stale `DST.partial` is
removed), and `train.init_from` refuses a folder without a complete report. A source tree that does not fit the source
config, or a DiT folder that does not fit the target config, is refused with an error
naming the parameter path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qk_jax import checkpoint as ckpt_lib
from qk_jax import distributed, dit_seeding, fault_points, logs, model_config, paths, sharding
from qk_jax.checkpoint import resolve_run
from qk_jax.config import ConfigError, get_field, load_config, saved_run_config, set_field
from qk_jax.models.kontext import QueryKontext
from qk_jax.models.lora import merge_lora
from qk_jax.tree import flatten_tree, unflatten_tree

TRANSITIONS = ((1, 2), (2, 3))
REPORT = "surgery_report.json"
PARTIAL_SUFFIX = ".partial"
# Config sections carried from the source run into the target stage's config: the parts
# kept by surgery must be built exactly as they were trained.
CARRIED = (
    "mesh",
    "model.vlm",
    "model.num_queries",
    "model.vae",
    "model.prediction",
    "model.sigma_data",
    "model.dtype",
    "model.remat",
    "model.attention_impl",
    "data.area",
    "data.multiple",
    "data.vlm_area",
    "data.vlm_multiple",
    "data.padding_side",
    "data.data_dir",
    "data.dataset",
)


class SurgeryError(ValueError):
    """A tree or config that does not fit the transition (the message names the path)."""


def target_config(
    src_config: ml_collections.ConfigDict, to_stage: int, config_spec: str | None = None
) -> ml_collections.ConfigDict:
    """The destination stage's config: `config_spec` or `configs/stage<to>.py:<source size>`,
    with the kept parts carried over from the source run's config."""
    spec = config_spec or f"configs/stage{to_stage}.py:{src_config.size}"
    cfg = load_config(spec)
    if int(cfg.stage) != to_stage:
        raise ConfigError(f"--config {spec} is a stage-{cfg.stage} config, not stage {to_stage}")
    for field in CARRIED:
        set_field(cfg, field, get_field(src_config, field))
    if to_stage == 3:  # the DiT is kept as trained in stage 2
        set_field(cfg, "model.generator", get_field(src_config, "model.generator"))
        set_field(cfg, "model.connector", get_field(src_config, "model.connector"))
    return cfg


def _abstract(model: QueryKontext, mesh, rules_by_submodel=None):
    abstract, specs = sharding.abstract_init(model.init, jax.random.key(0))
    shardings = sharding.tree_shardings(abstract, specs, mesh, rules_by_submodel)
    return sharding.abstract_with_shardings(abstract, shardings), shardings


def transition(
    src_params: Mapping[str, Any],
    src_model: QueryKontext,
    dst_model: QueryKontext,
    mesh,
    dit_params: Mapping[str, Any] | None = None,
    seed: int = 0,
    rules_by_submodel=None,
) -> tuple[dict, dict[str, str]]:
    """The pure tree function: (destination params, {path: status}) for stage s -> s+1, laid
    out by the rule tables `rules_by_submodel` (default `sharding.RULES_BY_SUBMODEL`).

    Status is one of kept, merged (LoRA folded in), added, reinitialised, removed.
    """
    s, d = src_model.config, dst_model.config
    dst_abstract, dst_shardings = _abstract(dst_model, mesh, rules_by_submodel)
    fresh = None  # initialised lazily: only parts that are added / re-initialised need it

    def init_fresh():
        nonlocal fresh
        if fresh is None:
            fresh = flatten_tree(
                jax.jit(lambda r: _unbox(dst_model.init(r)), out_shardings=dst_shardings)(jax.random.key(seed))
            )
        return fresh

    # Merging runs op by op on the sharded arrays (no gather); adapters of the DiT stay.
    src, merged_paths = merge_lora(dict(src_params), s.lora_scales, only="vlm")
    src_flat = flatten_tree(src)
    dst_flat_abstract = flatten_tree(dst_abstract)
    out: dict[str, Any] = {}
    status: dict[str, str] = {}
    dit_flat = flatten_tree({d.generator_key: dit_params}) if dit_params is not None else {}
    for path, target in dst_flat_abstract.items():
        top = path.split("/")[0]
        if path in dit_flat:
            value = dit_flat[path]
            if tuple(value.shape) != tuple(target.shape):
                raise SurgeryError(
                    f"--dit parameter {path} has shape {tuple(value.shape)}, the stage-{_stage(d)} "
                    f"generator expects {tuple(target.shape)}"
                )
            out[path] = jax.device_put(jnp.asarray(value, target.dtype), target.sharding)
            status[path] = "added (from --dit)"
        elif (
            path in src_flat
            and tuple(src_flat[path].shape) == tuple(target.shape)
            and (top != d.generator_key or s.generator_key == d.generator_key)
        ):
            out[path] = src_flat[path]
            status[path] = "merged" if path in merged_paths else "kept"
        elif path in src_flat:
            out[path] = init_fresh()[path]
            status[path] = "reinitialised"
        else:
            out[path] = init_fresh()[path]
            status[path] = "added"
    for path in src_flat:
        if path not in dst_flat_abstract:
            status[path] = "removed"
    for path in flatten_tree(src_params):
        if path.startswith("lora/vlm/"):
            status[path] = "removed (merged into the VLM)"
    return unflatten_tree(out), status


def _stage(kcfg) -> int:
    return 3 if kcfg.low_level else (1 if kcfg.generator_key == "head" else 2)


def _unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def run(
    from_stage: int,
    to_stage: int,
    src: str,
    dst: str,
    dit: str | None = None,
    config_spec: str | None = None,
    mesh_spec: Mapping[str, int] | None = None,
    seed: int = 0,
    step: int | None = None,
    dit_layers: str = "all",
) -> dict[str, Any]:
    """The whole surgery on checkpoints; returns the report dict (also written to DST).

    `dit_layers` picks the source blocks of a `dit` deeper than the target generator
    (`dit_seeding.block_indices`: "all", "every_other", "first" or indices)."""
    if (from_stage, to_stage) not in TRANSITIONS:
        raise SurgeryError(f"no transition from stage {from_stage} to {to_stage}; known: {TRANSITIONS}")
    staging = prepare_destination(dst)  # before any work: a taken destination is refused at once
    src_root, processor = resolve_run(src)
    reader = ckpt_lib.Checkpointer(src_root, create=False)
    if reader.latest_step() is None:
        raise SurgeryError(f"no checkpoint steps in {src_root}")
    special = model_config.read_special_token_ids(processor) if processor else None
    chosen: dict[str, Any] = {}

    def targets_for(s: int, items: dict) -> dict[str, Any]:
        """The source step's own config decides both models, the mesh and the source target."""
        src_config = saved_run_config(items["config"])
        if int(src_config.stage) != from_stage:
            raise SurgeryError(f"{src_root} step {s} is a stage-{src_config.stage} checkpoint, not stage {from_stage}")
        dst_config = target_config(src_config, to_stage, config_spec)
        if mesh_spec:
            set_field(dst_config, "mesh", dict(mesh_spec))
        src_k = model_config.build_kontext_config(src_config, special)
        dst_k = model_config.validate(
            dst_config, jax.device_count(), model_config.build_kontext_config(dst_config, special)
        )
        mesh = sharding.make_mesh(dst_config.mesh)
        src_model = QueryKontext(src_k)
        with jax.set_mesh(mesh), sharding.activation_rules_context():
            src_target, _ = _abstract(src_model, mesh, sharding.rules_from_config(dst_config))
        chosen.update(dst_config=dst_config, dst_k=dst_k, mesh=mesh, src_model=src_model)
        return {"params": src_target}

    try:  # the newest good step (a corrupt one is skipped with a warning), or exactly --step
        restored = reader.restore_newest(targets_for, step=step, json_items=(), required=("config",))
    except ckpt_lib.CheckpointMismatchError as e:
        raise SurgeryError(f"source checkpoint does not fit the stage-{from_stage} config: {e}") from None
    except ckpt_lib.CheckpointError as e:
        raise SurgeryError(f"source: {e}") from None
    src_params, step = restored["params"], restored["step"]
    dst_config, dst_k, mesh = chosen["dst_config"], chosen["dst_k"], chosen["mesh"]
    src_model, dst_model = chosen["src_model"], QueryKontext(chosen["dst_k"])
    # the DiT is loaded outside the activation-rules context (the converters trace their own abstract trees)
    dit = dit or dst_config.model.generator.get("checkpoint") or None  # --dit, else the stage config's
    rules = sharding.rules_from_config(dst_config)  # the destination's layout, for every tree read or written
    dit_params, dit_map = _load_dit(dit, dst_k, mesh, dit_layers, rules) if dit else (None, [])
    with jax.set_mesh(mesh), sharding.activation_rules_context():
        params, status = transition(src_params, src_model, dst_model, mesh, dit_params, seed, rules)
    writer = ckpt_lib.Checkpointer(staging, max_to_keep=None, async_save=False)
    writer.save(
        0,
        params=params,
        config=dst_config,
        meta={"surgery": f"{from_stage}->{to_stage}", "source": src_root, "source_step": step},
        force=True,
    )
    writer.close()
    if processor and jax.process_index() == 0:
        paths.copy_folder(processor, paths.join(staging, "processor"))
    fault_points.pause_point("surgery.written")  # inert unless a fault test sets QK_JAX_PAUSE_AT
    report = _report(src_params, params, status, from_stage, to_stage, src_root, step, dst, dit)
    report["dit_blocks"] = dit_map
    report["bit_identical"] = verify_kept(staging, params, status, mesh)
    if not report["bit_identical"]["ok"]:
        raise SurgeryError(f"kept tensors differ after writing {staging}: {report['bit_identical']['mismatched'][:5]}")
    if jax.process_index() == 0:
        _write_report(staging, report)
        # the destination appears complete, or not at all (for a URL: the report, which
        # `require_complete` checks, is moved last)
        paths.move_folder(staging, dst, last=("surgery_report.md", REPORT))
    distributed.barrier("surgery_done")
    return report


def staging_path(dst: str) -> str:
    """Where surgery writes before renaming into place: `DST.partial`."""
    return paths.normalize(dst) + PARTIAL_SUFFIX


def read_complete_report(folder: str) -> dict | None:
    """The surgery report of a finished output folder, or None when it has none, or an
    unreadable one, or one whose bit check failed."""
    try:
        report = json.loads(paths.read_text(paths.join(folder, REPORT)))
    except (OSError, ValueError):
        return None
    ok = isinstance(report, dict) and report.get("bit_identical", {}).get("ok") is True
    return report if ok else None


def require_complete(folder: str) -> dict:
    """`train.init_from`: the report of a finished surgery output, or SurgeryError naming the folder."""
    report = read_complete_report(folder)
    if report is None:
        raise SurgeryError(
            f"config field train.init_from: {folder} has no complete {REPORT} (not the finished "
            f"output of qk-jax surgery; an interrupted surgery leaves {staging_path(folder)}, rerun it)"
        )
    return report


def prepare_destination(dst: str) -> str:
    """The empty staging folder for `dst` (a leftover of an interrupted surgery is removed);
    SurgeryError when `dst` already holds anything."""
    if paths.exists(dst) and (not paths.isdir(dst) or paths.listdir(dst)):
        done = " (a finished surgery)" if read_complete_report(dst) else ""
        raise SurgeryError(f"destination {dst} already exists and is not empty{done}; choose a new folder")
    staging = staging_path(dst)
    if jax.process_index() == 0:
        try:
            if paths.exists(dst):
                paths.rmtree(dst)  # an empty folder: renaming replaces it
            if paths.exists(staging):
                logs.warning(f"removing {staging}, the unfinished output of an interrupted surgery")
                paths.rmtree(staging)
            paths.prove_writable(staging)  # before any work
            paths.rmtree(staging)
        except OSError as e:
            raise SurgeryError(f"destination {dst} cannot be written: {e.strerror or e}") from None
    distributed.barrier("surgery_staging")
    return staging


def _load_dit(folder: str, dst_k, mesh, layers: str = "all", rules=None) -> tuple[dict, list[dict[str, int]]]:
    """The target generator's tree (sharded) from a diffusers transformer / pipeline folder or
    from the Orbax checkpoint `qk-jax convert --to-orbax` wrote from one, and the source block
    of each target block (`layers`: see `dit_seeding.block_indices`; a shallower target, e.g.
    dit_10b from Qwen-Image with "every_other", takes a subset of the source's blocks)."""
    # not qk_jax.convert.cli: its absl flags (--step, ...) would clash with this tool's
    from qk_jax.convert import registry, sources
    from qk_jax.convert.registry import param_shardings

    model = "qwen_image" if dst_k.generator.family == "qwen_image" else "flux"
    cfg = sources.read_config(model, folder)
    g = dst_k.generator
    for field in (
        "num_single_layers",
        "num_heads",
        "head_dim",
        "in_channels",
        "patch_bottleneck",
        "cell_conv_width",
        "joint_attention_dim",
    ):
        if getattr(cfg, field) != getattr(g, field):
            raise SurgeryError(
                f"--dit {folder}: {field}={getattr(cfg, field)} but the stage config's generator has "
                f"{getattr(g, field)} (config field model.generator)"
            )
    if (layers or "all") == "all" and cfg.num_layers != g.num_layers:
        raise SurgeryError(
            f"--dit {folder}: num_layers={cfg.num_layers} but the stage config's generator has "
            f"{g.num_layers} (config field model.generator); choose the source blocks with "
            f"--dit-layers ({', '.join(dit_seeding.SPECS[1:])} or indices)"
        )
    try:
        indices = dit_seeding.block_indices(layers, cfg.num_layers, g.num_layers)
    except ValueError as e:
        raise SurgeryError(f"--dit {folder}: {e}") from None
    with jax.set_mesh(mesh), sharding.activation_rules_context():
        _, shardings = _abstract(QueryKontext(dst_k), mesh, rules)
    target_shardings = shardings[dst_k.generator_key]
    # streamed outside the activation-rules context: the converters trace their own abstract trees
    if indices == tuple(range(cfg.num_layers)):
        _, params = sources.load(model, folder, dtype=np.float32, shardings=target_shardings)
    else:  # the whole source, sharded by its own shapes, then the chosen blocks onto the target's shardings
        _, source_shardings = param_shardings(registry.get_model(model), cfg, mesh)
        _, full = sources.load(model, folder, dtype=np.float32, shardings=source_shardings)
        params = dit_seeding.select_blocks(full, indices, out_shardings=target_shardings)
        del full
    return params, [{"block": i, "source_block": j} for i, j in enumerate(indices)]


def verify_kept(dst: str, params, status: Mapping[str, str], mesh) -> dict[str, Any]:
    """Reads DST back and compares every kept (and grafted --dit) tensor with its in-memory value bit for bit."""
    kept = {p: v for p, v in flatten_tree(params).items() if status.get(p) in ("kept", "added (from --dit)")}
    target = unflatten_tree({p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for p, v in kept.items()})
    back = flatten_tree(ckpt_lib.Checkpointer(dst, create=False).restore_subtree(0, "params", target))
    equal = jax.jit(lambda a, b: {k: jnp.array_equal(a[k], b[k]) for k in a})(
        {k: kept[k] for k in kept}, {k: back[k] for k in kept}
    )
    mismatched = sorted(k for k, v in jax.device_get(equal).items() if not bool(v))
    return {"ok": not mismatched, "checked": len(kept), "mismatched": mismatched}


def _report(src_params, params, status, a, b, src_root, step, dst, dit) -> dict[str, Any]:
    src_flat, dst_flat = flatten_tree(src_params), flatten_tree(params)
    rows = []
    for path in sorted(status):
        v = dst_flat.get(path, src_flat.get(path))
        rows.append({"path": path, "status": status[path], "shape": list(v.shape), "dtype": str(v.dtype)})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {
        "transition": f"{a}->{b}",
        "source": src_root,
        "source_step": step,
        "destination": dst,
        "dit": dit,
        "counts": counts,
        "paths": rows,
    }


def _write_report(dst: str, report: dict) -> None:
    report_json = json.dumps(report, indent=1)
    lines = [
        f"# Surgery {report['transition']}",
        "",
        f"source: {report['source']} (step {report['source_step']})",
        f"destination: {report['destination']}",
        f"DiT: {report['dit'] or '(initialised)'}",
        "",
        "| status | count |",
        "|---|---|",
    ] + [f"| {k} | {v} |" for k, v in sorted(report["counts"].items())]
    if report.get("dit_blocks"):
        lines += ["", "| DiT block | from --dit block |", "|---|---|"]
        lines += [f"| {b['block']} | {b['source_block']} |" for b in report["dit_blocks"]]
    lines += [
        "",
        f"kept tensors bit-identical after writing: {report['bit_identical']['ok']} "
        f"({report['bit_identical']['checked']} checked)",
        "",
        "| path | status | shape | dtype |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['path']} | {r['status']} | {tuple(r['shape'])} | {r['dtype']} |" for r in report["paths"]]
    paths.write_text(paths.join(dst, "surgery_report.md"), "\n".join(lines) + "\n")
    paths.write_text(paths.join(dst, REPORT), report_json)  # last: its presence marks a finished folder


def summary(report: Mapping[str, Any]) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in sorted(report["counts"].items()))
    bi = report["bit_identical"]
    return (
        f"surgery {report['transition']}: {counts}; {bi['checked']} kept tensors bit-identical: {bi['ok']}; "
        f"report: {paths.join(report['destination'], 'surgery_report.md')}"
    )


# ----------------------------------------------------------------------------- CLI


def main(argv):
    from absl import flags

    del argv
    f = flags.FLAGS
    mesh = None
    if f.mesh:
        mesh = sharding.parse_mesh(f.mesh)
    report = run(
        f["from"].value,
        f.to,
        f.src,
        f.dst,
        dit=f.dit or None,
        dit_layers=f.dit_layers,
        config_spec=f.config or None,
        mesh_spec=mesh,
        seed=f.seed,
        step=f.step,
    )
    print(summary(report), flush=True)


def define_flags() -> None:
    """The tool's flags (defined on demand, so other tools may import this module)."""
    from absl import flags

    flags.DEFINE_integer("from", None, "Source stage (1 or 2).", required=True)
    flags.DEFINE_integer("to", None, "Destination stage (2 or 3).", required=True)
    flags.DEFINE_string("src", None, "Source run workdir or checkpoint folder.", required=True)
    flags.DEFINE_string("dst", None, "Destination checkpoint folder (new).", required=True)
    flags.DEFINE_string(
        "dit",
        "",
        "1->2: the DiT to graft: a diffusers transformer or pipeline folder, or its "
        "`qk-jax convert --to-orbax` checkpoint (else model.generator.checkpoint, else "
        "initialised).",
    )
    flags.DEFINE_string(
        "dit_layers",
        "all",
        "Which --dit blocks seed the target's blocks: all (same depth), "
        "every_other (block i <- 2i, e.g. dit_10b from Qwen-Image), first, "
        "or comma-separated source indices.",
    )
    flags.DEFINE_string("config", "", "Destination stage config (default configs/stage<to>.py:<source size>).")
    flags.DEFINE_string("mesh", "", "Mesh for the surgery, e.g. data=1,fsdp=4,tensor=2 (default: the config's).")
    flags.DEFINE_integer("seed", 0, "Seed for added / re-initialised parameters.")
    flags.DEFINE_integer("step", None, "Source step (default: the newest readable).")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
