"""One process of a two-process checkpoint job, started twice by tests/test_faults.py with
the `launch/local.py` environment (QK_COORDINATOR, QK_NUM_PROCESSES, QK_PROCESS_ID, 4 CPU
devices each):

    python tests/two_process_restore.py DIR write     saves steps 2 and 4 of a sharded tree
    python tests/two_process_restore.py DIR restore   restore_newest(quarantine=True), as a
                                                      resuming run does; prints RESULT {json}

With QK_TEST_UNREADABLE_ON=<process index>, reading step 4's arrays fails on that process
only (as a shard lost on one host would), to test that all processes still agree.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qk_jax import checkpoint as ckpt_lib
from qk_jax import distributed


def main(directory: str, mode: str) -> None:
    distributed.maybe_initialize()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    shape = (jax.device_count(), 16)

    def tree(step):
        value = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) * step
        return {"w": jax.make_array_from_callback(shape, sharding, lambda index: value[index])}

    if mode == "write":
        ck = ckpt_lib.Checkpointer(directory, max_to_keep=None, async_save=False)
        for step in (2, 4):
            ck.save(step, params=tree(step), force=True)
        ck.close()
        return
    if os.environ.get("QK_TEST_UNREADABLE_ON") == str(jax.process_index()):
        read = ckpt_lib.Checkpointer._read_arrays

        def unreadable_step_4(self, step, *args, **kwargs):
            if step == 4:
                raise ValueError("DATA_LOSS: simulated unreadable shard on this process")
            return read(self, step, *args, **kwargs)

        ckpt_lib.Checkpointer._read_arrays = unreadable_step_4
    ck = ckpt_lib.Checkpointer(directory, create=False)
    target = {"w": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)}
    out = ck.restore(params=target, json_items=(), quarantine=True)
    total = float(jax.jit(jnp.sum)(out["params"]["w"]))
    ck.close()
    print("RESULT " + json.dumps({"process": jax.process_index(), "step": out["step"], "sum": total}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
