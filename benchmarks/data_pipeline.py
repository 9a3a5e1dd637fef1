"""Throughput of the Kontext-Shapes generator, the grain pipeline and the judge.

    PYTHONPATH=. python benchmarks/data_pipeline.py [--size 64] [--batch 16] [--batches 60]

Builds a small dataset (t2i, edit, multi_subject) in a temporary folder, then prints one
table: records/s written by the generator, examples/s out of the pipeline (decode,
buckets, VLM tokenisation and image processing, collation) with 0 and with 2 worker
processes (steady state, after the first batch; worker start-up reported separately),
and images/s through the judge.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from absl import flags


def _throughput(it, batches: int, batch_size: int) -> tuple[float, float]:
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--records", type=int, default=400, help="train records per task")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()

    import grain
    import numpy as np
    import tensorflow_datasets as tfds
    import transformers

    from qk_jax.data import builders, pipeline, records, tokenizer, vlm_inputs, vocab
    from qk_jax.eval import score

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = ["t2i", "edit", "multi_subject"]
        start = time.perf_counter()
        builders.build_shapes(tmp, tasks, num=args.records, num_eval=8, height=args.size, workers=1)
        n = len(tasks) * (args.records + 16)
        rows.append(("generator + ArrayRecord write (1 process)", f"{n / (time.perf_counter() - start):.0f} records/s"))
        tokenizer.build_tokenizer(f"{tmp}/tok")
        processor = vlm_inputs.load_processor(f"{tmp}/tok")
        for workers in (0, 2):
            c = pipeline.default_config()
            c.data_dir, c.batch_size, c.num_workers = tmp, args.batch, workers
            c.mixture = {"t2i": 0.5, "edit": 0.3, "multi_subject": 0.2}
            c.area, c.max_text_len = args.size * args.size, 192
            it = iter(pipeline.make_dataset(c, processor, process_index=0, process_count=1))
            rate, first = _throughput(it, args.batches, args.batch)
            it.close()
            rows.append((f"pipeline, {workers} workers (first batch {first:.1f} s)", f"{rate:.0f} examples/s"))
        recs = [records.generate_record(t, i, "test", 0, args.size) for t in vocab.TASKS for i in range(10)]
        start = time.perf_counter()
        report = score.score_records(recs, lambda r: records.decode_image(r["target"]))
        rows.append(
            (
                f"judge (score_sample, own renders -> {report['overall']:.3f})",
                f"{len(recs) / (time.perf_counter() - start):.1f} images/s",
            )
        )
    width = max(len(r[0]) for r in rows)
    print(f"Kontext-Shapes data benchmarks, {args.size}x{args.size} images, batch {args.batch}")
    print(
        f"machine: {os.cpu_count()} CPUs {platform.machine()}, load average {os.getloadavg()[0]:.1f}, "
        f"Python {platform.python_version()}, "
        f"grain {grain.__version__ if hasattr(grain, '__version__') else '?'}, tfds {tfds.__version__}, "
        f"transformers {transformers.__version__}, numpy {np.__version__}"
    )
    print(f"{'stage'.ljust(width)}  throughput")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
