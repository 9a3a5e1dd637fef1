"""`qk-jax convert`: a HF / diffusers safetensors folder <-> an Orbax parameter checkpoint.

    qk-jax convert --model qwen2_5_vl --from-hf Qwen2.5-VL-7B-Instruct --to-orbax ckpt/vlm \\
        --mesh data=1,fsdp=-1,tensor=1 --dtype bfloat16 --step 0
    qk-jax convert --model qwen2_5_vl --from-orbax ckpt/vlm --to-hf exported [--step N] [--dtype float32]
    qk-jax convert --from-run runs/stage3 --subtree generator --to-hf exported/transformer [--step N] [--no-ema]

HF -> Orbax: the parameter tree's shapes and logical axes come from the config alone
(`jax.eval_shape`), are mapped to NamedShardings on the `--mesh` with the model's rule
table (`qk_jax.sharding`), and the weights stream in tensor by tensor (grouped so that
at most one stacked layer parameter is assembled on the host at a time); each finished
parameter goes straight to its devices. The checkpoint step holds the item `params`
(the model's own tree, as `Model.init` lays it out) and the JSON item `config`
(`{"model", "dtype", "source", "hf_config"}`; `hf_config` is the config.json dict).

Orbax -> HF: the config item says which model and configuration; the parameters are
restored sharded on the mesh and fetched to the host one tensor at a time while the
safetensors shards are written; the folder loads with the PyTorch class's
`from_pretrained`. A float32 round trip HF -> Orbax -> HF is bit-identical.

A training run -> HF: `--from-run RUN --subtree vlm|generator|vae` exports one sub-model
of a run (EMA weights where the run keeps them, LoRA merged), see `qk_jax.convert.from_run`.

Models are registered in `qk_jax.convert.registry.MODELS`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags

from qk_jax import logs
from qk_jax.convert.registry import param_shardings  # used here and by callers of this module

_MODEL = flags.DEFINE_string("model", "qwen2_5_vl", "Model family (see qk_jax.convert.registry.MODELS).")
_FROM_HF = flags.DEFINE_string("from_hf", None, "HF / diffusers folder to read (config.json + safetensors).")
_TO_ORBAX = flags.DEFINE_string("to_orbax", None, "Orbax checkpoint directory to write.")
_FROM_ORBAX = flags.DEFINE_string("from_orbax", None, "Orbax checkpoint directory to read.")
_FROM_RUN = flags.DEFINE_string(
    "from_run",
    None,
    "A training run (workdir or checkpoint root) to export a sub-model of, with --subtree and --to-hf.",
)
_SUBTREE = flags.DEFINE_enum(
    "subtree",
    None,
    ["vlm", "generator", "vae"],
    "With --from-run: the sub-model to export (the generator is the stage-1 head or the DiT).",
)
_EMA = flags.DEFINE_bool("ema", True, "With --from-run: export the EMA weights where the run keeps them.")
_TO_HF = flags.DEFINE_string(
    "to_hf", None, "HF folder to write (replaced atomically if it is empty or an earlier export; refused otherwise)."
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "Parameter dtype written (default: float32 into Orbax, the stored dtype into HF).",
)
_STEP = flags.DEFINE_integer(
    "step", None, "Orbax step to write (default 0) or read, or the run step to export (default: the newest)."
)
_MESH = flags.DEFINE_string(
    "mesh", "data=1,fsdp=-1,tensor=1", "Mesh the parameters are sharded on, e.g. data=1,fsdp=4,tensor=2 (-1: the rest)."
)


class ConvertError(RuntimeError):
    """A conversion that cannot proceed; the message names the folder / file / parameter."""


def _dtype(name: str | None) -> Any:
    if name is None:
        return None
    import jax.numpy as jnp

    return {"float32": np.float32, "bfloat16": jnp.bfloat16}[name]


def check_outputs(to_hf: str | None = None, to_orbax: str | None = None, step: int = 0) -> None:
    """The checks of the outputs that read no input, run first so that a refusal costs nothing
    (reading a 20B model takes minutes): a `--to-hf` folder that is not a model folder
    (`safetensors_io.check_destination`: an export replaces its folder whole) or cannot be
    written; a `--to-orbax` checkpoint that already holds `step`. Raises ConvertError /
    DestinationError / OutputError naming the flag."""
    from qk_jax import checkpoint as ckpt_lib
    from qk_jax import paths
    from qk_jax.convert.safetensors_io import check_destination

    if to_hf:
        if paths.is_url(to_hf):  # the safetensors writer renames local folders into place
            raise ConvertError(f"--to-hf {to_hf}: give a local folder (then copy it, e.g. gsutil -m cp -r)")
        check_destination(to_hf)
        paths.check_output_file(to_hf, "--to-hf")
    if to_orbax:
        if os.path.isdir(to_orbax) and step in ckpt_lib.Checkpointer(to_orbax, create=False).steps():
            raise ConvertError(f"--to-orbax {to_orbax} already holds step {step}: give a new folder or another --step")
        try:
            paths.prove_writable(to_orbax)
        except OSError as e:
            raise ConvertError(f"--to-orbax {to_orbax} cannot be written: {e.strerror or e}") from None


def hf_to_orbax(
    model: str,
    hf_folder: str,
    orbax_dir: str,
    *,
    mesh_cfg: Mapping[str, int] | None = None,
    dtype: Any = np.float32,
    step: int = 0,
    log=logs.info,
) -> dict:
    """Converts `hf_folder` into step `step` of the Orbax checkpoint `orbax_dir`.

    Returns a summary `{"params": count, "bytes": total, "seconds": wall}`.
    Raises FileNotFoundError / ValueError naming the folder, file or parameter at fault.
    """
    from qk_jax import checkpoint as ckpt_lib
    from qk_jax import sharding
    from qk_jax.convert.registry import get_model
    from qk_jax.tree import flatten_tree

    spec = get_model(model)
    t0 = time.time()
    if not os.path.isdir(hf_folder):
        raise FileNotFoundError(f"--from-hf folder {hf_folder} does not exist")
    cfg = spec.read_config(hf_folder)
    mesh = sharding.make_mesh(dict(mesh_cfg or sharding.parse_mesh(_MESH.default)))
    abstract, shardings = param_shardings(spec, cfg, mesh)
    log(f"{model}: reading {hf_folder} onto mesh {dict(mesh.shape)} as {np.dtype(dtype).name}")
    _, params = spec.load(hf_folder, dtype=dtype, shardings=shardings)
    got, want = flatten_tree(params), flatten_tree(abstract)
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise ConvertError(
            f"{hf_folder}: the weights do not fit the config's parameter tree "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for path, value in got.items():
        if tuple(value.shape) != tuple(want[path].shape):
            raise ConvertError(
                f"{hf_folder}: parameter {path} has shape {tuple(value.shape)}, the config implies "
                f"{tuple(want[path].shape)}"
            )
    config_item = {
        "model": model,
        "dtype": np.dtype(dtype).name,
        "source": os.path.abspath(hf_folder),
        "hf_config": spec.config_to_dict(cfg),
    }
    with ckpt_lib.Checkpointer(orbax_dir, max_to_keep=None) as ck:
        ck.save(step, params=params, config=config_item, force=True)
    n = sum(int(np.prod(v.shape)) for v in got.values())
    nbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in got.values())
    summary = {"params": n, "bytes": nbytes, "seconds": time.time() - t0}
    log(
        f"{model}: wrote step {step} of {orbax_dir}: {n:,} parameters, {nbytes / 2**20:.1f} MiB, "
        f"{summary['seconds']:.1f}s"
    )
    return summary


def orbax_to_hf(
    orbax_dir: str,
    hf_folder: str,
    *,
    model: str | None = None,
    mesh_cfg: Mapping[str, int] | None = None,
    dtype: Any = None,
    step: int | None = None,
    log=logs.info,
) -> list[str]:
    """Exports step `step` (default: newest) of `orbax_dir` to a HF folder; returns the files written."""
    import jax

    from qk_jax import checkpoint as ckpt_lib
    from qk_jax import sharding
    from qk_jax.convert.registry import get_model

    if not os.path.isdir(orbax_dir):
        raise FileNotFoundError(f"--from-orbax checkpoint directory {orbax_dir} does not exist")
    ck = ckpt_lib.Checkpointer(orbax_dir, create=False)
    step = ck.latest_step() if step is None else step
    if step is None:
        raise ckpt_lib.CheckpointError(f"no checkpoint steps in {orbax_dir}")
    if "config" not in ck.items_in(step):
        raise ckpt_lib.CheckpointError(
            f"checkpoint step {step} in {orbax_dir} has no 'config' item: it was not "
            f"written by `qk-jax convert` (items: {ck.items_in(step)})"
        )
    config_item = ckpt_lib.read_json_item(orbax_dir, step, "config")
    stored_model = config_item.get("model")
    if model is not None and stored_model is not None and model != stored_model:
        raise ConvertError(f"--model={model} but {orbax_dir} step {step} holds a {stored_model!r} checkpoint")
    spec = get_model(model or stored_model)
    cfg = spec.config_from_dict(config_item["hf_config"])
    mesh = sharding.make_mesh(dict(mesh_cfg or sharding.parse_mesh(_MESH.default)))
    _, shardings = param_shardings(spec, cfg, mesh)
    try:
        stored = ck.abstract_item(step, "params")
    except Exception as e:  # any unreadable metadata means a broken step
        raise ckpt_lib.CheckpointError(
            f"checkpoint step {step} in {orbax_dir} has unreadable parameters ({type(e).__name__}: {e})"
        ) from e
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), stored, shardings)
    log(f"{stored_model}: restoring step {step} of {orbax_dir} onto mesh {dict(mesh.shape)}")
    params = ck.restore(step, params=target, json_items=(), fallback=False)["params"]
    ck.close()
    files = spec.export(hf_folder, cfg, params, dtype=dtype)
    log(f"{stored_model}: wrote {hf_folder} ({', '.join(files)})")
    return files


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"qk-jax convert: unexpected arguments {list(argv[1:])}; see --help")
    from qk_jax import sharding
    from qk_jax.checkpoint import CheckpointError
    from qk_jax.convert.from_run import ExportError, run_to_hf
    from qk_jax.convert.safetensors_io import CorruptCheckpointError
    from qk_jax.paths import OutputError

    if _FROM_RUN.value or _SUBTREE.value:
        if (
            not (_FROM_RUN.value and _SUBTREE.value and _TO_HF.value)
            or _FROM_HF.value
            or _FROM_ORBAX.value
            or _TO_ORBAX.value
        ):
            raise SystemExit("qk-jax convert: --from-run RUN --subtree vlm|generator|vae --to-hf DIR go together")
        try:
            check_outputs(to_hf=_TO_HF.value)
            run_to_hf(
                _FROM_RUN.value,
                _SUBTREE.value,
                _TO_HF.value,
                step=_STEP.value,
                use_ema=_EMA.value,
                dtype=_dtype(_DTYPE.value),
                mesh_cfg=sharding.parse_mesh(_MESH.value) if _MESH.present else None,
            )
        except (FileNotFoundError, OutputError, CheckpointError, ExportError, ConvertError, ValueError) as e:
            raise SystemExit(f"qk-jax convert: {e}") from None
        return
    to_orbax = bool(_FROM_HF.value or _TO_ORBAX.value)
    to_hf = bool(_FROM_ORBAX.value or _TO_HF.value)
    if to_orbax == to_hf:
        raise SystemExit(
            "qk-jax convert: give either --from-hf DIR --to-orbax DIR, --from-orbax DIR --to-hf DIR "
            "or --from-run RUN --subtree NAME --to-hf DIR"
        )
    try:
        mesh_cfg = sharding.parse_mesh(_MESH.value)
        if to_orbax:
            if not (_FROM_HF.value and _TO_ORBAX.value):
                raise SystemExit("qk-jax convert: --from-hf and --to-orbax go together")
            check_outputs(to_orbax=_TO_ORBAX.value, step=0 if _STEP.value is None else _STEP.value)
            hf_to_orbax(
                _MODEL.value,
                _FROM_HF.value,
                _TO_ORBAX.value,
                mesh_cfg=mesh_cfg,
                dtype=_dtype(_DTYPE.value) or np.float32,
                step=0 if _STEP.value is None else _STEP.value,
            )
        else:
            if not (_FROM_ORBAX.value and _TO_HF.value):
                raise SystemExit("qk-jax convert: --from-orbax and --to-hf go together")
            check_outputs(to_hf=_TO_HF.value)
            model = _MODEL.value if _MODEL.present else None
            orbax_to_hf(
                _FROM_ORBAX.value,
                _TO_HF.value,
                model=model,
                mesh_cfg=mesh_cfg,
                dtype=_dtype(_DTYPE.value),
                step=_STEP.value,
            )
    except (FileNotFoundError, OutputError, CorruptCheckpointError, CheckpointError, ConvertError, ValueError) as e:
        raise SystemExit(f"qk-jax convert: {e}") from None


if __name__ == "__main__":
    from absl import app

    app.run(main)
