"""What packing the condition stream saves: text-length buckets and the template prefix.

    PYTHONPATH=. python benchmarks/condition_stream.py [--config configs/stage2.py:demo]
        [--records 16] [--repeats 5] [--workdir DIR]

Builds a Kontext-Shapes set of `--records` records per task of the stage's mixture (the
stage's image size; under DIR, default a temporary folder), groups each task's records as the
step plan does (input-image count, text length under the default buckets) and collates each
group into a batch three ways:

- padded: every batch at `data.max_text_len` and the whole prompt, chat-template prefix
  included, in the DiT's condition stream (`data.text_buckets=1 data.drop_template_prefix=False`,
  what the trainer did before text buckets);
- no prefix: every batch at `data.max_text_len`, the stream from the prompt's own first token
  (`data.text_buckets=1`);
- packed: the defaults (a batch at the shortest `data.text_buckets` length that holds its
  prompts, no prefix).

The same records in the same batches for all three, so the comparison is the padding alone.
For each variant it times the stage's jitted train step (one device; the first call of each
shape, the compile, left out; the median of `--repeats` calls) on every batch and prints the
text length the VLM runs at, the condition-stream width the DiT gets (both averaged over the
batches), the summed step time, the analytic FLOPs executed and the useful share of them
(`flops.kontext_useful_flops`: no padding). Numbers: BENCHMARKS.md, "Query-Kontext training
throughput".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from qk_jax import flops, optim, sharding
from qk_jax.config import load_config
from qk_jax.data import buckets, builders, grouping, pipeline, records, tokenizer, vlm_inputs
from qk_jax.data.model_inputs import place_batch, prepare_batch
from qk_jax.model_config import build_kontext_config, read_special_token_ids
from qk_jax.models.kontext import QueryKontext
from qk_jax.train_state import init_state
from qk_jax.train_step import make_train_step

VARIANTS = {
    "padded": {"text_buckets": 1, "drop_template_prefix": False},
    "no prefix": {"text_buckets": 1, "drop_template_prefix": True},
    "packed": {},
}


def record_groups(data_dir: str, tasks, count: int, data_cfg, processor) -> list[list[dict]]:
    """The first `count` training records of each task, grouped as the step plan groups them
    under the default text buckets: by input-image count and text length."""
    table, vlm_table = buckets.paired_tables(
        data_cfg.area, data_cfg.multiple, data_cfg.vlm_area, data_cfg.vlm_multiple, data_cfg.ratios
    )
    geometry = vlm_inputs.vision_geometry(processor)
    lengths = grouping.text_lengths(data_cfg.max_text_len, data_cfg.text_buckets)
    groups = []
    for task in tasks:
        source = builders.load_source(data_dir, builders.SHAPES_NAME, task, "train")
        recs = [records.normalize(source[i]) for i in range(min(count, len(source)))]
        keys = grouping.record_groups(recs, table, vlm_table, lengths, processor, geometry, task)
        by_group: dict[tuple, list[dict]] = {}
        for rec, key in zip(recs, keys):
            by_group.setdefault(key, []).append(rec)
        groups += [by_group[k] for k in sorted(by_group)]
    return groups


def time_variant(config, model, state, step, mesh, groups, processor, repeats: int) -> dict[str, float]:
    batches = [prepare_batch(model.config, pipeline.collate_records(g, config.data, processor)) for g in groups]
    seconds, executed, useful = 0.0, 0, 0
    trainable = config.train.trainable
    for batch in batches:
        placed = place_batch({k: v for k, v in batch.items() if k not in ("prompt", "id")}, mesh)
        jax.block_until_ready(step(state, placed))  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(state, placed))
            times.append(time.perf_counter() - start)
        seconds += float(np.median(times))
        executed += flops.kontext_train_step_flops(model.config, batch, trainable)["total"]
        useful += flops.kontext_useful_flops(model.config, batch, trainable)
    return {
        "text": float(np.mean([b["input_ids"].shape[1] for b in batches])),
        "stream": float(np.mean([b["cond_index"].shape[1] for b in batches])),
        "seconds": seconds,
        "gflop": executed / 1e9,
        "useful": useful / executed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/stage2.py:demo")
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    if args.records < 1 or args.repeats < 1:
        parser.error("--records and --repeats must be >= 1")

    workdir = args.workdir or tempfile.mkdtemp(prefix="condition_stream_")
    config = load_config(args.config)
    data_dir, processor_dir = os.path.join(workdir, "data"), os.path.join(workdir, "processor")
    tasks = [key.rpartition("/")[2] for key in config.data.mixture]
    side = int(round(config.data.area**0.5))
    builders.build_shapes(data_dir, tasks=tasks, num=args.records, num_eval=1, height=side)
    tokenizer.build_tokenizer(processor_dir)
    processor = vlm_inputs.load_processor(processor_dir)
    groups = record_groups(data_dir, tasks, args.records, config.data, processor)

    model = QueryKontext(build_kontext_config(config, read_special_token_ids(processor_dir)))
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tx = optim.make_optimizer(config.train)
    with jax.set_mesh(mesh), sharding.activation_rules_context():
        params = jax.jit(lambda r: sharding.unbox_abstract(model.init(r)))(jax.random.key(0))
        state = init_state(params, config.train.trainable, tx, ema=config.train.ema_decay > 0)
        step = jax.jit(make_train_step(model, tx, seed=0, ema_decay=config.train.ema_decay))
        rows = {}
        for name, fields in VARIANTS.items():
            with config.unlocked():
                for key, value in fields.items():
                    config.data[key] = value
            rows[name] = time_variant(config, model, state, step, mesh, groups, processor, args.repeats)
            config = load_config(args.config)
    n = sum(len(g) for g in groups)
    print(f"{args.config}: {n} records in {len(groups)} batches ({', '.join(tasks)}), one device")
    print("| variant | VLM text tokens | DiT condition tokens (with K) | train steps (s) | GFLOP executed | useful |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['text']:.1f} | {r['stream']:.1f} | {r['seconds']:.3f} | {r['gflop']:.1f} "
            f"| {100 * r['useful']:.0f}% |"
        )


if __name__ == "__main__":
    main()
