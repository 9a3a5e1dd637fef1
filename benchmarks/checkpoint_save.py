"""The first checkpoint save of a process: slicing replicated arrays per copy, or not.

Orbax writes a replicated array "replica-parallel" by default: each of its R copies writes
1/R of it, cut out by a slice program per array shape and copy, compiled at the first save
of a process. `qk_jax.checkpoint.Checkpointer` has one copy write an array whole when its
slices would hold fewer than `replica_parallel_min_slice_bytes` bytes
(`REPLICA_PARALLEL_MIN_SLICE_BYTES`, 1 MiB); 0 is Orbax's default behaviour.

For each config, the stage's parameter tree (zeros of the model's shapes, float32, every leaf
replicated over the devices, as the demo's data-parallel mesh holds it) is saved twice by a
fresh process per threshold; the table gives the wall seconds of the first and second save
(each waited for) and the XLA programs each compiled.

    python benchmarks/checkpoint_save.py [--config configs/stage3.py:demo ...] [--devices 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

try:
    from benchmarks import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

DEFAULT_CONFIGS = ("configs/stage3.py:tiny", "configs/stage3.py:demo")


def one_case(config_spec: str, min_slice_bytes: int) -> dict:
    """In this process: two saves of the config's parameter tree; seconds and compiles of each."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from qk_jax import checkpoint, sharding
    from qk_jax.config import load_config
    from qk_jax.model_config import build_kontext_config
    from qk_jax.models.kontext import QueryKontext
    from qk_jax.profiling import counting_compiles

    model = QueryKontext(build_kontext_config(load_config(config_spec)))
    abstract, _ = sharding.abstract_init(model.init, jax.random.key(0))
    replicated = NamedSharding(sharding.make_mesh((jax.device_count(), 1, 1)), P())
    params = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, np.float32), replicated), abstract)
    leaves = jax.tree.leaves(params)
    out = {"leaves": len(leaves), "mbytes": sum(x.nbytes for x in leaves) / 2**20, "devices": jax.device_count()}
    with tempfile.TemporaryDirectory() as directory:
        ck = checkpoint.Checkpointer(directory, replica_parallel_min_slice_bytes=min_slice_bytes)
        for name, step in (("first", 1), ("second", 2)):
            start = time.perf_counter()
            with counting_compiles() as compiles:
                ck.save(step, params=params)
                ck.wait()
            out[f"{name}_s"] = time.perf_counter() - start
            out[f"{name}_compiles"] = len(compiles)
    return out


def run(configs: list[str], devices: int) -> list[dict]:
    from qk_jax.checkpoint import REPLICA_PARALLEL_MIN_SLICE_BYTES

    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    rows = []
    for spec in configs:
        for threshold in (0, REPLICA_PARALLEL_MIN_SLICE_BYTES):
            args = ("--one", spec, "--min_slice_bytes", str(threshold))
            case = common.case_in_fresh_process(__file__, args, flags, f"{spec} (min slice {threshold} B)")
            rows.append({"config": spec, "min_slice_bytes": threshold, **case})
    print(
        common.table(
            f"First and second checkpoint save, parameters replicated over {devices} CPU devices",
            ["config", "leaves", "MiB", "min slice bytes", "first save s", "compiles", "second save s", "compiles"],
            [
                [
                    r["config"],
                    r["leaves"],
                    f"{r['mbytes']:.1f}",
                    r["min_slice_bytes"],
                    f"{r['first_s']:.2f}",
                    r["first_compiles"],
                    f"{r['second_s']:.2f}",
                    r["second_compiles"],
                ]
                for r in rows
            ],
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="config spec (repeatable); default: stage 3 tiny and demo")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices the parameters are replicated on")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single case, in this process
    parser.add_argument("--min_slice_bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_case(args.one, args.min_slice_bytes)))
    else:
        run(args.config or list(DEFAULT_CONFIGS), args.devices)


if __name__ == "__main__":
    main()
