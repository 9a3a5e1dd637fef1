"""What packing the condition stream saves: text-length buckets and the template prefix.

    PYTHONPATH=. python benchmarks/condition_stream.py --workdir DIR [--config configs/stage2.py:demo]
        [--steps 60] [--records 300]

Builds a Kontext-Shapes set of `--records` records per task of the stage's mixture under
DIR/data (the stage's image size), then trains the stage from scratch for `--steps` steps twice:

- padded: every batch at `data.max_text_len` and the whole prompt, chat-template prefix
  included, in the DiT's condition stream (`data.text_buckets=1 data.drop_template_prefix=False`,
  what the trainer did before text buckets);
- no prefix: every batch at `data.max_text_len`, the stream from the prompt's own first token
  (`data.text_buckets=1`);
- packed: the defaults (`data.text_buckets` lengths and no prefix).

and prints, per variant, the number of groups of the step plan (each one compiled shape of the
train step), the text length the VLM runs at and the condition-stream width the DiT gets (mean
over the first 200 batches of the pipeline), and from the trainer's `metrics.jsonl` (a record
per step) the median step time (steps that compiled a new shape are a few outliers), the sum of
all step times (compiles included), the useful share of the FLOPs executed
(`useful_flops_fraction`) and the MFU. Numbers:
BENCHMARKS.md, "Query-Kontext training throughput".
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from qk_jax.config import load_config
from qk_jax.data import builders, pipeline, vlm_inputs
from qk_jax.data.model_inputs import prepare_batch

VARIANTS = {
    "padded": ["data.text_buckets=1", "data.drop_template_prefix=False"],
    "no prefix": ["data.text_buckets=1"],
    "packed": [],
}


def stream_widths(config, kcfg, processor, batches: int) -> tuple[int, float, float]:
    """(groups of the plan, mean VLM text length, mean DiT condition-stream width incl. queries)
    over `batches` batches."""
    plan, _ = pipeline.make_plan(config.data, processor)
    it = iter(pipeline.make_dataset(config.data, processor, process_index=0, process_count=1))
    text, stream = [], []
    for _ in range(batches):
        batch = prepare_batch(kcfg, next(it))
        text.append(batch["input_ids"].shape[1])
        stream.append(batch["cond_index"].shape[1])
    return len(plan.groups), float(np.mean(text)), float(np.mean(stream))


def train_metrics(run_dir: str) -> dict[str, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logs = [r for r in map(json.loads, f) if "step_seconds" in r]
    return {
        "step_seconds": float(np.median([r["step_seconds"] for r in logs])),
        "total_seconds": float(np.sum([r["step_seconds"] for r in logs])),
        "useful": float(np.median([r.get("useful_flops_fraction", np.nan) for r in logs])),
        "mfu": float(np.median([r["mfu"] for r in logs])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="configs/stage2.py:demo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--records", type=int, default=300)
    args = parser.parse_args()

    from qk_jax.model_config import build_kontext_config, read_special_token_ids
    from qk_jax.train import train

    data_dir = os.path.join(args.workdir, "data")
    base = load_config(args.config)
    side = int(round(base.data.area**0.5))
    tasks = [key.rpartition("/")[2] for key in base.data.mixture]
    builders.build_shapes(data_dir, tasks=tasks, num=args.records, num_eval=2, height=side)
    rows = []
    for name, overrides in VARIANTS.items():
        run_dir = os.path.join(args.workdir, name)
        config = load_config(
            args.config,
            [
                f"data.data_dir={data_dir}",
                f"train.steps={args.steps}",
                "train.log_every=1",
                f"train.checkpoint_every={args.steps}",
                "train.sample_images=0",
                "train.signal.samples=0",
                *overrides,
            ],
        )
        if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            train(config, run_dir)
        processor_dir = os.path.join(run_dir, "processor")
        kcfg = build_kontext_config(config, read_special_token_ids(processor_dir))
        groups, text, stream = stream_widths(config, kcfg, vlm_inputs.load_processor(processor_dir), 200)
        rows.append((name, groups, text, stream, train_metrics(run_dir)))
    print(f"{args.config}, {args.steps} steps, global batch {base.train.batch_size}")
    print(
        "| variant | groups | VLM text tokens | DiT condition tokens (with K) | s / step (median) "
        "| all steps (s) | useful FLOPs | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, groups, text, stream, m in rows:
        print(
            f"| {name} | {groups} | {text:.1f} | {stream:.1f} | {m['step_seconds']:.3f} | {m['total_seconds']:.0f} "
            f"| {100 * m['useful']:.0f}% | {100 * m['mfu']:.2f}% |"
        )


if __name__ == "__main__":
    main()
