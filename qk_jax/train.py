"""`qk-jax train --config configs/stage<N>.py:<size> --workdir DIR`: one training stage.

    workdir/
      checkpoints/<step>/   Orbax: params, opt_state, ema, data (iterator state), config, meta
      processor/            the tokenizer / image processor files the run uses (copied, never weights,
                            from data.processor / model.vlm.checkpoint / train.init_from, or built)
      metrics.jsonl         one JSON line per logged step
      tb/                   TensorBoard scalars (loss per task, grad norm, step time and its compute /
                            data / checkpoint parts, tokens/s, TFLOP/s per device, MFU) and sample images
      profile/              a jax.profiler trace of `train.profile_steps` (qk_jax/profiling.py)

The workdir is a local folder or a URL (gs://bucket/run): every read and write of it goes
through `qk_jax/paths.py`.

A run resumes from the newest readable checkpoint in its workdir, exactly: the data
iterator, optimizer, EMA and the per-step random key continue where they stopped, so the
loss curve is the one an uninterrupted run draws. SIGTERM (a pre-empted VM) writes a
checkpoint after the current step and exits; on several hosts a SIGTERM to any one of them
is agreed (`Stop`), so every host saves the same step and exits 0. `train.init_from` starts a fresh run from
another checkpoint (the output of `qk-jax surgery`, or a run workdir).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from qk_jax import checkpoint as ckpt_lib
from qk_jax import (
    distributed,
    fault_points,
    flops,
    logs,
    model_config,
    nonfinite,
    optim,
    paths,
    pretrained,
    profiling,
    sharding,
    surgery,
    train_metrics,
    train_state,
)
from qk_jax.config import ConfigError, saved_run_config
from qk_jax.data import pipeline as data_pipeline
from qk_jax.data import vlm_inputs
from qk_jax.data.model_inputs import place_batch, prepare_batch
from qk_jax.data.tokenizer import build_tokenizer
from qk_jax.models.kontext import QueryKontext


def define_flags() -> None:
    """The tool's flags (defined on demand, so other tools may import this module)."""
    config_flags.DEFINE_config_file("config", None, "Stage config, e.g. configs/stage1.py:tiny.")
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).")


class Stop:
    """SIGTERM / SIGINT: the loop checkpoints after the current step and exits.

    One process: a Python handler sets the flag. Several processes (`jax.distributed`): a
    SIGTERM on any one of them is caught by JAX's preemption notifier and agreed through its
    sync point, so every process stops after the same step and saves it; SIGINT is turned into
    a SIGTERM to join that agreement. `after(step)` is asked by every process at every step."""

    def __init__(self):
        self.requested = False
        self.signal = None
        self.shared = False
        self.previous: dict[int, Any] = {}  # the handlers `install` replaced

    def install(self):
        self.shared = distributed.is_initialized()

        def handler(signum, _frame):
            self.requested, self.signal = True, signum

        def forward(signum, _frame):  # to JAX's preemption notifier, which owns SIGTERM
            self.signal = signum
            os.kill(os.getpid(), signal.SIGTERM)

        ours = {signal.SIGINT: forward} if self.shared else {signal.SIGTERM: handler, signal.SIGINT: handler}
        for sig, fn in ours.items():
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, fn)
        return self

    def uninstall(self) -> None:
        """The handlers `install` replaced, back."""
        for sig, previous in self.previous.items():
            if previous is not None:  # None: installed from outside Python, not restorable
                signal.signal(sig, previous)
        self.previous = {}

    def after(self, step: int) -> bool:
        """Whether to checkpoint `step` and exit (the same answer on every process)."""
        if self.shared and not self.requested and distributed.preemption_agreed(step):
            self.requested, self.signal = True, self.signal or signal.SIGTERM
        return self.requested


# VLM sizes the offline tokenizer (`data/tokenizer.py`, 1000 tokens) fits; a published-size VLM
# needs the tokenizer it was trained with.
TOY_TOKENIZER_VLMS = ("tiny", "demo")


def processor_source(config) -> tuple[str, str] | None:
    """(folder, config field) the run's tokenizer / processor is copied from, in this order:
    `data.processor`; the HF folder `model.vlm.checkpoint` when it holds a tokenizer; the
    processor/ of `train.init_from` (a run workdir or checkpoint). None: build the offline
    tokenizer, which is refused for a VLM it does not fit, naming the field to set."""
    if config.data.processor:
        return config.data.processor, "data.processor"
    vlm_ckpt = config.model.vlm.get("checkpoint", "")
    if vlm_ckpt and paths.isfile(paths.join(vlm_ckpt, "tokenizer_config.json")):
        return vlm_ckpt, "model.vlm.checkpoint"
    if config.train.init_from:  # the previous stage's tokenizer travels with its checkpoint
        _, processor = ckpt_lib.resolve_run(config.train.init_from)
        if processor:
            return processor, "train.init_from"
    if vlm_ckpt or config.model.vlm.size not in TOY_TOKENIZER_VLMS:
        what = (
            f"model.vlm.checkpoint={vlm_ckpt} (which holds no tokenizer)"
            if vlm_ckpt
            else f"model.vlm.size={config.model.vlm.size!r}"
        )
        raise ConfigError(
            f"config field data.processor is empty and {what}: the offline toy tokenizer only fits the "
            f"{'/'.join(TOY_TOKENIZER_VLMS)} VLMs; set data.processor to the HF Qwen2.5-VL folder whose tokenizer "
            "the VLM was trained with"
        )
    return None


def ensure_processor(config, workdir: str) -> str:
    """The run's processor folder inside the workdir: the tokenizer / processor files (never
    weights) copied from `processor_source`, or the offline tokenizer built there (tests, the
    demo). Every process writes it itself when missing (hosts of a pod need not share a
    filesystem; on a shared one, the first complete copy to land stays). Returns a local
    folder: the workdir's processor/ itself, or for a URL workdir a local copy of it (the
    tokenizer reads local files)."""
    dst = paths.join(workdir, "processor")
    if paths.exists(paths.join(dst, "tokenizer_config.json")):
        return paths.local_folder(dst)
    source = processor_source(config)
    tmp = f"{dst}.tmp.{jax.process_index()}.{os.getpid()}"
    paths.rmtree(tmp)
    if source:
        vlm_inputs.copy_processor(source[0], tmp, source[1])
    elif paths.is_url(dst):  # built locally, then copied in
        with tempfile.TemporaryDirectory() as local:
            build_tokenizer(local)
            paths.upload_folder(local, tmp)
    else:
        build_tokenizer(tmp)
    publish_folder(tmp, dst)
    return paths.local_folder(dst)


def publish_folder(tmp: str, dst: str) -> None:
    """Moves the complete folder `tmp` to `dst` in one rename; when another process placed
    `dst` first (a shared workdir), drops `tmp` and keeps that one."""
    if paths.exists(paths.join(dst, "tokenizer_config.json")):  # another process placed it first
        paths.rmtree(tmp)
        return
    try:
        paths.move_folder(tmp, dst, last=("tokenizer_config.json",))
    except OSError:
        if not paths.isdir(dst):
            raise
        paths.rmtree(tmp)


def from_training_run(path: str, root: str) -> bool:
    """Whether `train.init_from` names a training run (a workdir holding `checkpoints/`, or
    that `checkpoints/` folder itself) rather than the output of `qk-jax surgery`, which is
    only taken when complete (`surgery.require_complete`)."""
    root = paths.normalize(root)
    return root != paths.normalize(path) or paths.basename(root) == "checkpoints"


def build_state(model: QueryKontext, config, mesh, tx, checkpointer, abstract=None):
    """Fresh (random, plus any pretrained weights the config names), resumed, or initialised
    from another stage's checkpoint, every leaf with the sharding of `abstract` (default:
    `train_state.state_target` of the config). Returns (state, data_state, step)."""
    kcfg = model.config
    if abstract is None:
        abstract = train_state.state_target(model, config, mesh, tx)
    target = optim.combine(abstract["trainable"], abstract["frozen"])
    if checkpointer.latest_step() is not None:
        try:
            return _restore_run(checkpointer, abstract, config.train.trainable)
        except ckpt_lib.CheckpointMismatchError as e:
            hint = _mismatch_hint(checkpointer.directory, checkpointer.latest_step(), config, kcfg, resuming=True)
            raise ckpt_lib.CheckpointMismatchError(f"{e}{hint}") from None
        except ckpt_lib.NoGoodCheckpointError as e:  # every step was moved aside (each named in a warning)
            logs.warning(f"{e}; all were moved aside, starting this run from the beginning")
    if config.train.init_from:
        path = os.fspath(config.train.init_from)
        root, _ = ckpt_lib.resolve_run(path)  # a run workdir or a checkpoint root
        if not from_training_run(path, root):  # the output of qk-jax surgery: only a finished one
            surgery.require_complete(path)
        source = ckpt_lib.Checkpointer(root, create=False)
        try:
            restored = source.restore(params=target, json_items=())
        except ckpt_lib.CheckpointMismatchError as e:
            hint = _mismatch_hint(root, source.latest_step(), config, kcfg, resuming=False)
            raise ckpt_lib.CheckpointMismatchError(f"{e}{hint}") from None
        params = restored["params"]
        logs.info(f"initialised from {root} step {restored['step']}")
    else:
        params, shardings_tree, _ = sharding.init_sharded(
            model.init, mesh, jax.random.key(config.train.seed), rules_by_submodel=sharding.rules_from_config(config)
        )
        params, loaded = pretrained.load_pretrained(params, config, kcfg, shardings_tree)
        for key, folder in loaded.items():
            logs.info(f"{key}: pretrained weights from {folder}")
    shardings = train_state.state_shardings(abstract)
    return train_state.init_state(params, config.train.trainable, tx, abstract["ema"] is not None, shardings), None, 0


def _mismatch_hint(directory: str, step: int, config, kcfg, resuming: bool) -> str:
    """The tail of the error of a checkpoint that does not fit the config's model: what the
    checkpoint's own config item says it holds against the config (another stage, or the model
    fields that differ); "" when that item cannot tell (the mismatch error stands on its own).

    `resuming`: the checkpoint is this workdir's own (a resume), else `train.init_from`'s."""
    try:
        saved_config = saved_run_config(ckpt_lib.read_json_item(directory, step, "config"))
        saved = model_config.build_kontext_config(saved_config)
    except Exception:  # noqa: BLE001 - an old or damaged config item only loses the hint
        return ""
    diffs = model_config.architecture_differences(saved, kcfg)
    changed = "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "") if diffs else "no model field differs"
    if resuming:
        return (
            f"; the run in this workdir (step {step}) was trained with another model ({changed}): resume it "
            "with the config it was started with, or train in a new workdir"
        )
    source_stage, stage = saved_config.get("stage"), config.get("stage")
    if source_stage and stage and source_stage != stage:
        start = (
            f"stage {stage} starts from the output of `qk-jax surgery --from {stage - 1} --to {stage}` of a "
            f"stage-{stage - 1} run"
            if stage > 1
            else "stage 1 starts from pretrained weights (model.*.checkpoint), not from a later stage"
        )
        return f"; train.init_from holds a stage-{source_stage} model and this config trains stage {stage}: {start}"
    return f"; train.init_from holds another model ({changed}): initialise from a checkpoint of this config's model"


def _restore_run(checkpointer, abstract, trainable_prefixes) -> tuple[dict[str, Any], Any, int]:
    """The newest readable checkpoint restored into the abstract train state (every leaf
    with the sharding a fresh start gives it); returns (state, data state, step)."""
    restored = checkpointer.restore(
        params=optim.combine(abstract["trainable"], abstract["frozen"]),
        opt_state=abstract["opt_state"],
        ema=abstract["ema"],
        quarantine=True,
    )
    trainable, frozen = optim.partition(restored["params"], trainable_prefixes)
    state = {
        "step": jax.device_put(jnp.asarray(restored["step"], jnp.int32), abstract["step"].sharding),
        "trainable": trainable,
        "frozen": frozen,
        "opt_state": restored["opt_state"],
        "ema": restored.get("ema"),
    }
    logs.info(f"resumed from step {restored['step']}")
    return state, restored.get("data"), int(restored["step"])


def state_for_checkpoint(state) -> dict[str, Any]:
    return {
        "params": optim.combine(state["trainable"], state["frozen"]),
        "opt_state": state["opt_state"],
        "ema": state.get("ema"),
    }


def train(config, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) one stage; returns a summary (losses, throughput; `stopped_by_signal`
    when a SIGTERM / SIGINT ended it early, after saving its step). The signal handlers are the
    caller's again when it returns (the demo trains three stages in one process)."""
    distributed.maybe_initialize()
    stop = Stop().install()  # before anything slow: a pre-emption during start-up still checkpoints
    try:
        return _train(config, workdir, stop)
    finally:
        stop.uninstall()


def _train(config, workdir: str, stop: Stop) -> dict[str, Any]:
    paths.check_workdir(workdir)
    processor_dir = ensure_processor(config, workdir)
    special = model_config.read_special_token_ids(processor_dir)
    kcfg = model_config.validate(config, jax.device_count(), model_config.build_kontext_config(config, special))
    mesh = sharding.make_mesh(config.mesh)
    main = distributed.is_main_process()
    profiler = profiling.StepProfiler.for_run(config.train.get("profile_steps", ""), workdir)
    logs.info(
        f"stage {config.stage} ({config.size}) on {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"mesh {dict(mesh.shape)}\n{model_config.describe(kcfg)}"
    )
    model = QueryKontext(kcfg)
    tx = optim.make_optimizer(config.train)
    checkpointer = ckpt_lib.Checkpointer(
        paths.join(workdir, "checkpoints"),
        max_to_keep=config.train.keep_checkpoints,
        keep_period=int(config.train.get("keep_period", 0)),
    )
    abstract = train_state.state_target(model, config, mesh, tx)
    with jax.set_mesh(mesh), sharding.activation_rules_context():
        state, data_state, start = build_state(model, config, mesh, tx, checkpointer, abstract=abstract)
    if start == 0:
        n_train = sum(x.size for x in jax.tree.leaves(state["trainable"]))
        n_frozen = sum(x.size for x in jax.tree.leaves(state["frozen"]))
        logs.info(f"parameters: {n_train:,} trainable ({', '.join(config.train.trainable)}), {n_frozen:,} frozen")

    processor = vlm_inputs.load_processor(processor_dir)
    data_cfg = config.data
    with data_cfg.unlocked():
        data_cfg.batch_size = distributed.local_batch_size(config.train.batch_size)
    dataset = data_pipeline.make_dataset(data_cfg, processor, micro_batches=config.train.grad_accum)
    iterator = iter(dataset)
    if data_state is not None:
        iterator.set_state(data_state)

    nonfinite_mode = config.train.get("nonfinite", "stop")  # "skip_step" is applied inside the step
    step_fn = train_state.jit_train_step(model, tx, config.train, train_state.state_shardings(abstract))
    guard = nonfinite.NonFiniteGuard(
        nonfinite_mode, skips=nonfinite.skips_before(checkpointer, start), last_saved=start or None
    )
    peak = train_metrics.peak_flops_per_device(config.train.peak_tflops_per_device)
    metrics_path = paths.join(workdir, "metrics.jsonl")
    if main:  # a resumed run retrains the steps after its checkpoint: their old records go
        train_metrics.drop_metrics_after(metrics_path, start)
    writer = train_metrics.summary_writer(workdir, purge_step=start + 1 if start else None) if main else None
    losses: list[float] = []
    t_last = time.perf_counter()
    steps_since = 0
    window = None  # step metrics summed over the logging window (device arrays, no host sync per step)
    signal = _learning_signal(config) if main else None
    flops_cache: dict = {}
    useful_cache: dict = {}
    times = profiling.StepTimes()  # compute / data / checkpoint seconds of the logging window
    window_flops = window_padded_flops = 0  # useful and padded model FLOPs of the window's steps
    step = start
    try:
        for step in range(start, config.train.steps):
            fault_points.pause_point(f"train.step_{step}", jax.process_index())  # inert unless a test sets it
            profiler.before(step)
            with times.part("data"):
                host = next(iterator)
                batch = prepare_batch(kcfg, host, accum=config.train.grad_accum, processes=jax.process_count())
                with jax.set_mesh(mesh), sharding.activation_rules_context():
                    placed = place_batch(batch, mesh)
            shape_key = tuple((k, np.shape(v)) for k, v in batch.items() if k != "vision_plan")
            if shape_key not in flops_cache:  # batches differ in shape by bucket and input count
                flops_cache[shape_key] = flops.kontext_train_step_flops(
                    kcfg, batch, config.train.trainable, state["trainable"].get("lora")
                )["total"]
            window_padded_flops += flops_cache[shape_key]
            # MFU counts the real work only: each row at its prompt's real length, no padding rows
            window_flops += flops.kontext_useful_flops(
                kcfg, batch, config.train.trainable, state["trainable"].get("lora"), cache=useful_cache
            )
            with jax.set_mesh(mesh), sharding.activation_rules_context():
                state, metrics = step_fn(state, placed)
            profiler.after(step, metrics)
            checkpointer.check_save()  # a failed background save stops the run at the next step
            guard.push(step + 1, metrics)
            steps_since += 1
            window = train_metrics.accumulate(window, metrics)
            last = step + 1 == config.train.steps
            stopping = stop.after(step + 1)  # agreed by all processes: they save the same step
            if (step + 1) % config.train.log_every == 0 or last or stopping or step == start:
                guard.settle()
                m = jax.device_get(window)
                now = time.perf_counter()
                dt = (now - t_last) / steps_since
                record = train_metrics.window_record(
                    step + 1, m, steps_since, dt, batch, window_flops / steps_since, peak
                )
                record.update({f"{k}_seconds": v / steps_since for k, v in times.take(now).items()})
                record["useful_flops_fraction"] = window_flops / window_padded_flops
                record["nonfinite_skips"] = guard.skips
                t_last, steps_since, window = now, 0, None
                window_flops = window_padded_flops = 0
                losses.append(record["loss"])
                if main:
                    train_metrics.log_record(record, metrics_path, writer)
            if (step + 1) % config.train.checkpoint_every == 0 or last or stopping:
                guard.settle()  # nothing non-finite is ever saved
                position = iterator.get_state()  # the next step: the same on every process (one copy is saved)
                distributed.check_same_on_all_processes(json.dumps(position, sort_keys=True), "data-iterator state")
                with times.part("checkpoint"):
                    checkpointer.save(
                        step + 1,
                        **state_for_checkpoint(state),
                        data=position,
                        config=config,
                        meta={"nonfinite_skips": guard.skips},
                        force=True,
                    )
                guard.last_saved = step + 1
            if stopping:
                with times.part("checkpoint"):
                    checkpointer.wait()
                logs.info(f"signal {stop.signal}: checkpoint written at step {step + 1}; exiting")
                # every host's own exit report (logs are process 0's): all stop after the same step
                print(f"process {jax.process_index()}: stopped after saving step {step + 1}", flush=True)
                break
            # Optional extras run after the step's checkpoint is saved, so they cannot lose it; at the
            # end of the run, after the final save has landed.
            every = config.train.sample_every
            samples_due = config.train.sample_images and (last or (every and (step + 1) % every == 0))
            every = config.train.signal.every
            signal_due = signal is not None and (last or (every and (step + 1) % every == 0))
            if last and (samples_due or signal_due):
                with times.part("checkpoint"):
                    checkpointer.wait()
            if samples_due:
                optional_samples(config, kcfg, state, processor, mesh, step + 1, workdir, writer)
            if signal_due:
                measure_signal(
                    signal, config, kcfg, sampling_params(state), processor, mesh, step + 1, metrics_path, writer
                )
    except BaseException:
        checkpointer.close(report=False)  # a pending good save still lands; the first error is the one raised
        raise
    finally:
        profiler.close()
        if writer is not None:
            writer.close()
    checkpointer.close()
    return {
        "stage": config.stage,
        "start_step": start,
        "end_step": step + 1 if config.train.steps > start else start,
        "losses": losses,
        "stopped_by_signal": stop.requested,
        "stop_signal": int(stop.signal) if stop.requested and stop.signal is not None else None,
        "workdir": workdir,
    }


def sampling_params(state) -> dict[str, Any]:
    """The weights to sample with: the EMA of the trainable tree (when kept) plus the frozen tree."""
    trained = state["ema"] if state.get("ema") is not None else state["trainable"]
    return optim.combine(jax.tree.map(lambda e, t: e.astype(t.dtype), trained, state["trainable"]), state["frozen"])


def _learning_signal(config):
    """The run's `LearningSignal` (fixed validation records), or None when switched off
    (`train.signal.samples=0`) or when the data has no validation split to measure on."""
    from qk_jax.data import builders
    from qk_jax.eval import signal as signal_lib

    if not int(config.train.signal.samples):
        return None
    try:
        return signal_lib.LearningSignal.from_config(config)
    except (builders.NotBuiltError, FileNotFoundError, ValueError) as e:
        logs.warning(f"no learning signal for this run ({e}); set train.signal.samples=0 to silence this")
        return None


def measure_signal(
    signal, config, kcfg, params, processor, mesh, step: int, metrics_path: str, writer
) -> dict[str, float]:
    """Measures the learning signal (`qk_jax.eval.signal`) with `params` (the sampling weights);
    logs it (`qk_jax.logs`), to `metrics.jsonl` (a line `{"step", "signal": {...}}`) and TensorBoard."""
    from qk_jax.eval import signal as signal_lib
    from qk_jax.sample import Sampler

    sampler = Sampler(config, kcfg, params, processor, mesh, step=step)
    values = signal.measure(sampler)
    flat = signal_lib.flatten(values)
    logs.info(f"signal @ step {step}: {signal_lib.summary_line(values)}")
    paths.append_text(metrics_path, json.dumps({"step": step, "signal": flat}) + "\n")
    if writer is not None:
        for key, value in flat.items():
            writer.add_scalar(f"signal/{key}", value, step)
        writer.flush()
    return flat


def optional_samples(config, kcfg, state, processor, mesh, step: int, workdir: str, writer) -> str | None:
    """`write_samples`, whose failure (e.g. a dataset without a validation split) costs only
    the images: it is reported in one line and training goes on."""
    try:
        return write_samples(config, kcfg, state, processor, mesh, step, workdir, writer)
    except Exception as e:  # noqa: BLE001 - an optional extra must not stop (or lose) the run
        logs.warning(f"samples at step {step} not written: {ckpt_lib.first_line(e)}")
        return None


def write_samples(config, kcfg, state, processor, mesh, step: int, workdir: str, writer) -> str | None:
    """Generates `train.sample_images` images from validation prompts with the current (EMA)
    weights; writes them to TensorBoard and `workdir/samples/step_<N>.png`. Single-process
    runs only (the sampler places its small batch on the local mesh)."""
    if jax.process_count() > 1:
        return None
    from qk_jax.data import builders
    from qk_jax.data import records as records_lib
    from qk_jax.sample import Sampler, save_grid

    sampler = Sampler(config, kcfg, sampling_params(state), processor, mesh, step=step)
    source = builders.load_source(config.data.data_dir, config.data.dataset, "t2i", "validation")
    n = min(int(config.train.sample_images), len(source))
    prompts = [records_lib.normalize(source[i])["prompt"] for i in range(n)]
    images = sampler.generate(sampler.records(prompts), seed=0)
    path = paths.join(workdir, "samples", f"step_{step}.png")
    grid = save_grid(images, path)
    if writer is not None:
        writer.add_image("samples/t2i", grid, step, dataformats="HWC")
        writer.add_text("samples/prompts", "\n".join(f"{i}: {p}" for i, p in enumerate(prompts)), step)
        writer.flush()
    return path


def main(argv):
    del argv
    f = flags.FLAGS
    if f.workdir is None:
        raise app.UsageError("--workdir is required")
    if f.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/stage1.py:tiny")
    train(f.config, f.workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
